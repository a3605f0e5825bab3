// One vhost-blk device (one VM's virtio-blk, one request queue): the state the vhost
// ioctls of seed 000 set up. Serving is the ActiveQueue's (queue.ts), built from this
// state by BLK_SET_BACKEND, by a restart after GET_VRING_BASE, or by restore.
import { rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { DirtyLog, GuestMemory, checkQueueAddresses, isValidQueueSize, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_NOTIFY_ON_EMPTY, type QueueConfig } from "@virtmesh/virtqueue";
import { CRING_F_EVENT_IDX, CRING_F_LOG_ALL, VHOST_F_LOG_ALL, completionRingFileName, hasFeature } from "@virtmesh/virtio-blk";
import { isUnder, type BackendSpec, type BlkBackend } from "./backend";
import { VhostError } from "./errors";
import type { IobandBinding } from "./ioband";
import { deviceStateFileName, writeStateFile, type DeviceSetup } from "./persist";
import { ActiveQueue, blkLimits, type CompletionMode, type QueueStats, type RecoveredHeads, type RingStart, type VringFiles } from "./queue";

export { VhostError } from "./errors";
export type { CompletionMode } from "./queue";

export interface DeviceStatsSnapshot extends QueueStats {
  needsReset: boolean;
  needsResetReason: string;
}

export interface MemoryInfo {
  memoryPath: string;
  memoryBytes: number;
}

export class VhostBlkDevice implements VringFiles {
  features = 0n;
  num = 0;
  descAddr = -1;
  availAddr = -1;
  usedAddr = -1;
  /** SET_VRING_ADDR flags (VHOST_VRING_F_LOG) and log_guest_addr, kept for the device state. */
  addrFlags = 0;
  logGuestAddr = 0;
  base = 0;
  kickPath = "";
  callPath = "";
  logPath = "";
  kick: Doorbell | null = null;
  call: Doorbell | null = null;
  /** The blkio cgroup BLK_SET_BACKEND named ("" = the one AttachDevice gave, or the root). */
  cgroup = "";
  readonly cringPath: string;
  readonly statePath: string;
  readonly memory: GuestMemory;

  private readonly memMap: SharedMapping;
  private logMap: SharedMapping | null = null;
  private log: DirtyLog | null = null;
  /** Set by BLK_SET_BACKEND; stays (stopped) after GET_VRING_BASE until a restart or RESET_OWNER. */
  private active: ActiveQueue | null = null;
  /** GET_VRING_BASE stopped the ring and nothing restarted it: the device state may be saved. */
  private stoppedByGetBase = false;
  private iob: IobandBinding | null = null;
  private resetReason = "";
  private readonly stats: QueueStats = { requests: 0, kicks: 0, interrupts: 0, errors: 0 };

  /** VHOST_SET_OWNER: map the VM's guest memory (the ioctl's mm, here the sidecar's file). */
  constructor(
    readonly vm: string,
    readonly device: string,
    readonly shmDir: string,
    readonly offered: bigint,
    private readonly onError: (msg: string) => void,
    readonly memoryInfo: MemoryInfo,
  ) {
    this.cringPath = join(shmDir, completionRingFileName(vm, device, 0));
    this.statePath = join(shmDir, deviceStateFileName(vm, device));
    this.checkUnder("memory", memoryInfo.memoryPath);
    this.memMap = mapFile(memoryInfo.memoryPath, memoryInfo.memoryBytes);
    this.memory = new GuestMemory(this.memMap.buffer, { size: memoryInfo.memoryBytes });
  }

  get isRunning(): boolean {
    return this.active?.isRunning ?? false;
  }
  /** A backend is attached (running, or stopped by GET_VRING_BASE). */
  get hasBackend(): boolean {
    return this.active !== null;
  }
  get canSaveState(): boolean {
    return this.stoppedByGetBase && this.active !== null && !this.active.isRunning;
  }
  /** The ioband device this VM device's requests are scheduled on, if any. */
  get ioband(): IobandBinding | null {
    return this.iob;
  }
  get recovered(): RecoveredHeads | null {
    return this.active?.recovered ?? null;
  }
  get backend(): BlkBackend | null {
    return this.active?.backend ?? null;
  }
  get mode(): CompletionMode {
    return this.active?.mode ?? "parallel";
  }

  setFeatures(f: bigint): void {
    // Seed: "if (features & ~VHOST_BLK_FEATURES) return -EOPNOTSUPP;"
    const extra = f & ~this.offered;
    if (extra !== 0n) throw new VhostError("EOPNOTSUPP", `features 0x${extra.toString(16)} are not offered (offered 0x${this.offered.toString(16)})`);
    this.features = f;
    // VHOST_F_LOG_ALL "can be changed while device is active".
    if (this.log) this.log.enabled = hasFeature(f, VHOST_F_LOG_ALL);
    if (this.active) {
      this.active.limits.features = f;
      this.active.ringFlags = this.cringFlags();
      if (this.active.isRunning) this.persist();
    }
  }

  private cringFlags(): number {
    return (hasFeature(this.features, VIRTIO_F_EVENT_IDX) ? CRING_F_EVENT_IDX : 0) | (hasFeature(this.features, VHOST_F_LOG_ALL) && this.logPath ? CRING_F_LOG_ALL : 0);
  }

  private checkStopped(what: string): void {
    // vhost_vring_ioctl: -EBUSY while a backend is attached (private_data set).
    if (this.isRunning) throw new VhostError("EBUSY", `${what} while the ring is running (GET_VRING_BASE or RESET_OWNER first)`);
  }

  setVringNum(num: number): void {
    this.checkStopped("SET_VRING_NUM");
    if (!isValidQueueSize(num)) throw new VhostError("EINVAL", `ring size ${num} is not a power of 2 in [1, 32768] (virtio 1.2 §2.7)`);
    this.num = num;
  }

  setVringAddr(desc: number, avail: number, used: number, flags = 0, logGuestAddr = 0): void {
    this.checkStopped("SET_VRING_ADDR");
    if (!this.num) throw new VhostError("EINVAL", "SET_VRING_NUM first");
    const err = checkQueueAddresses({ size: this.num, descAddr: desc, availAddr: avail, usedAddr: used }, this.memory.size);
    // vhost_vring_set_addr: misaligned -> EINVAL; outside the memory table -> EINVAL (vq_access_ok).
    if (err) throw new VhostError("EINVAL", err.message);
    // vhost_vring_set_addr: only VHOST_VRING_F_LOG is a known flag.
    if ((flags & ~1) !== 0) throw new VhostError("EOPNOTSUPP", `vring flags 0x${flags.toString(16)} (only VHOST_VRING_F_LOG)`);
    if (!Number.isSafeInteger(logGuestAddr) || logGuestAddr < 0) throw new VhostError("EINVAL", `log_guest_addr ${logGuestAddr}`);
    this.descAddr = desc;
    this.availAddr = avail;
    this.usedAddr = used;
    this.addrFlags = flags;
    this.logGuestAddr = logGuestAddr;
  }

  setVringBase(num: number): void {
    this.checkStopped("SET_VRING_BASE");
    if (!(Number.isInteger(num) && num >= 0 && num <= 0xffff)) throw new VhostError("EINVAL", `vring base ${num} > 0xffff`);
    this.base = num;
  }

  /**
   * VHOST_SET_VRING_KICK. A running loop moves to the new doorbell; on a ring that
   * GET_VRING_BASE stopped, a new kick restarts it at the current base (vhost-net's
   * vhost_vring_ioctl + handle_kick after a cancelled migration).
   */
  setVringKick(path: string): void {
    // Check and open the new doorbell before dropping the old one: a refused call changes nothing.
    if (path) this.checkUnder("kick doorbell", path);
    const next = path ? Doorbell.open(path) : null;
    const old = this.kick;
    this.kick = next;
    this.kickPath = path;
    // A loop sleeping on the old doorbell wakes (its wait is rejected) and re-reads it.
    old?.close();
    if (next && this.active && !this.active.isRunning && this.stoppedByGetBase) this.restart();
  }

  setVringCall(path: string): void {
    if (path) this.checkUnder("call doorbell", path);
    const next = path ? Doorbell.open(path) : null;
    this.call?.close();
    this.call = next;
    this.callPath = path;
  }

  setLogBase(path: string): void {
    this.checkUnder("dirty log", path);
    // Issue 16: the guest's memory is not a log (every log write would corrupt it).
    if (statSync(path).ino === statSync(this.memMap.path).ino) throw new VhostError("EINVAL", `dirty log ${path} is the VM's memory file`);
    const bytes = statSync(path).size;
    const need = DirtyLog.byteLength(this.memory.size);
    if (bytes < need) throw new VhostError("EINVAL", `dirty log ${path} has ${bytes} bytes, guest memory needs ${need}`);
    this.logMap?.unmap();
    this.logMap = mapFile(path, bytes);
    this.log = new DirtyLog(this.logMap.buffer, this.memory.size, { enabled: hasFeature(this.features, VHOST_F_LOG_ALL) });
    this.logPath = path;
    if (this.active) this.active.ringFlags = this.cringFlags();
  }

  private checkUnder(what: string, path: string): void {
    // The guest names files; only this host's shared memory may be opened.
    if (path.includes("\0") || !isUnder(this.shmDir, path)) {
      throw new VhostError("EINVAL", `${what} ${JSON.stringify(path.slice(0, 200))} is not under the host's shm directory ${this.shmDir}`);
    }
  }

  /**
   * VHOST_BLK_SET_BACKEND: attach the backend and start serving (vhost_vq_access_ok ->
   * EFAULT if the ring is not set up). Replaces a running backend after draining it.
   * The backend is the device's from here on, even when this throws.
   */
  async setBackend(backend: BlkBackend, mode: CompletionMode, ioband?: IobandBinding | null, cgroup = ""): Promise<void> {
    try {
      this.checkReady(mode);
      if (this.active) {
        if (this.active.isRunning) await this.active.stop(10_000);
        this.active.release(false);
        this.active = null;
      }
    } catch (e) {
      backend.close();
      throw e;
    }
    if (ioband !== undefined) this.iob = ioband;
    this.cgroup = cgroup;
    this.startQueue(backend, mode, "fresh");
  }

  /** A restarted worker: serve again on the existing ring, re-submitting what never completed. Returns the heads re-submitted. */
  resume(backend: BlkBackend, mode: CompletionMode, ioband: IobandBinding | null, cgroup: string): number {
    try {
      this.checkReady(mode);
    } catch (e) {
      backend.close();
      throw e;
    }
    this.iob = ioband;
    this.cgroup = cgroup;
    return this.startQueue(backend, mode, "recover");
  }

  private checkReady(mode: CompletionMode): void {
    if (!this.num || this.descAddr < 0) throw new VhostError("EFAULT", "the vring is not set up (SET_VRING_NUM / SET_VRING_ADDR first)");
    if (!this.kick) throw new VhostError("EFAULT", "no kick doorbell (SET_VRING_KICK first)");
    if (mode === "serialized" && !this.call) throw new VhostError("EFAULT", "no call doorbell (SET_VRING_CALL first)");
  }

  /** After GET_VRING_BASE: the same backend serves again from `base` (the drained completion ring is kept when the size did not change). */
  private restart(): void {
    const old = this.active;
    if (!old) return;
    this.checkReady(old.mode);
    old.release(true);
    this.active = null;
    this.startQueue(old.backend, old.mode, old.entries === this.num ? "reuse" : "fresh");
  }

  private startQueue(backend: BlkBackend, mode: CompletionMode, ring: RingStart): number {
    const queue: QueueConfig = {
      size: this.num,
      descAddr: this.descAddr,
      availAddr: this.availAddr,
      usedAddr: this.usedAddr,
      eventIdx: hasFeature(this.features, VIRTIO_F_EVENT_IDX),
      indirect: hasFeature(this.features, VIRTIO_F_INDIRECT_DESC),
      notifyOnEmpty: hasFeature(this.features, VIRTIO_F_NOTIFY_ON_EMPTY),
    };
    let q: ActiveQueue;
    try {
      q = new ActiveQueue({
        vm: this.vm,
        device: this.device,
        memory: this.memory,
        log: this.log,
        queue,
        base: this.base,
        limits: blkLimits(this.features, backend),
        backend,
        mode,
        files: this,
        ioband: this.iob,
        cringPath: this.cringPath,
        cringFlags: this.cringFlags(),
        ring,
        stats: this.stats,
        onNeedsReset: (reason) => this.needsReset(reason),
      });
    } catch (e) {
      backend.close();
      throw e;
    }
    this.active = q;
    this.stoppedByGetBase = false;
    this.resetReason = "";
    const resubmitted = q.start();
    this.persist();
    return resubmitted;
  }

  private needsReset(reason: string): void {
    if (!this.resetReason) this.resetReason = reason;
    this.onError(`vhost-blk ${this.vm}/${this.device}: NEEDS_RESET: ${reason}`);
  }

  /**
   * VHOST_GET_VRING_BASE: stops the ring, waits for every request in flight (ActiveQueue.stop)
   * and returns last_avail_idx, which becomes the base a later restart resumes at.
   */
  async stop(timeoutMs: number): Promise<number> {
    if (this.active) {
      this.base = await this.active.stop(timeoutMs);
      this.stoppedByGetBase = true;
    }
    return this.base;
  }

  /** What SaveDeviceState and the state file carry (persist.ts encodes it). Null without a backend. */
  setup(): DeviceSetup | null {
    const a = this.active;
    if (!a) return null;
    const be = a.backend;
    const backend: BackendSpec = { kind: be.kind, path: "path" in be && typeof be.path === "string" ? be.path : "", capacityBytes: be.capacityBytes };
    return {
      features: this.features,
      num: this.num,
      descAddr: this.descAddr,
      availAddr: this.availAddr,
      usedAddr: this.usedAddr,
      addrFlags: this.addrFlags,
      logGuestAddr: this.logGuestAddr,
      base: this.base,
      backend,
      mode: a.mode,
      cgroup: this.cgroup,
      serial: be.serial,
    };
  }

  /** Device state that lets a restarted worker serve the device again (removed at RESET_OWNER). */
  private persist(): void {
    const setup = this.setup();
    if (!setup) return;
    writeStateFile(this.statePath, { vm: this.vm, device: this.device, ...this.memoryInfo, kickPath: this.kickPath, callPath: this.callPath, logPath: this.logPath, setup });
  }

  counters(): DeviceStatsSnapshot {
    return { ...this.stats, needsReset: this.resetReason !== "", needsResetReason: this.resetReason };
  }

  /** RESET_OWNER / shutdown: stop, drain (bounded), release everything; `forget` removes the ring and state files. */
  async close(timeoutMs = 5000, forget = true): Promise<void> {
    if (this.active) {
      try {
        await this.active.stop(timeoutMs);
      } catch (e) {
        this.onError((e as Error).message);
      }
      this.active.release(false);
      this.active = null;
    }
    this.kick?.close();
    this.call?.close();
    this.kick = this.call = null;
    if (forget) {
      rmSync(this.cringPath, { force: true });
      rmSync(this.statePath, { force: true });
    }
    this.logMap?.unmap();
    this.logMap = null;
    this.log = null;
    this.memMap.unmap();
  }
}
