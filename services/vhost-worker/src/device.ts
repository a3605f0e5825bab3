// One vhost-blk device (one VM's virtio-blk, one request queue): the state the
// vhost ioctls of seed 000 set up, and the data path that serves it.
//
// Data path: woken by the kick doorbell, the worker pops chains (DeviceQueue, one
// DescriptorChain reused), checks header and request, and submits I/O straight
// into / out of guest memory on the backend. When the I/O finishes:
//  - parallel mode (the seed's design): the completion goes into the completion
//    ring, and the completion-thread service writes the status byte, adds the used
//    element and signals the guest;
//  - serialized mode (Liu Yuan's design before the seed): the worker does it inline.
// Per-head state lives in typed arrays sized at setup; the I/O callbacks are
// created once per head. Nothing is allocated or logged per request.
import { mkdirSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { context, trace, SpanKind, TraceFlags } from "@opentelemetry/api";
import { join } from "node:path";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import {
  ChainError,
  DeviceQueue,
  DirtyLog,
  GuestMemory,
  checkQueueAddresses,
  isValidQueueSize,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  type DescriptorChain,
  type MemoryAccessor,
} from "@virtmesh/virtqueue";
import {
  BLK_HDR_BYTES,
  CRING_F_EVENT_IDX,
  CRING_F_LOG_ALL,
  CompletionRing,
  COMPLETION_DOORBELL_OFFSET,
  DISCARD_WZ_SEG_BYTES,
  SECTOR_SIZE,
  TRACE_GUEST,
  INFLIGHT_SUBMITTED,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VHOST_F_LOG_ALL,
  blkTypeName,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  completionRingBytes,
  completionRingFileName,
  hasFeature,
} from "@virtmesh/virtio-blk";
import { FileBackend, MemoryBackend, NullBackend, type BlkBackend } from "./backend";
import type { IobandBinding } from "./ioband";
import { conductorFor, IobandSlot, type IobandConductor, type IobandIssuer } from "./iobandpath";

/** A control-plane refusal carrying the errno the vhost ioctl would return. */
export class VhostError extends Error {
  constructor(
    readonly errno: "EPERM" | "EBUSY" | "EINVAL" | "EOPNOTSUPP" | "ENOBUFS" | "EFAULT" | "ENOENT" | "ETIMEDOUT",
    message: string,
  ) {
    super(`${errno}: ${message}`);
  }
}

export type CompletionMode = "parallel" | "serialized";

/** Most data segments one request may carry (virtio-blk config seg_max). */
export const SEG_MAX = 64;
/** Most bytes one DISCARD / WRITE_ZEROES segment may cover (config max_*_sectors). */
export const MAX_ZEROES_BYTES = 64 << 20;
/** Most DISCARD / WRITE_ZEROES segments per request (config max_discard_seg). */
export const MAX_DISCARD_SEG = 16;

export interface DeviceStatsSnapshot {
  requests: number;
  kicks: number;
  interrupts: number;
  errors: number;
  needsReset: boolean;
  needsResetReason: string;
}

/** `<shmDir>/vhost-blk.<vm>.<device>.dev.json`: what a restarted worker needs to serve the device again. */
export function deviceStateFileName(vm: string, device: string): string {
  return `vhost-blk.${vm}.${device}.dev.json`;
}

export interface PersistedDevice {
  vm: string;
  device: string;
  memoryPath: string;
  memoryBytes: number;
  features: string;
  num: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  kickPath: string;
  callPath: string;
  logPath: string;
  backend: { kind: "file" | "null" | "memory"; path: string; capacityBytes: number };
  mode: CompletionMode;
}

export interface MemoryInfo {
  memoryPath: string;
  memoryBytes: number;
}

export class VhostBlkDevice implements IobandIssuer {
  features = 0n;
  num = 0;
  descAddr = -1;
  availAddr = -1;
  usedAddr = -1;
  base = 0;
  kickPath = "";
  callPath = "";
  logPath = "";
  mode: CompletionMode = "parallel";
  readonly cringPath: string;
  readonly statePath: string;

  private memMap: SharedMapping | null = null;
  private mem: GuestMemory | null = null;
  private logMap: SharedMapping | null = null;
  private log: DirtyLog | null = null;
  private kick: Doorbell | null = null;
  private call: Doorbell | null = null;
  private cringMap: SharedMapping | null = null;
  private cring: CompletionRing | null = null;
  private cringBell: Doorbell | null = null;
  private backend: BlkBackend | null = null;

  private q: DeviceQueue | null = null;
  private dev: MemoryAccessor | null = null;
  private chain: DescriptorChain | null = null;
  private running = false;
  private loop: Promise<void> | null = null;
  private inflight = 0;
  private drainWaiters: Array<() => void> = [];
  private resetReason = "";

  // Per-head request state (index = head).
  private hOps = new Uint16Array(0);
  private hStatus = new Uint8Array(0);
  private hUsedLen = new Uint32Array(0);
  private hStatusAddr = new Float64Array(0);
  private hWrite = new Uint8Array(0); // 1: OUT (data pages not dirtied by the device)
  private hSegs = new Uint8Array(0);
  private hSegAddr = new Float64Array(0); // [head * SEG_MAX + i]
  private hSegLen = new Uint32Array(0);
  private hT0 = new Float64Array(0); // pop time, for the span of a sampled request
  private hType = new Uint32Array(0);
  private hSector = new Float64Array(0);
  private hCb: Array<(err: NodeJS.ErrnoException | null, n: number) => void> = [];
  private readonly hdr = new Uint8Array(BLK_HDR_BYTES);
  private readonly hdrView = new DataView(this.hdr.buffer);

  private readonly stats = { requests: 0, kicks: 0, interrupts: 0, errors: 0 };

  // dm-ioband (issue 5): null when no ioband device is configured (the path is unchanged).
  private iob: IobandBinding | null = null;
  private conductor: IobandConductor | null = null;
  private hSlot: IobandSlot[] = [];
  private hIob = new Uint8Array(0); // 1: submitted to the ioband device, complete() owed
  /** "queued-block": this device's group is full, popping waits (g_should_block). */
  private iobandBlocked = false;
  /** unblock() ran: the loop must drain once, which re-enables notifications (they stayed off while blocked). */
  private iobandResume = false;

  constructor(
    readonly vm: string,
    readonly device: string,
    readonly shmDir: string,
    readonly offered: bigint,
    private readonly onError: (msg: string) => void,
  ) {
    this.cringPath = join(shmDir, completionRingFileName(vm, device, 0));
    this.statePath = join(shmDir, deviceStateFileName(vm, device));
  }

  get memory(): GuestMemory | null {
    return this.mem;
  }
  get isRunning(): boolean {
    return this.running;
  }
  /** The ioband device this VM device's requests are scheduled on, if any. */
  get ioband(): IobandBinding | null {
    return this.iob;
  }

  /** Set before the queue starts (BLK_SET_BACKEND, restore): null = no scheduling. */
  private setIoband(b: IobandBinding | null): void {
    if (this.iob !== null && this.iob !== b) this.conductor!.forget(this);
    this.iob = b;
    this.conductor = b === null ? null : conductorFor(b.ioband);
    this.iobandBlocked = false;
  }

  /** VHOST_SET_OWNER: map the VM's guest memory (the ioctl's mm, here the sidecar's file). */
  attachMemory(info: MemoryInfo): void {
    this.checkUnder("memory", info.memoryPath);
    const map = mapFile(info.memoryPath, info.memoryBytes);
    this.memMap = map;
    this.mem = new GuestMemory(map.buffer, { size: info.memoryBytes });
  }

  setFeatures(f: bigint): void {
    // Seed: "if (features & ~VHOST_BLK_FEATURES) return -EOPNOTSUPP;"
    const extra = f & ~this.offered;
    if (extra !== 0n) throw new VhostError("EOPNOTSUPP", `features 0x${extra.toString(16)} are not offered (offered 0x${this.offered.toString(16)})`);
    this.features = f;
    // VHOST_F_LOG_ALL "can be changed while device is active".
    const logAll = hasFeature(f, VHOST_F_LOG_ALL);
    if (this.log) this.log.enabled = logAll;
    if (this.cring) this.cring.flags = this.cringFlags();
    if (this.running) this.persist();
  }

  private cringFlags(): number {
    return (hasFeature(this.features, VIRTIO_F_EVENT_IDX) ? CRING_F_EVENT_IDX : 0) | (hasFeature(this.features, VHOST_F_LOG_ALL) && this.logPath ? CRING_F_LOG_ALL : 0);
  }

  private checkStopped(what: string): void {
    // vhost_vring_ioctl: -EBUSY while a backend is attached (private_data set).
    if (this.running) throw new VhostError("EBUSY", `${what} while the ring is running (GET_VRING_BASE or RESET_OWNER first)`);
  }

  setVringNum(num: number): void {
    this.checkStopped("SET_VRING_NUM");
    if (!isValidQueueSize(num)) throw new VhostError("EINVAL", `ring size ${num} is not a power of 2 in [1, 32768] (virtio 1.2 §2.7)`);
    this.num = num;
  }

  setVringAddr(desc: number, avail: number, used: number): void {
    this.checkStopped("SET_VRING_ADDR");
    if (!this.num) throw new VhostError("EINVAL", "SET_VRING_NUM first");
    const err = checkQueueAddresses({ size: this.num, descAddr: desc, availAddr: avail, usedAddr: used }, this.mem!.size);
    // vhost_vring_set_addr: misaligned -> EINVAL; outside the memory table -> EINVAL (vq_access_ok).
    if (err) throw new VhostError("EINVAL", err.message);
    this.descAddr = desc;
    this.availAddr = avail;
    this.usedAddr = used;
  }

  setVringBase(num: number): void {
    this.checkStopped("SET_VRING_BASE");
    if (!(num >= 0 && num <= 0xffff)) throw new VhostError("EINVAL", `vring base ${num} > 0xffff`);
    this.base = num;
  }

  setVringKick(path: string): void {
    // Check and open the new doorbell before dropping the old one: a refused call changes nothing.
    if (path) this.checkUnder("kick doorbell", path);
    const next = path ? Doorbell.open(path) : null;
    const old = this.kick;
    this.kick = next;
    this.kickPath = path;
    // A loop sleeping on the old doorbell wakes (its wait is rejected) and moves to the new one.
    old?.close();
    if (!next && this.running) this.running = false;
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
    const bytes = statSync(path).size;
    const need = DirtyLog.byteLength(this.mem!.size);
    if (bytes < need) throw new VhostError("EINVAL", `dirty log ${path} has ${bytes} bytes, guest memory needs ${need}`);
    this.logMap?.unmap();
    this.logMap = mapFile(path, bytes);
    this.log = new DirtyLog(this.logMap.buffer, this.mem!.size, { enabled: hasFeature(this.features, VHOST_F_LOG_ALL) });
    this.logPath = path;
    if (this.cring) this.cring.flags = this.cringFlags();
  }

  private checkUnder(what: string, path: string): void {
    // The guest names files; only this host's shared memory may be opened.
    if (!path.startsWith(this.shmDir + "/") || path.includes("/../") || path.includes("\0")) {
      throw new VhostError("EINVAL", `${what} ${JSON.stringify(path)} is not under the host's shm directory ${this.shmDir}`);
    }
  }

  /**
   * VHOST_BLK_SET_BACKEND: attach the backend and start serving (vhost_vq_access_ok
   * -> EFAULT if the ring is not set up). Replaces a running backend after draining it.
   */
  async setBackend(backend: BlkBackend, mode: CompletionMode, ioband?: IobandBinding | null): Promise<void> {
    if (!this.num || this.descAddr < 0) throw new VhostError("EFAULT", "the vring is not set up (SET_VRING_NUM / SET_VRING_ADDR first)");
    if (!this.kick) throw new VhostError("EFAULT", "no kick doorbell (SET_VRING_KICK first)");
    if (mode === "serialized" && !this.call) throw new VhostError("EFAULT", "no call doorbell (SET_VRING_CALL first)");
    if (this.running) await this.stop(10_000);
    this.backend?.close();
    this.backend = backend;
    this.mode = mode;
    if (ioband !== undefined) this.setIoband(ioband);
    this.startQueue(false);
    this.persist();
  }

  /**
   * Starts serving. resume=false: a fresh completion ring (BLK_SET_BACKEND).
   * resume=true (a restarted worker): reattach to the existing ring, resume at the
   * inflight region's last_avail_idx and re-submit every head it says was popped
   * but whose completion is not in the ring yet.
   */
  private startQueue(resume: boolean): number {
    const mem = this.mem!;
    const cfg = {
      size: this.num,
      descAddr: this.descAddr,
      availAddr: this.availAddr,
      usedAddr: this.usedAddr,
      eventIdx: hasFeature(this.features, VIRTIO_F_EVENT_IDX),
      indirect: hasFeature(this.features, VIRTIO_F_INDIRECT_DESC),
      notifyOnEmpty: hasFeature(this.features, VIRTIO_F_NOTIFY_ON_EMPTY),
    };
    // The device writes (status byte, used ring, IN data) go to the device dirty log.
    const logged = new GuestMemory(mem.buffer, { size: mem.size, deviceLog: this.log });
    if (resume) this.openExistingRing();
    else this.openCompletionRing();
    this.q = new DeviceQueue(logged, cfg, { lastAvailIdx: resume ? this.cring!.lastAvailIdx : this.base });
    this.dev = logged.device;
    this.chain = this.q.newChain();
    this.resetReason = "";
    const n = this.num;
    if (this.hOps.length !== n) {
      this.hOps = new Uint16Array(n);
      this.hStatus = new Uint8Array(n);
      this.hUsedLen = new Uint32Array(n);
      this.hStatusAddr = new Float64Array(n);
      this.hWrite = new Uint8Array(n);
      this.hSegs = new Uint8Array(n);
      this.hSegAddr = new Float64Array(n * SEG_MAX);
      this.hSegLen = new Uint32Array(n * SEG_MAX);
      this.hT0 = new Float64Array(n);
      this.hType = new Uint32Array(n);
      this.hSector = new Float64Array(n);
      this.hCb = [];
      for (let h = 0; h < n; h++) this.hCb.push((err, bytes) => this.segDone(h, err, bytes));
      this.hIob = new Uint8Array(n);
      this.hSlot = [];
      for (let h = 0; h < n; h++) this.hSlot.push(new IobandSlot(this, h));
    }
    // A queue restarted after GET_VRING_BASE starts unblocked (its held requests drained in stop()).
    if (this.iobandBlocked) this.conductor?.forget(this);
    this.iobandBlocked = this.iobandResume = false;
    const resubmitted = resume ? this.recoverInflight() : 0;
    this.running = true;
    this.loop = this.kickLoop();
    return resubmitted;
  }

  private openExistingRing(): void {
    this.closeCompletionRing();
    const map = mapFile(this.cringPath, statSync(this.cringPath).size);
    this.cringMap = map;
    this.cring = CompletionRing.open(map.buffer);
    if (this.cring.entries !== this.num) throw new Error(`completion ring ${this.cringPath} has ${this.cring.entries} entries, the vring ${this.num}`);
    this.cringBell = Doorbell.attach(map, COMPLETION_DOORBELL_OFFSET, false);
  }

  /** vhost-user inflight recovery: heads at SUBMITTED whose completion never reached the ring are submitted again. */
  /** What the last resume found in the inflight region (logged by the worker). */
  readonly recovered = { submitted: 0, pushed: 0, pushedNotMarked: 0, ringPending: 0, lastAvailIdx: 0, usedIdx: 0 };

  private recoverInflight(): number {
    const ring = this.cring!;
    for (let h = 0; h < this.num; h++) {
      const st = ring.inflightState(h);
      if (st === INFLIGHT_SUBMITTED) this.recovered.submitted++;
      else if (st !== 0) this.recovered.pushed++;
    }
    this.recovered.ringPending = ring.pending;
    this.recovered.lastAvailIdx = ring.lastAvailIdx;
    this.recovered.usedIdx = this.q!.usedIdx;
    const q = this.q!;
    const chain = this.chain!;
    let n = 0;
    for (let h = 0; h < this.num; h++) {
      if (ring.inflightState(h) !== INFLIGHT_SUBMITTED) continue;
      if (ring.hasPendingCompletion(h)) {
        ring.markPushed(h); // died between the push and the state change
        this.recovered.pushedNotMarked++;
        continue;
      }
      if (this.mode === "serialized") {
        // Serialized mode keeps no commit record (the pre-seed design): only resubmit parallel-mode heads.
        continue;
      }
      const r = q.walkChain(h, chain);
      if (r instanceof ChainError) {
        this.needsReset(r.message);
        break;
      }
      n++;
      this.handleRequest(q, r);
    }
    return n;
  }

  /** Device state that lets a restarted worker serve the device again (removed at RESET_OWNER). */
  private persist(): void {
    if (!this.backend) return;
    const st: PersistedDevice = {
      vm: this.vm,
      device: this.device,
      memoryPath: this.memMap!.path,
      memoryBytes: this.mem!.size,
      features: this.features.toString(16),
      num: this.num,
      descAddr: this.descAddr,
      availAddr: this.availAddr,
      usedAddr: this.usedAddr,
      kickPath: this.kickPath,
      callPath: this.callPath,
      logPath: this.logPath,
      backend: { kind: this.backend.kind, path: this.backend instanceof FileBackend ? this.backend.path : "", capacityBytes: this.backend.capacityBytes },
      mode: this.mode,
    };
    const tmp = `${this.statePath}.tmp`;
    writeFileSync(tmp, JSON.stringify(st), { mode: 0o600 });
    renameSync(tmp, this.statePath);
  }

  /** A restarted worker: rebuild the device from its persisted state and resume serving. Returns heads resubmitted. */
  static restore(
    st: PersistedDevice,
    shmDir: string,
    offered: bigint,
    onError: (msg: string) => void,
    ioband: IobandBinding | null = null,
  ): { dev: VhostBlkDevice; resubmitted: number } {
    const d = new VhostBlkDevice(st.vm, st.device, shmDir, offered, onError);
    try {
      d.attachMemory({ memoryPath: st.memoryPath, memoryBytes: st.memoryBytes });
      d.features = BigInt(`0x${st.features}`);
      d.num = st.num;
      d.descAddr = st.descAddr;
      d.availAddr = st.availAddr;
      d.usedAddr = st.usedAddr;
      d.setVringKick(st.kickPath);
      d.setVringCall(st.callPath);
      if (st.logPath) d.setLogBase(st.logPath);
      d.backend = st.backend.kind === "file" ? new FileBackend(st.backend.path) : st.backend.kind === "null" ? new NullBackend(st.backend.capacityBytes, st.vm) : new MemoryBackend(st.backend.capacityBytes, st.vm);
      d.mode = st.mode;
      d.setIoband(ioband);
      const resubmitted = d.startQueue(true);
      return { dev: d, resubmitted };
    } catch (e) {
      void d.close(0, false);
      throw e;
    }
  }

  private openCompletionRing(): void {
    this.closeCompletionRing();
    rmSync(this.cringPath, { force: true });
    mkdirSync(this.shmDir, { recursive: true });
    const map = mapFile(this.cringPath, completionRingBytes(this.num), { create: true, mode: 0o600 });
    this.cringMap = map;
    this.cring = CompletionRing.init(map.buffer, { size: this.num, descAddr: this.descAddr, availAddr: this.availAddr, usedAddr: this.usedAddr }, this.cringFlags());
    this.cringBell = Doorbell.attach(map, COMPLETION_DOORBELL_OFFSET, true);
  }

  private closeCompletionRing(): void {
    this.cringBell?.close();
    this.cringBell = null;
    this.cringMap?.unmap();
    this.cringMap = null;
    this.cring = null;
  }

  /** The worker loop (vhost_blk_handle_guest_kick): pop until empty, then sleep on the kick doorbell. */
  private async kickLoop(): Promise<void> {
    const q = this.q!;
    // Held by "queued-block": sleep until unblock() rings the kick doorbell.
    const check = (): boolean => !this.running || (!this.iobandBlocked && (this.iobandResume || q.hasPending()));
    while (this.running) {
      this.iobandResume = false;
      this.drainAvail(q);
      const kick = this.kick;
      if (!this.running || !kick) break;
      // A rejected wait means the doorbell was replaced or closed: loop and re-read it.
      await kick.spinThenWait(check, { maxSpinUs: 20 }).catch(() => undefined);
      this.stats.kicks++;
    }
  }

  private drainAvail(q: DeviceQueue): void {
    const chain = this.chain!;
    q.disableNotifications();
    for (;;) {
      while (this.running && !this.iobandBlocked) {
        const r = q.pop(chain);
        if (r === null) break;
        if (r instanceof ChainError) {
          // A chain that breaks §2.7 (address outside guest memory, loop, ...): like
          // QEMU's virtio_error, the device enters NEEDS_RESET and stops serving this
          // queue; every other device keeps running.
          q.enterNeedsReset(r);
          this.needsReset(r.message);
          return;
        }
        const ring = this.cring!;
        // Already ours: a restarted worker re-popped a head it had recorded (or a guest
        // put a head in flight twice, §2.7.13.2 forbids it). Not submitted again.
        if (ring.inflightState(r.head) !== 0) continue;
        ring.markSubmitted(r.head, q.lastAvailIdx);
        this.handleRequest(q, r);
      }
      // Blocked: notifications stay off, the guest need not kick; unblock() resumes.
      if (!this.running || this.iobandBlocked) return;
      // vhost_enable_notify: re-check after re-enabling so no kick is lost.
      if (!q.enableNotifications()) return;
      q.disableNotifications();
    }
  }

  private needsReset(reason: string): void {
    if (!this.resetReason) this.resetReason = reason;
    this.stats.errors++;
    this.running = false;
    this.onError(`vhost-blk ${this.vm}/${this.device}: NEEDS_RESET: ${reason}`);
    this.checkDrained();
  }

  private handleRequest(q: DeviceQueue, c: DescriptorChain): void {
    const head = c.head;
    this.stats.requests++;
    // §5.2.6: the status byte is the last device-writable byte. QEMU's
    // virtio_blk_handle_request: "virtio-blk request inhdr too short" -> virtio_error.
    let last = c.count - 1;
    while (last >= c.readableCount && c.len[last] === 0) last--;
    if (c.writableBytes < 1 || last < c.readableCount) return this.needsReset(`head ${head}: no device-writable status byte`);
    // Seed: "Bad block header length" (vq_err); QEMU: "virtio-blk request outhdr too short" -> virtio_error.
    if (c.readableBytes < BLK_HDR_BYTES) return this.needsReset(`head ${head}: request header of ${c.readableBytes} bytes, need ${BLK_HDR_BYTES} (§5.2.6)`);
    q.readChain(c, this.hdr);
    const type = this.hdrView.getUint32(0, true);
    const sector = this.hdrView.getUint32(8, true) + this.hdrView.getUint32(12, true) * 0x1_0000_0000;
    const statusAddr = c.addr[last]! + c.len[last]! - 1;
    this.hStatusAddr[head] = statusAddr;
    this.hT0[head] = performance.now();
    this.hType[head] = type;
    this.hSector[head] = sector;
    this.hStatus[head] = VIRTIO_BLK_S_OK;
    this.hOps[head] = 0;
    this.hSegs[head] = 0;
    this.hWrite[head] = 0;
    this.inflight++;
    const be = this.backend!;

    switch (type) {
      case VIRTIO_BLK_T_IN:
      case VIRTIO_BLK_T_OUT: {
        const isWrite = type === VIRTIO_BLK_T_OUT;
        // IN: data = writable bytes minus the status byte; OUT: readable bytes after the header.
        const dataBytes = isWrite ? c.readableBytes - BLK_HDR_BYTES : c.writableBytes - 1;
        this.hUsedLen[head] = isWrite ? 1 : dataBytes + 1;
        const pos = sector * SECTOR_SIZE;
        // §5.2.6.1: data is a multiple of 512 bytes; a request past the capacity fails with IOERR.
        if (dataBytes % SECTOR_SIZE !== 0 || dataBytes === 0 || pos + dataBytes > be.capacityBytes || sector > Number.MAX_SAFE_INTEGER / SECTOR_SIZE) {
          this.hUsedLen[head] = 1;
          return this.complete(head, VIRTIO_BLK_S_IOERR);
        }
        if (!this.collectSegments(c, head, isWrite)) {
          this.hUsedLen[head] = 1;
          return this.complete(head, VIRTIO_BLK_S_IOERR);
        }
        this.hWrite[head] = isWrite ? 1 : 0;
        this.hOps[head] = this.hSegs[head]!;
        if (this.iob !== null) return this.submitIoband(head, dataBytes, false);
        return this.issue(head);
      }
      case VIRTIO_BLK_T_FLUSH:
        this.hUsedLen[head] = 1;
        this.hOps[head] = 1;
        // A flush is urgent for dm-ioband (g_urgent_bios): it never waits behind the throttle.
        if (this.iob !== null) return this.submitIoband(head, 0, true);
        return this.issue(head);
      case VIRTIO_BLK_T_GET_ID: {
        // §5.2.6: up to VIRTIO_BLK_ID_BYTES of serial into the data buffer.
        const room = c.writableBytes - 1;
        const n = Math.min(room, VIRTIO_BLK_ID_BYTES);
        const written = q.writeChain(c, n === VIRTIO_BLK_ID_BYTES ? be.serial : be.serial.subarray(0, n));
        this.hUsedLen[head] = written + 1;
        return this.complete(head, VIRTIO_BLK_S_OK);
      }
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES:
        this.hUsedLen[head] = 1;
        // §5.2.6.2: only with VIRTIO_BLK_F_DISCARD / VIRTIO_BLK_F_WRITE_ZEROES negotiated.
        if (!hasFeature(this.features, type === VIRTIO_BLK_T_DISCARD ? VIRTIO_BLK_F_DISCARD : VIRTIO_BLK_F_WRITE_ZEROES)) return this.complete(head, VIRTIO_BLK_S_UNSUPP);
        return this.complete(head, this.discardOrZero(q, c, type, be));
      default:
        // §5.2.6.1: "the device MUST set the status byte to VIRTIO_BLK_S_UNSUPP"
        // for a type it does not offer (the seed discarded the chain instead).
        this.hUsedLen[head] = 1;
        return this.complete(head, VIRTIO_BLK_S_UNSUPP);
    }
  }

  /** Hands a checked IN/OUT/FLUSH request to the backend (hType, segments and hOps are set). */
  private issue(head: number): void {
    const be = this.backend!;
    const cb = this.hCb[head]!;
    if (this.hType[head] === VIRTIO_BLK_T_FLUSH) return be.flush(cb);
    const isWrite = this.hWrite[head] === 1;
    const nseg = this.hSegs[head]!;
    const bytes = this.mem!.bytes;
    let p = this.hSector[head]! * SECTOR_SIZE;
    for (let i = 0; i < nseg; i++) {
      const a = this.hSegAddr[head * SEG_MAX + i]!;
      const l = this.hSegLen[head * SEG_MAX + i]!;
      if (isWrite) be.write(bytes, a, l, p, cb);
      else be.read(bytes, a, l, p, cb);
      p += l;
    }
  }

  /**
   * ioband_map(): the request goes to its cgroup's group on the ioband device; it is
   * issued now ("dispatch", "urgent") or held until the conductor lets it go.
   */
  private submitIoband(head: number, bytes: number, urgent: boolean): void {
    const b = this.iob!;
    const slot = this.hSlot[head]!;
    slot.bytes = bytes;
    slot.cgroupId = b.cgroupId; // read per request: a move (AttachDevice) updates it in place
    slot.urgent = urgent;
    this.hIob[head] = 1;
    const r = b.ioband.submit(slot, b.head);
    if (r === "dispatch" || r === "urgent") return this.issue(head);
    if (r === "queued-block") {
      this.iobandBlocked = true;
      this.conductor!.block(this);
    }
    this.conductor!.pump();
  }

  /** The conductor lets a held request of this device go. */
  issueHeld(head: number): void {
    if (this.backend === null) {
      // Closed under it (a drain that timed out): nothing to issue to; give the slot back.
      this.hIob[head] = 0;
      this.iob?.ioband.complete(this.hSlot[head]!);
      return;
    }
    this.issue(head);
  }

  /** The group has room again: pop the ring again (the loop sleeps on the kick doorbell). */
  unblock(): void {
    if (!this.iobandBlocked) return;
    this.iobandBlocked = false;
    this.iobandResume = true;
    this.kick?.ring();
  }

  /** Data ranges of an IN/OUT request, skipping the header (OUT) or the status byte (IN). */
  private collectSegments(c: DescriptorChain, head: number, isWrite: boolean): boolean {
    let skip = isWrite ? BLK_HDR_BYTES : 0;
    let remaining = isWrite ? c.readableBytes - BLK_HDR_BYTES : c.writableBytes - 1;
    const from = isWrite ? 0 : c.readableCount;
    const to = isWrite ? c.readableCount : c.count;
    let n = 0;
    for (let i = from; i < to && remaining > 0; i++) {
      let a = c.addr[i]!;
      let l = c.len[i]!;
      if (skip >= l) {
        skip -= l;
        continue;
      }
      a += skip;
      l -= skip;
      skip = 0;
      if (l > remaining) l = remaining;
      if (n >= SEG_MAX) return false; // more than seg_max segments
      this.hSegAddr[head * SEG_MAX + n] = a;
      this.hSegLen[head * SEG_MAX + n] = l;
      n++;
      remaining -= l;
    }
    this.hSegs[head] = n;
    return true;
  }

  private discardOrZero(q: DeviceQueue, c: DescriptorChain, type: number, be: BlkBackend): number {
    const payload = c.readableBytes - BLK_HDR_BYTES;
    // §5.2.6: the data is an array of struct virtio_blk_discard_write_zeroes.
    if (payload <= 0 || payload % DISCARD_WZ_SEG_BYTES !== 0 || payload / DISCARD_WZ_SEG_BYTES > MAX_DISCARD_SEG) return VIRTIO_BLK_S_IOERR;
    const segs = payload / DISCARD_WZ_SEG_BYTES;
    const dv = this.hdrView;
    for (let i = 0; i < segs; i++) {
      q.readChain(c, this.hdr, BLK_HDR_BYTES + i * DISCARD_WZ_SEG_BYTES);
      const sector = dv.getUint32(0, true) + dv.getUint32(4, true) * 0x1_0000_0000;
      const count = dv.getUint32(8, true);
      const flags = dv.getUint32(12, true);
      // §5.2.6.2: DISCARD with the unmap flag set, or unknown flags -> UNSUPP.
      if ((type === VIRTIO_BLK_T_DISCARD && flags !== 0) || (flags & ~1) !== 0) return VIRTIO_BLK_S_UNSUPP;
      const pos = sector * SECTOR_SIZE;
      const len = count * SECTOR_SIZE;
      if (len > MAX_ZEROES_BYTES || pos + len > be.capacityBytes) return VIRTIO_BLK_S_IOERR;
    }
    try {
      for (let i = 0; i < segs; i++) {
        q.readChain(c, this.hdr, BLK_HDR_BYTES + i * DISCARD_WZ_SEG_BYTES);
        const sector = dv.getUint32(0, true) + dv.getUint32(4, true) * 0x1_0000_0000;
        // DISCARD zeroes too: a later read returning zeros is allowed, and it is deterministic.
        be.zeroSync(sector * SECTOR_SIZE, dv.getUint32(8, true) * SECTOR_SIZE);
      }
    } catch {
      return VIRTIO_BLK_S_IOERR;
    }
    return VIRTIO_BLK_S_OK;
  }

  /** One backend operation of `head` finished (the seed's io_event). */
  private segDone(head: number, err: NodeJS.ErrnoException | null, bytes: number): void {
    if (err) this.hStatus[head] = VIRTIO_BLK_S_IOERR;
    else if (this.hSegs[head]! > 0) {
      // Short I/O is a failed request; the segment lengths are bounded by the checks above.
      // (bytes is compared per op only in total; a short read of a sparse file cannot happen inside capacity.)
      if (bytes <= 0) this.hStatus[head] = VIRTIO_BLK_S_IOERR;
    }
    if (--this.hOps[head]! > 0) return;
    if (this.hWrite[head] === 0 && this.log !== null && this.log.enabled) {
      // IN data landed in guest memory behind the accessor's back: log it (VHOST_F_LOG_ALL).
      for (let i = 0; i < this.hSegs[head]!; i++) this.log.markRange(this.hSegAddr[head * SEG_MAX + i]!, this.hSegLen[head * SEG_MAX + i]!);
    }
    this.complete(head, this.hStatus[head]!);
  }

  private complete(head: number, status: number): void {
    if (status !== VIRTIO_BLK_S_OK) this.stats.errors++;
    // Sampled requests only: the guest put its span context in this head's trace slot.
    if (this.cring !== null && this.cring.traceState(head) === TRACE_GUEST) this.traceRequest(head, status);
    if (this.mode === "parallel" && this.cring) {
      this.cring.push(head, status, this.hUsedLen[head]!, this.hStatusAddr[head]!);
      this.cring.markPushed(head);
      this.cringBell!.ring();
    } else {
      // Serialized: set_status + vhost_add_used_and_signal inline.
      const q = this.q!;
      this.dev!.writeU8(this.hStatusAddr[head]!, status);
      this.cring?.markFree(head);
      q.addUsed(head, this.hUsedLen[head]!);
      if (q.needsInterrupt()) {
        this.stats.interrupts++;
        this.call?.ring();
      }
    }
    this.inflight--;
    if (this.hIob[head] === 1) {
      // ioband_end_io(): the slot is free again, and the completion may let held requests go.
      this.hIob[head] = 0;
      this.iob!.ioband.complete(this.hSlot[head]!);
      this.conductor!.pump();
    }
    this.checkDrained();
  }

  /** The worker's span for one sampled request: from pop to I/O completion, child of the guest's span. */
  private traceRequest(head: number, status: number): void {
    const ring = this.cring!;
    const t = ring.readTrace(head);
    const parent = trace.setSpanContext(context.active(), { traceId: t.traceId, spanId: t.guestSpanId, traceFlags: t.traceFlags || TraceFlags.SAMPLED, isRemote: true });
    const span = trace.getTracer("virtmesh.vhost-blk").startSpan(
      `vhost-blk ${blkTypeName(this.hType[head]!)}`,
      {
        kind: SpanKind.SERVER,
        startTime: performance.timeOrigin + this.hT0[head]!,
        attributes: { "virtio.vm": this.vm, "virtio.device": this.device, "virtio.head": head, "virtio_blk.sector": this.hSector[head]!, "virtio_blk.status": status, "vhost.completion_mode": this.mode },
      },
      parent,
    );
    span.end();
    ring.writeWorkerSpan(head, span.spanContext().spanId);
  }

  private checkDrained(): void {
    if (this.drainWaiters.length && this.inflight === 0 && (!this.cring || this.cring.pending === 0)) {
      const w = this.drainWaiters;
      this.drainWaiters = [];
      for (const f of w) f();
    }
  }

  /**
   * Stops popping, waits for every request in flight to complete (in parallel mode:
   * until the completion-thread has consumed the ring) and returns last_avail_idx.
   * VHOST_GET_VRING_BASE.
   */
  async stop(timeoutMs: number): Promise<number> {
    this.running = false;
    this.kick?.ring(); // wake the loop if it sleeps
    if (this.loop) await this.loop;
    this.loop = null;
    const deadline = Date.now() + timeoutMs;
    while (this.inflight > 0 || (this.cring !== null && this.cring.pending > 0)) {
      if (Date.now() > deadline) {
        throw new VhostError("ETIMEDOUT", `${this.inflight} requests in flight and ${this.cring?.pending ?? 0} completions not consumed after ${timeoutMs} ms (is the completion-thread attached?)`);
      }
      await new Promise<void>((r) => {
        this.drainWaiters.push(r);
        setTimeout(r, 5);
      });
    }
    const idx = this.q ? this.q.lastAvailIdx : this.base;
    this.base = idx;
    return idx;
  }

  snapshot(): DeviceStatsSnapshot {
    return { ...this.stats, needsReset: this.resetReason !== "", needsResetReason: this.resetReason };
  }

  /** RESET_OWNER / shutdown: stop, drain (bounded), release everything. */
  async close(timeoutMs = 5000, forget = true): Promise<void> {
    try {
      await this.stop(timeoutMs);
    } catch (e) {
      this.onError((e as Error).message);
    }
    this.backend?.close();
    this.backend = null;
    // The binding stays on the (discarded) device: a completion that arrives after a timed-out
    // drain still gives its slot back to the share.
    this.conductor?.forget(this);
    this.kick?.close();
    this.call?.close();
    this.kick = this.call = null;
    this.closeCompletionRing();
    if (forget) {
      rmSync(this.cringPath, { force: true });
      rmSync(this.statePath, { force: true });
    }
    this.logMap?.unmap();
    this.logMap = null;
    this.log = null;
    this.q = null;
    this.mem = null;
    this.memMap?.unmap();
    this.memMap = null;
  }
}
