// VhostBlkService: one RPC per vhost ioctl of seed 000, keyed by (vm, device).
// Errors carry the errno the ioctl would return, mapped to a gRPC status.
import { status as Status } from "@grpc/grpc-js";
import { checkName } from "@virtmesh/config";
import { vhost } from "@virtmesh/proto";
import { GrpcError, unary } from "@virtmesh/runtime";
import { VHOST_BLK_FEATURES } from "@virtmesh/virtio-blk";
import { FileBackend, MemoryBackend, NullBackend, type BlkBackend } from "./backend";
import { readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { VhostBlkDevice, VhostError, type MemoryInfo, type PersistedDevice } from "./device";
import type { IobandBinding } from "./ioband";
import { IobandHostError, type IobandBinder } from "./iobandpath";

/** VHOST_BLK_VQ_MAX: one request queue per device (the seed). */
export const VHOST_BLK_VQ_MAX = 1;
/** Largest in-memory backend (it lives in this process). */
export const MAX_MEMORY_BACKEND_BYTES = 4 * 2 ** 30;

const ERRNO_STATUS: Record<VhostError["errno"], Status> = {
  EPERM: Status.FAILED_PRECONDITION,
  EBUSY: Status.FAILED_PRECONDITION,
  EINVAL: Status.INVALID_ARGUMENT,
  EOPNOTSUPP: Status.INVALID_ARGUMENT,
  ENOBUFS: Status.OUT_OF_RANGE,
  EFAULT: Status.FAILED_PRECONDITION,
  ENOENT: Status.NOT_FOUND,
  ETIMEDOUT: Status.DEADLINE_EXCEEDED,
};

export interface HandlerDeps {
  shmDir: string;
  describeVm(vm: string): Promise<MemoryInfo>;
  warn(msg: string): void;
  /** dm-ioband (VIRTMESH_IOBAND_BACKEND): absent = requests go straight to the backend. */
  ioband?: IobandBinder;
}

export class DeviceTable {
  readonly devices = new Map<string, VhostBlkDevice>();
  constructor(private readonly d: HandlerDeps) {}

  key(ref: vhost.DeviceRef | undefined): string {
    if (!ref) throw new GrpcError(Status.INVALID_ARGUMENT, "dev is required");
    try {
      checkName("vm", ref.vm);
      checkName("device", ref.device);
    } catch (e) {
      throw new GrpcError(Status.INVALID_ARGUMENT, (e as Error).message);
    }
    return `${ref.vm}/${ref.device}`;
  }

  get(ref: vhost.DeviceRef | undefined): VhostBlkDevice {
    const dev = this.devices.get(this.key(ref));
    // vhost_dev_check_owner: -EPERM when the caller does not own the device.
    if (!dev) throw new GrpcError(Status.FAILED_PRECONDITION, `EPERM: ${ref!.vm}/${ref!.device} has no owner (SET_OWNER first)`);
    return dev;
  }

  async setOwner(ref: vhost.DeviceRef): Promise<void> {
    const k = this.key(ref);
    // vhost_dev_set_owner: -EBUSY if already owned.
    if (this.devices.has(k)) throw new GrpcError(Status.FAILED_PRECONDITION, `EBUSY: ${k} already has an owner (RESET_OWNER first)`);
    const info = await this.d.describeVm(ref.vm);
    const dev = new VhostBlkDevice(ref.vm, ref.device, this.d.shmDir, VHOST_BLK_FEATURES, this.d.warn);
    dev.attachMemory(info);
    this.devices.set(k, dev);
  }

  async resetOwner(ref: vhost.DeviceRef): Promise<void> {
    const dev = this.get(ref);
    this.devices.delete(this.key(ref));
    const bound = dev.ioband !== null;
    // close() drains held and in-flight requests first: nothing acknowledged is lost.
    await dev.close();
    if (bound) this.d.ioband?.unbind(ref.vm, ref.device);
  }

  /**
   * BLK_SET_BACKEND: the device's ioband binding (made once; a replaced backend keeps
   * it). `cgroup` is the request's blkio cgroup; "" keeps the one AttachDevice gave the
   * device, else the root. Undefined: no change; null: no scheduling.
   */
  bindIoband(dev: VhostBlkDevice, cgroup: string): { binding: IobandBinding | null | undefined; bound: boolean } {
    if (!this.d.ioband) {
      // The seed's control file only exists with dm-ioband loaded.
      if (cgroup !== "") throw new VhostError("EINVAL", `cgroup ${JSON.stringify(cgroup)} given but no ioband device is configured (VIRTMESH_IOBAND_BACKEND)`);
      return { binding: undefined, bound: false };
    }
    if (dev.ioband !== null) return { binding: undefined, bound: false };
    try {
      return { binding: this.d.ioband.bind(dev.vm, dev.device, cgroup === "" ? undefined : cgroup), bound: true };
    } catch (e) {
      if (e instanceof IobandHostError) throw new VhostError("EINVAL", e.message);
      throw e;
    }
  }

  unbindIoband(dev: VhostBlkDevice): void {
    this.d.ioband?.unbind(dev.vm, dev.device);
  }

  /**
   * A restarted worker (e.g. after SIGKILL): every device whose state file is in the
   * shm directory is served again, reattached to its rings and inflight region.
   */
  restoreAll(log: (msg: string, fields: Record<string, unknown>) => void): number {
    let files: string[] = [];
    try {
      files = readdirSync(this.d.shmDir).filter((f) => /^vhost-blk\..+\.dev\.json$/.test(f));
    } catch {
      return 0;
    }
    for (const f of files) {
      const path = join(this.d.shmDir, f);
      try {
        const st = JSON.parse(readFileSync(path, "utf8")) as PersistedDevice;
        let binding: IobandBinding | null = null;
        if (this.d.ioband) {
          try {
            binding = this.d.ioband.bind(st.vm, st.device, undefined);
          } catch (e) {
            this.d.warn(`${st.vm}/${st.device}: no ioband scheduling after the restart: ${(e as Error).message}`);
          }
        }
        const { dev, resubmitted } = VhostBlkDevice.restore(st, this.d.shmDir, VHOST_BLK_FEATURES, this.d.warn, binding);
        this.devices.set(`${st.vm}/${st.device}`, dev);
        log("vhost-blk device restored after a restart", { vm: st.vm, device: st.device, resubmitted, ...dev.recovered });
      } catch (e) {
        this.d.warn(`cannot restore ${path}: ${(e as Error).message}; dropping it`);
        rmSync(path, { force: true });
      }
    }
    return this.devices.size;
  }

  /** Shutdown: devices are stopped and drained; their state stays only if `forget` is false. */
  async closeAll(): Promise<void> {
    const all = [...this.devices.values()];
    this.devices.clear();
    await Promise.all(all.map((d) => d.close()));
    for (const d of all) this.d.ioband?.unbind(d.vm, d.device);
  }
}

function checkIndex(index: number): void {
  // vhost_vring_ioctl / vhost_blk_set_backend: index >= VHOST_BLK_VQ_MAX -> -ENOBUFS.
  if (index >= VHOST_BLK_VQ_MAX) throw new VhostError("ENOBUFS", `vring index ${index} >= ${VHOST_BLK_VQ_MAX}`);
}

function wrap<Req, Res>(fn: (req: Req) => Promise<Res> | Res) {
  return unary<Req, Res>(async (req) => {
    try {
      return await fn(req);
    } catch (e) {
      if (e instanceof VhostError) throw new GrpcError(ERRNO_STATUS[e.errno], e.message);
      if (e instanceof GrpcError) throw e;
      const err = e as NodeJS.ErrnoException;
      if (err.code === "ENOENT") throw new GrpcError(Status.NOT_FOUND, err.message);
      if (err.code === "EACCES" || err.code === "EISDIR") throw new GrpcError(Status.PERMISSION_DENIED, err.message);
      throw e;
    }
  });
}

export function vhostBlkService(t: DeviceTable): vhost.VhostBlkServiceServer {
  const empty = {};
  return {
    setOwner: wrap(async (req: vhost.DeviceRef) => {
      await t.setOwner(req);
      return empty;
    }),
    resetOwner: wrap(async (req: vhost.DeviceRef) => {
      await t.resetOwner(req);
      return empty;
    }),
    getFeatures: wrap((req: vhost.DeviceRef) => {
      t.get(req);
      return { features: Number(VHOST_BLK_FEATURES) };
    }),
    setFeatures: wrap((req: vhost.SetFeaturesRequest) => {
      t.get(req.dev).setFeatures(BigInt(req.features));
      return empty;
    }),
    setVringNum: wrap((req: vhost.VringNumRequest) => {
      const d = t.get(req.dev);
      checkIndex(req.index);
      d.setVringNum(req.num);
      return empty;
    }),
    setVringAddr: wrap((req: vhost.VringAddrRequest) => {
      const d = t.get(req.dev);
      checkIndex(req.index);
      d.setVringAddr(req.descUserAddr, req.availUserAddr, req.usedUserAddr);
      return empty;
    }),
    setVringBase: wrap((req: vhost.VringStateRequest) => {
      const d = t.get(req.dev);
      checkIndex(req.index);
      d.setVringBase(req.num);
      return empty;
    }),
    getVringBase: wrap(async (req: vhost.VringStateRequest) => {
      const d = t.get(req.dev);
      checkIndex(req.index);
      return { index: req.index, num: await d.stop(10_000) };
    }),
    setVringKick: wrap((req: vhost.VringFileRequest) => {
      const d = t.get(req.dev);
      checkIndex(req.index);
      d.setVringKick(req.path);
      return empty;
    }),
    setVringCall: wrap((req: vhost.VringFileRequest) => {
      const d = t.get(req.dev);
      checkIndex(req.index);
      d.setVringCall(req.path);
      return empty;
    }),
    blkSetBackend: wrap(async (req: vhost.BlkSetBackendRequest) => {
      const d = t.get(req.dev);
      checkIndex(req.index);
      const K = vhost.BackendKind;
      let be: BlkBackend;
      const cap = req.capacityBytes;
      const checkCap = (max: number) => {
        if (!(cap > 0 && cap % 512 === 0 && cap <= max)) throw new VhostError("EINVAL", `capacity_bytes ${cap} must be a positive multiple of 512 up to ${max}`);
      };
      switch (req.kind) {
        case K.BACKEND_KIND_FILE:
          if (!req.path.startsWith("/")) throw new VhostError("EINVAL", `backend path ${JSON.stringify(req.path)} must be absolute`);
          be = new FileBackend(req.path);
          break;
        case K.BACKEND_KIND_NULL:
          checkCap(2 ** 50);
          be = new NullBackend(cap, req.dev!.vm);
          break;
        case K.BACKEND_KIND_MEMORY:
          checkCap(MAX_MEMORY_BACKEND_BYTES);
          be = new MemoryBackend(cap, req.dev!.vm);
          break;
        default:
          throw new VhostError("EINVAL", `backend kind ${req.kind} is not FILE, NULL or MEMORY`);
      }
      const mode = req.mode === vhost.CompletionMode.COMPLETION_MODE_SERIALIZED ? "serialized" : "parallel";
      let io: ReturnType<DeviceTable["bindIoband"]>;
      try {
        io = t.bindIoband(d, req.cgroup);
      } catch (e) {
        be.close();
        throw e;
      }
      try {
        await d.setBackend(be, mode, io.binding);
      } catch (e) {
        be.close();
        if (io.bound) t.unbindIoband(d);
        throw e;
      }
      return empty;
    }),
    setLogBase: wrap((req: vhost.SetLogBaseRequest) => {
      t.get(req.dev).setLogBase(req.logPath);
      return empty;
    }),
    getStats: wrap((req: vhost.DeviceRef) => t.get(req).snapshot()),
    // Filled in with the device's persist module (migration device state).
    saveDeviceState: wrap((): vhost.DeviceState => {
      throw new GrpcError(Status.UNIMPLEMENTED, "SaveDeviceState is not served by this vhost-worker yet");
    }),
    loadDeviceState: wrap((): typeof empty => {
      throw new GrpcError(Status.UNIMPLEMENTED, "LoadDeviceState is not served by this vhost-worker yet");
    }),
  };
}
