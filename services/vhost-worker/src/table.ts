// The host's vhost-blk devices, keyed by (vm, device): ownership (SET_OWNER /
// RESET_OWNER), the checks that need more than one device (overlapping rings), the
// backend through the one factory, device state save / load, and restore after a restart.
import { readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { status as Status } from "@grpc/grpc-js";
import { checkName } from "@virtmesh/config";
import type { vhost } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { VHOST_BLK_FEATURES } from "@virtmesh/virtio-blk";
import { openBackend, type BackendSpec } from "./backend";
import { VhostBlkDevice, type MemoryInfo } from "./device";
import { VhostError } from "./errors";
import type { IobandBinding } from "./ioband";
import { IobandHostError, type IobandBinder } from "./iobandpath";
import { applySetup, decodeDeviceState, encodeDeviceState, readStateFile, type DeviceSetup, type HostFiles } from "./persist";
import type { CompletionMode } from "./queue";

export interface HandlerDeps {
  shmDir: string;
  describeVm(vm: string): Promise<MemoryInfo>;
  warn(msg: string): void;
  /** dm-ioband (VIRTMESH_IOBAND_BACKEND): absent = requests go straight to the backend. */
  ioband?: IobandBinder;
  /** Directories FILE images must lie under (VIRTMESH_IMAGE_DIRS); empty = any absolute path. */
  imageDirs?: readonly string[];
}

type Range = [number, number];

/** The bytes a split vring of `num` entries covers (§2.7: descriptor table, avail and used rings with their event words). */
export function vringRanges(num: number, desc: number, avail: number, used: number): Range[] {
  return [
    [desc, desc + 16 * num],
    [avail, avail + 6 + 2 * num],
    [used, used + 6 + 8 * num],
  ];
}

const overlaps = (a: Range, b: Range): boolean => a[0] < b[1] && b[0] < a[1];

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
    const k = this.key(ref);
    const dev = this.devices.get(k);
    // vhost_dev_check_owner: -EPERM when the caller does not own the device.
    if (!dev) throw new GrpcError(Status.FAILED_PRECONDITION, `EPERM: ${k} has no owner (SET_OWNER first)`);
    return dev;
  }

  private newDevice(vm: string, device: string, mem: MemoryInfo): VhostBlkDevice {
    return new VhostBlkDevice(vm, device, this.d.shmDir, VHOST_BLK_FEATURES, this.d.warn, mem);
  }

  async setOwner(ref: vhost.DeviceRef): Promise<void> {
    const k = this.key(ref);
    // vhost_dev_set_owner: -EBUSY if already owned.
    if (this.devices.has(k)) throw new GrpcError(Status.FAILED_PRECONDITION, `EBUSY: ${k} already has an owner (RESET_OWNER first)`);
    const info = await this.d.describeVm(ref.vm);
    if (this.devices.has(k)) throw new GrpcError(Status.FAILED_PRECONDITION, `EBUSY: ${k} already has an owner (RESET_OWNER first)`);
    this.devices.set(k, this.newDevice(ref.vm, ref.device, info));
  }

  async resetOwner(ref: vhost.DeviceRef): Promise<void> {
    const dev = this.get(ref);
    this.devices.delete(this.key(ref));
    const bound = dev.ioband !== null;
    // close() drains held and in-flight requests first: nothing acknowledged is lost.
    await dev.close();
    if (bound) this.d.ioband?.unbind(dev.vm, dev.device);
  }

  /**
   * SET_VRING_ADDR with the checks that need the other devices (issue 16): the three
   * parts of the ring may not overlap each other, nor the rings of another device of the
   * same VM that has a backend (its live rings: the device writes them).
   */
  setVringAddr(dev: VhostBlkDevice, desc: number, avail: number, used: number, flags: number, logGuestAddr: number): void {
    if (dev.num) this.checkRings(dev, vringRanges(dev.num, desc, avail, used));
    dev.setVringAddr(desc, avail, used, flags, logGuestAddr);
  }

  private checkRings(dev: VhostBlkDevice, mine: Range[]): void {
    const names = ["descriptor table", "avail ring", "used ring"];
    for (let i = 0; i < 3; i++) {
      for (let j = i + 1; j < 3; j++) if (overlaps(mine[i]!, mine[j]!)) throw new VhostError("EINVAL", `the ${names[i]} overlaps the ${names[j]}`);
    }
    for (const other of this.devices.values()) {
      if (other === dev || other.vm !== dev.vm || !other.hasBackend) continue;
      const theirs = vringRanges(other.num, other.descAddr, other.availAddr, other.usedAddr);
      for (let i = 0; i < 3; i++) {
        for (const t of theirs) if (overlaps(mine[i]!, t)) throw new VhostError("EINVAL", `the ${names[i]} overlaps the live rings of ${other.vm}/${other.device}`);
      }
    }
  }

  /**
   * BLK_SET_BACKEND: the one backend factory, then the device's ioband binding (made
   * once; a replaced backend keeps it). `cgroup` "" keeps the one AttachDevice gave the
   * device, else the root.
   */
  async setBackend(dev: VhostBlkDevice, spec: BackendSpec, mode: CompletionMode, cgroup: string, serial?: Uint8Array, expectCapacity?: number): Promise<void> {
    const be = openBackend(spec, dev.vm, { imageDirs: this.d.imageDirs, serial, expectCapacity });
    let io: { binding: IobandBinding | null | undefined; bound: boolean };
    try {
      io = this.bindIoband(dev, cgroup);
    } catch (e) {
      be.close();
      throw e;
    }
    try {
      await dev.setBackend(be, mode, io.binding, cgroup);
    } catch (e) {
      if (io.bound) this.d.ioband?.unbind(dev.vm, dev.device);
      throw e;
    }
  }

  private bindIoband(dev: VhostBlkDevice, cgroup: string): { binding: IobandBinding | null | undefined; bound: boolean } {
    if (!this.d.ioband) {
      // The seed's control file only exists with dm-ioband loaded.
      if (cgroup !== "") throw new VhostError("EINVAL", `cgroup ${JSON.stringify(cgroup.slice(0, 100))} given but no ioband device is configured (VIRTMESH_IOBAND_BACKEND)`);
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

  /** SaveDeviceState: only after GET_VRING_BASE stopped the ring (vhost-user's phase STOPPED). */
  saveState(dev: VhostBlkDevice): Uint8Array {
    const setup = dev.canSaveState ? dev.setup() : null;
    if (!setup) throw new GrpcError(Status.FAILED_PRECONDITION, `${dev.vm}/${dev.device}: the ring is not stopped by GET_VRING_BASE (or has no backend); stop it first`);
    return encodeDeviceState(setup);
  }

  /**
   * LoadDeviceState: on an owned device without a backend, the setter sequence and
   * BLK_SET_BACKEND from the state, on a fresh device that replaces the owned one only
   * when every step passed: a refused load changes nothing.
   */
  async loadState(dev: VhostBlkDevice, state: Uint8Array, files: HostFiles): Promise<void> {
    if (dev.hasBackend) throw new VhostError("EBUSY", `${dev.vm}/${dev.device} already has a backend (RESET_OWNER + SET_OWNER first)`);
    const setup = decodeDeviceState(state);
    const k = `${dev.vm}/${dev.device}`;
    const fresh = this.newDevice(dev.vm, dev.device, dev.memoryInfo);
    try {
      this.checkRings(fresh, vringRanges(setup.num, setup.descAddr, setup.availAddr, setup.usedAddr));
      applySetup(fresh, setup, files);
      await this.setBackend(fresh, setup.backend, setup.mode, setup.cgroup, setup.serial, setup.backend.kind === "file" ? setup.backend.capacityBytes : undefined);
    } catch (e) {
      await fresh.close(0, true);
      throw e;
    }
    if (this.devices.get(k) !== dev || dev.hasBackend) {
      await fresh.close(1000, true);
      throw new VhostError("EBUSY", `${k} changed while its state was loaded`);
    }
    this.devices.set(k, fresh);
    await dev.close(0, false);
  }

  /**
   * A restarted worker (e.g. after SIGKILL): every device whose state file is in the
   * shm directory is served again through the setters, reattached to its rings and
   * inflight region.
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
        const st = readStateFile(path);
        const k = this.key({ vm: st.vm, device: st.device });
        if (this.devices.has(k)) throw new Error(`${k} is already served`);
        const { dev, resubmitted } = this.restoreOne(st.vm, st.device, st, st.setup);
        this.devices.set(k, dev);
        log("vhost-blk device restored after a restart", { vm: st.vm, device: st.device, resubmitted, ...dev.recovered });
      } catch (e) {
        this.d.warn(`cannot restore ${path}: ${(e as Error).message}; dropping it`);
        rmSync(path, { force: true });
      }
    }
    return this.devices.size;
  }

  /** The restore of one device: setters, the one backend factory, then serve on the existing ring. */
  restoreOne(vm: string, device: string, files: HostFiles & MemoryInfo, setup: DeviceSetup): { dev: VhostBlkDevice; resubmitted: number } {
    const dev = this.newDevice(vm, device, { memoryPath: files.memoryPath, memoryBytes: files.memoryBytes });
    let binding: IobandBinding | null = null;
    try {
      applySetup(dev, setup, files);
      const be = openBackend(setup.backend, vm, { imageDirs: this.d.imageDirs, serial: setup.serial });
      if (this.d.ioband) {
        try {
          binding = this.d.ioband.bind(vm, device, setup.cgroup === "" ? undefined : setup.cgroup);
        } catch (e) {
          this.d.warn(`${vm}/${device}: no ioband scheduling after the restart: ${(e as Error).message}`);
        }
      }
      return { dev, resubmitted: dev.resume(be, setup.mode, binding, setup.cgroup) };
    } catch (e) {
      if (binding) this.d.ioband?.unbind(vm, device);
      void dev.close(0, false);
      throw e;
    }
  }

  /** Shutdown: devices are stopped, drained and forgotten (ring and state files removed); only a killed worker leaves them for restore. */
  async closeAll(): Promise<void> {
    const all = [...this.devices.values()];
    this.devices.clear();
    await Promise.all(all.map((d) => d.close()));
    for (const d of all) this.d.ioband?.unbind(d.vm, d.device);
  }
}
