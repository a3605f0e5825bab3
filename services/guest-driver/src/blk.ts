// The guest's virtio-blk front end (drivers/block/virtio_blk.c) on the
// virtqueue library: struct virtio_blk_req in guest memory (header, data, status
// byte), one chain per request (indirect when negotiated), kicks only when
// EVENT_IDX / NO_NOTIFY say the device sleeps, and an interrupt loop that sleeps on
// the call doorbell and re-enables callbacks the §2.7.14 way.
//
// Requests are identified by a slot (0..slots-1) the caller owns: each slot has a
// fixed header/status area; segment descriptors are preallocated per slot, so
// submitting allocates nothing.
import type { Doorbell } from "@virtmesh/shm";
import type { CompletionRing } from "@virtmesh/virtio-blk";
import type { BufferSegment, DriverQueue, GuestMemory } from "@virtmesh/virtqueue";
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

export type CompletionHandler = (slot: number, status: number, usedLen: number) => void;

export class VirtioBlkDriver {
  readonly slots: number;
  onComplete: CompletionHandler = () => undefined;
  irqs = 0;
  kicks = 0;
  /** Used elements taken back (progress, for the RunFio watchdog). */
  completed = 0;
  private readonly segs: SlotSegs[] = [];
  private readonly headToSlot: Int32Array;
  private readonly slotHead: Int32Array;
  private readonly slotTraced: Uint8Array;
  /** The host's per-head trace slots (in the completion ring file), or null. */
  traceRing: CompletionRing | null = null;
  private running = false;
  private loop: Promise<void> | null = null;
  private error: Error | null = null;

  constructor(
    readonly mem: GuestMemory,
    readonly dq: DriverQueue,
    private readonly kick: Doorbell,
    private readonly call: Doorbell,
    readonly reqArea: number,
    slots: number,
  ) {
    this.slots = slots;
    this.headToSlot = new Int32Array(dq.size).fill(-1);
    this.slotHead = new Int32Array(slots).fill(-1);
    this.slotTraced = new Uint8Array(slots);
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
    let head: number;
    switch (type) {
      case VIRTIO_BLK_T_OUT:
        head = this.dq.add(s.rHdrData, s.wStatus);
        break;
      case VIRTIO_BLK_T_IN:
      case VIRTIO_BLK_T_GET_ID:
        head = this.dq.add(s.rHdr, s.wDataStatus);
        break;
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES:
        writeDiscardSegment(vcpu, s.disc.addr, sector, numSectors, flags);
        head = this.dq.add(s.rHdrDisc, s.wStatus);
        break;
      default:
        // FLUSH and anything else: header + status.
        head = this.dq.add(s.rHdr, s.wStatus);
    }
    if (head < 0) return false;
    this.headToSlot[head] = slot;
    this.slotHead[slot] = head;
    return true;
  }

  /**
   * Puts a sampled request's span context into the trace slot of the head it was
   * just submitted on, for vhost-worker and completion-thread to continue the trace.
   */
  traceSubmitted(slot: number, traceId: string, spanId: string, traceFlags: number): void {
    if (!this.traceRing) return;
    this.traceRing.writeGuestTrace(this.slotHead[slot]!, traceId, spanId, traceFlags);
    this.slotTraced[slot] = 1;
  }

  /** Kicks the device if it asked for it (virtqueue_kick_prepare + notify). */
  notify(): void {
    if (this.dq.kickPrepare()) {
      this.kicks++;
      this.kick.ring();
    }
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.loop = this.irqLoop();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.call.ring();
    await this.loop;
  }

  private async irqLoop(): Promise<void> {
    const dq = this.dq;
    const check = (): boolean => !this.running || dq.hasUsed();
    while (this.running) {
      dq.disableCallbacks();
      try {
        this.drain();
      } catch (e) {
        // DeviceProtocolError: a lying device. The queue is unusable (Linux: BAD_RING).
        this.error = e as Error;
        this.running = false;
        break;
      }
      this.notify();
      // §2.7.14: re-enable, then re-check, so an interrupt is never lost.
      if (dq.enableCallbacks()) continue;
      await this.call.spinThenWait(check, { maxSpinUs: 20 }).catch(() => {
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
      this.completed++;
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
