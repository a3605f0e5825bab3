// The guest's virtio-blk front end (drivers/block/virtio_blk.c) on the
// virtqueue library: struct virtio_blk_req in guest memory (header, data, status
// byte), one chain per request (indirect when negotiated), kicks only when
// EVENT_IDX / NO_NOTIFY say the device sleeps, and an interrupt loop that sleeps on
// the call doorbell and re-enables callbacks the §2.7.14 way.
//
// Requests are identified by a slot (0..slots-1) the caller owns: each slot has a
// fixed header/status area; segment descriptors are preallocated per slot, so
// submitting allocates nothing.
//
// Every vCPU thread has its own VirtioBlkDriver over the same queue: the queue's
// driver state and the head<->slot maps live in the guest kernel's shared
// memory (GuestKernel), and, as in virtio_blk.c, the queue's spinlock (vq->lock)
// is held around virtqueue_add, virtqueue_kick_prepare and the interrupt
// handler's get_buf loop. The configured lock (ticket or queue, PV or not) is
// what `virtmesh fio --numjobs` with more vCPUs than host cores contends on.
import type { GuestLock } from "@virtmesh/qspinlock";
import type { Doorbell } from "@virtmesh/shm";
import type { CompletionRing } from "@virtmesh/virtio-blk";
import type { BufferSegment, DriverQueue, GuestMemory } from "@virtmesh/virtqueue";
import * as Kernel from "./kernel";
import type { GuestKernel } from "./kernel";
import {
  BLK_HDR_BYTES,
  DISCARD_WZ_SEG_BYTES,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  writeBlkHeader,
  writeDiscardSegment,
} from "@virtmesh/virtio-blk";

/** Per-slot request area: header at +0, discard segment at +16, status byte at +32. */
export const REQ_AREA_STRIDE = 64;

interface SlotSegs {
  hdr: BufferSegment;
  data: BufferSegment;
  status: BufferSegment;
  disc: BufferSegment;
  rHdr: BufferSegment[];
  rHdrData: BufferSegment[];
  rHdrDisc: BufferSegment[];
  wStatus: BufferSegment[];
  wDataStatus: BufferSegment[];
}

// A module-local copy: imported bindings are getters once transpiled to CommonJS.
const { CTL_COMPLETED } = Kernel;

export type CompletionHandler = (slot: number, status: number, usedLen: number) => void;

export class VirtioBlkDriver {
  readonly slots: number;
  onComplete: CompletionHandler = () => undefined;
  irqs = 0;
  kicks = 0;
  /** Used elements taken back by any vCPU (progress, for the RunFio watchdog). */
  get completed(): number {
    return Atomics.load(this.kernelCtl, CTL_COMPLETED);
  }
  private readonly kernelCtl: Int32Array;
  private readonly segs: SlotSegs[] = [];
  private readonly headToSlot: Int32Array;
  private readonly slotHead: Int32Array;
  private readonly slotTraced: Int32Array;
  /** The host's per-head trace slots (in the completion ring file), or null. */
  traceRing: CompletionRing | null = null;
  /** Requests this vCPU queued since its last notify(). */
  private unnotified = 0;
  private nextTraceId = "";
  private nextSpanId = "";
  private nextTraceFlags = 0;
  private running = false;
  private parked: Promise<void> | null = null;
  private unparkNow: () => void = () => undefined;
  /** The VM is paused (migration): no CPU takes interrupts; completions stay in the used ring. */
  private frozen: Promise<void> | null = null;
  private thawNow: () => void = () => undefined;
  private loop: Promise<void> | null = null;
  private error: Error | null = null;

  /**
   * @param kernel the guest kernel memory holding the queue's shared driver state
   * @param cpu the vCPU this object runs on (its lock queue node and statistics)
   * @param lock vq->lock; every VirtioBlkDriver of the queue must use the same one
   * @param call the interrupt doorbell (the vCPU sleeps on it and takes interrupts), or null
   */
  constructor(
    readonly mem: GuestMemory,
    readonly dq: DriverQueue,
    private readonly kick: Doorbell,
    private readonly call: Doorbell | null,
    readonly reqArea: number,
    slots: number,
    kernel: GuestKernel,
    readonly cpu: number,
    public lock: GuestLock,
  ) {
    this.slots = slots;
    this.headToSlot = kernel.headToSlot;
    this.slotHead = kernel.slotHead;
    this.slotTraced = kernel.slotTraced;
    this.kernelCtl = kernel.ctl;
    for (let s = 0; s < slots; s++) {
      const base = reqArea + s * REQ_AREA_STRIDE;
      const hdr = { addr: base, len: BLK_HDR_BYTES };
      const disc = { addr: base + 16, len: DISCARD_WZ_SEG_BYTES };
      const status = { addr: base + 32, len: 1 };
      const data = { addr: 0, len: 0 };
      this.segs.push({ hdr, data, status, disc, rHdr: [hdr], rHdrData: [hdr, data], rHdrDisc: [hdr, disc], wStatus: [status], wDataStatus: [data, status] });
    }
  }

  statusAddr(slot: number): number {
    return this.reqArea + slot * REQ_AREA_STRIDE + 32;
  }

  /** Why the driver stopped (the device broke the ring protocol), or null. */
  get failure(): Error | null {
    return this.error;
  }

  /**
   * Queues one request. `dataAddr/dataLen` is the data buffer (IN: device-writable;
   * OUT: device-readable; GET_ID: writable, 20 bytes). DISCARD / WRITE_ZEROES take
   * (sector, numSectors, flags) in one segment. Returns false if the ring is full.
   * Call notify() after a batch.
   */
  submit(slot: number, type: number, sector: number, dataAddr: number, dataLen: number, numSectors = 0, flags = 0): boolean {
    const s = this.segs[slot]!;
    const vcpu = this.mem.vcpu;
    writeBlkHeader(vcpu, s.hdr.addr, type, type === VIRTIO_BLK_T_DISCARD || type === VIRTIO_BLK_T_WRITE_ZEROES || type === VIRTIO_BLK_T_FLUSH || type === VIRTIO_BLK_T_GET_ID ? 0 : sector);
    vcpu.writeU8(s.status.addr, 0xff);
    s.data.addr = dataAddr;
    s.data.len = dataLen;
    let readable: BufferSegment[];
    let writable: BufferSegment[];
    switch (type) {
      case VIRTIO_BLK_T_OUT:
        readable = s.rHdrData;
        writable = s.wStatus;
        break;
      case VIRTIO_BLK_T_IN:
      case VIRTIO_BLK_T_GET_ID:
        readable = s.rHdr;
        writable = s.wDataStatus;
        break;
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES:
        writeDiscardSegment(vcpu, s.disc.addr, sector, numSectors, flags);
        readable = s.rHdrDisc;
        writable = s.wStatus;
        break;
      default:
        // FLUSH and anything else: header + status.
        readable = s.rHdr;
        writable = s.wStatus;
    }
    // The request is built in memory this vCPU owns; only the queue needs vq->lock.
    const lock = this.lock;
    const cpu = this.cpu;
    let head = -1;
    lock.lock(cpu);
    try {
      // A sampled request's context goes into its head's trace slot before add()
      // publishes the chain, so the device finds it when it pops the head.
      const traced = this.nextTraceId !== "" && this.traceRing !== null ? this.dq.nextHead : -1;
      if (traced >= 0) this.traceRing!.writeGuestTrace(traced, this.nextTraceId, this.nextSpanId, this.nextTraceFlags);
      head = this.dq.add(readable, writable);
      if (head >= 0) {
        // Before the unlock: the interrupt handler maps the head back under the same lock.
        this.headToSlot[head] = slot;
        this.slotHead[slot] = head;
        if (traced >= 0) this.slotTraced[slot] = 1;
      } else if (traced >= 0) this.traceRing!.clearTrace(traced);
    } finally {
      lock.unlock(cpu);
      this.nextTraceId = "";
    }
    if (head < 0) return false;
    this.unnotified++;
    return true;
  }

  /**
   * Makes the next submit() a sampled request: its span context goes into the
   * trace slot of the head it is submitted on, for vhost-worker and
   * completion-thread to continue the trace.
   */
  traceNext(traceId: string, spanId: string, traceFlags: number): void {
    this.nextTraceId = traceId;
    this.nextSpanId = spanId;
    this.nextTraceFlags = traceFlags;
  }

  /** Kicks the device if it asked for it (virtqueue_kick_prepare + notify). */
  notify(): void {
    if (this.unnotified === 0) return;
    this.unnotified = 0;
    // virtio_queue_rq: kick_prepare under vq->lock, the notify itself outside it.
    this.lock.lock(this.cpu);
    const kick = this.dq.kickPrepare();
    this.lock.unlock(this.cpu);
    if (kick) {
      this.kicks++;
      this.kick.ring();
    }
  }

  /**
   * The interrupt handler (virtblk_done): under vq->lock, take everything used
   * and re-enable callbacks the §2.7.14 way (re-check after enabling) so none
   * is lost. Any vCPU may run it. Returns false if the device broke the used
   * ring protocol (see failure): the queue is unusable (Linux: BAD_RING).
   */
  handleInterrupt(): boolean {
    const dq = this.dq;
    const lock = this.lock; // a fio run may have configured another one
    lock.lock(this.cpu);
    try {
      do {
        dq.disableCallbacks();
        this.drain();
      } while (dq.enableCallbacks());
      return true;
    } catch (e) {
      this.error = e as Error;
      return false;
    } finally {
      lock.unlock(this.cpu);
    }
  }

  /** Runs an interrupt loop on this thread (the boot CPU) until stop(). */
  start(): void {
    if (this.running) return;
    if (this.call === null) throw new Error("VirtioBlkDriver.start: this vCPU has no interrupt doorbell");
    this.running = true;
    this.loop = this.irqLoop(this.call);
  }

  /**
   * While a fio run's vCPUs take the queue's interrupts themselves (its
   * affinity is theirs), the boot CPU's loop stands aside, so one interrupt
   * wakes one vCPU rather than that vCPU and the boot CPU too.
   */
  park(): void {
    if (this.parked === null) this.parked = new Promise((resolve) => (this.unparkNow = resolve));
    this.call?.ring(); // out of its doorbell wait, into the parked one
  }

  unpark(): void {
    this.parked = null;
    this.unparkNow();
    this.call?.ring(); // the boot CPU re-checks the used ring at once
  }

  /**
   * The VM pauses: the boot CPU takes no interrupt until thaw(), whatever a fio
   * run's park()/unpark() do meanwhile (the device's completions wait in the used ring).
   */
  freeze(): void {
    if (this.frozen === null) this.frozen = new Promise((resolve) => (this.thawNow = resolve));
    this.call?.ring();
  }

  /** The VM resumes: the boot CPU checks the used ring at once (completions that arrived while paused). */
  thaw(): void {
    this.frozen = null;
    this.thawNow();
    this.call?.ring();
  }

  get isFrozen(): boolean {
    return this.frozen !== null;
  }

  async stop(): Promise<void> {
    this.running = false;
    this.thaw();
    this.unpark();
    await this.loop;
  }

  private async irqLoop(call: Doorbell): Promise<void> {
    const dq = this.dq;
    const check = (): boolean => !this.running || this.parked !== null || this.frozen !== null || dq.hasUsed();
    while (this.running) {
      if (this.frozen !== null) {
        await this.frozen;
        continue;
      }
      if (this.parked !== null) {
        await this.parked;
        continue;
      }
      if (!this.handleInterrupt()) {
        this.running = false;
        break;
      }
      await call.spinThenWait(check, { maxSpinUs: 20 }).catch(() => {
        this.running = false;
      });
      this.irqs++;
    }
  }

  private drain(): void {
    const mem = this.mem.vcpu;
    for (let u = this.dq.popUsed(); u; u = this.dq.popUsed()) {
      const slot = this.headToSlot[u.id]!;
      this.headToSlot[u.id] = -1;
      this.kernelCtl[CTL_COMPLETED]!++; // under vq->lock
      if (this.slotTraced[slot] === 1) {
        // Before the head can be reused by an unsampled request.
        this.traceRing?.clearTrace(u.id);
        this.slotTraced[slot] = 0;
      }
      this.onComplete(slot, mem.readU8(this.statusAddr(slot)), u.len);
    }
  }
}

export { VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID };
