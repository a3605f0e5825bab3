// VhostBlkService: one RPC per vhost ioctl of seed 000, keyed by (vm, device), plus the
// migration device state. Errors carry the errno the ioctl would return, mapped to a
// gRPC status.
import { status as Status } from "@grpc/grpc-js";
import { vhost } from "@virtmesh/proto";
import { GrpcError, unary } from "@virtmesh/runtime";
import { VHOST_BLK_FEATURES } from "@virtmesh/virtio-blk";
import type { BackendSpec } from "./backend";
import { VhostError } from "./errors";
import type { DeviceTable } from "./table";

export { DeviceTable, type HandlerDeps } from "./table";
export { MAX_MEMORY_BACKEND_BYTES } from "./backend";

/** VHOST_BLK_VQ_MAX: one request queue per device (the seed). */
export const VHOST_BLK_VQ_MAX = 1;

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

const KINDS: Partial<Record<vhost.BackendKind, BackendSpec["kind"]>> = {
  [vhost.BackendKind.BACKEND_KIND_FILE]: "file",
  [vhost.BackendKind.BACKEND_KIND_NULL]: "null",
  [vhost.BackendKind.BACKEND_KIND_MEMORY]: "memory",
};

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
      t.setVringAddr(d, req.descUserAddr, req.availUserAddr, req.usedUserAddr, req.flags, req.logGuestAddr);
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
      const kind = KINDS[req.kind];
      if (kind === undefined) throw new VhostError("EINVAL", `backend kind ${req.kind} is not FILE, NULL or MEMORY`);
      const mode = req.mode === vhost.CompletionMode.COMPLETION_MODE_SERIALIZED ? "serialized" : "parallel";
      await t.setBackend(d, { kind, path: req.path, capacityBytes: req.capacityBytes }, mode, req.cgroup);
      return empty;
    }),
    setLogBase: wrap((req: vhost.SetLogBaseRequest) => {
      t.get(req.dev).setLogBase(req.logPath);
      return empty;
    }),
    getStats: wrap((req: vhost.DeviceRef) => t.get(req).counters()),
    saveDeviceState: wrap((req: vhost.DeviceRef): vhost.DeviceState => ({ state: Buffer.from(t.saveState(t.get(req))) })),
    loadDeviceState: wrap(async (req: vhost.LoadDeviceStateRequest) => {
      await t.loadState(t.get(req.dev), req.state, { kickPath: req.kickPath, callPath: req.callPath, logPath: req.logPath });
      return empty;
    }),
  };
}
