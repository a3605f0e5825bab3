// Device side of a virtio 1.x split virtqueue (virtio 1.2 §2.7): pops available
// descriptor chains, validating every descriptor the guest wrote, and returns
// them on the used ring. Modelled on rust-vmm's virtio-queue and Linux
// drivers/vhost/vhost.c (vhost_get_vq_desc, vhost_notify, vhost_enable_notify).
//
// Memory ordering. The rings are shared with another thread or process. JS
// typed-array accesses are unordered; Atomics.* are sequentially consistent and
// act as full fences for the plain accesses around them. So:
//  - pop: Atomics.load(avail->idx) happens before the plain reads of
//    avail->ring[] and of the descriptors (the driver's Atomics.store of idx
//    happened after it wrote them: §2.7.13.3.1), i.e. smp_rmb in vhost.
//  - addUsed: plain writes of used->ring[i].{id,len} then Atomics.store of
//    used->idx, so the driver never sees idx before the element (§2.7.8.2:
//    "The device MUST set len prior to updating the used idx").
//  - needsInterrupt / enableNotifications: a seq-cst store (used->idx or
//    avail_event/flags) followed by a seq-cst load of the other side's field is
//    the store->load barrier (smp_mb) that prevents a lost notification.

import * as C from "./constants";
import { ChainError, ChainErrorCode } from "./chain-error";
import { vringNeedEvent } from "./event-idx";
import type { GuestMemory, MemoryAccessor } from "./guest-memory";
import { checkQueueAddresses, type SplitQueueAddresses } from "./layout";

// Module-local copies: the CommonJS output of tsx/esbuild reads imported bindings through
// getters, which cost a quarter of the per-request time on the ring's hot path.
const DESC_SIZE = C.DESC_SIZE;
const VIRTQ_AVAIL_F_NO_INTERRUPT = C.VIRTQ_AVAIL_F_NO_INTERRUPT;
const VIRTQ_DESC_F_INDIRECT = C.VIRTQ_DESC_F_INDIRECT;
const VIRTQ_DESC_F_NEXT = C.VIRTQ_DESC_F_NEXT;
const VIRTQ_DESC_F_WRITE = C.VIRTQ_DESC_F_WRITE;
const VIRTQ_USED_F_NO_NOTIFY = C.VIRTQ_USED_F_NO_NOTIFY;

/** Negotiated features and placement of one split queue. */
export interface QueueConfig extends SplitQueueAddresses {
  /** VIRTIO_F_EVENT_IDX negotiated: used_event / avail_event instead of flags (§2.7.7, §2.7.10). */
  eventIdx?: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated (§2.7.5.3). */
  indirect?: boolean;
  /** VIRTIO_F_NOTIFY_ON_EMPTY negotiated (§6.3): interrupt when the avail ring runs empty, despite suppression. */
  notifyOnEmpty?: boolean;
}

const TWO_POW_32 = 0x1_0000_0000;
/** hi word >= 2^21 means addr >= 2^53, beyond any guest memory we accept (<= 2^52). */
const HI_LIMIT = 0x20_0000;

/**
 * One popped descriptor chain, flattened into segments: first `readableCount`
 * device-readable segments, then device-writable ones (§2.7.4.2 guarantees that
 * order, and the walker enforces it). Allocated once per queue and reused by
 * every pop, so the hot path allocates nothing.
 */
export class DescriptorChain {
  /** Head descriptor index: the id to return with addUsed. -1 before the first pop. */
  head = -1;
  /** Number of buffer segments (indirect-table descriptors themselves are not segments). */
  count = 0;
  readableCount = 0;
  readableBytes = 0;
  writableBytes = 0;
  /** True if the chain went through an indirect table. */
  indirect = false;
  /** Guest-physical address of each segment (exact: < 2^52). */
  readonly addr: Float64Array;
  readonly len: Uint32Array;
  /** Descriptor flags of each segment as the driver wrote them. */
  readonly flags: Uint16Array;

  constructor(readonly capacity: number) {
    this.addr = new Float64Array(capacity);
    this.len = new Uint32Array(capacity);
    this.flags = new Uint16Array(capacity);
  }

  get writableCount(): number {
    return this.count - this.readableCount;
  }

  isWritable(i: number): boolean {
    return (this.flags[i]! & VIRTQ_DESC_F_WRITE) !== 0;
  }

  /** @internal */
  reset(head: number): void {
    this.head = head;
    this.count = 0;
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.indirect = false;
  }
}

/** Position of a device queue; what VHOST_GET_VRING_BASE / SET_VRING_BASE carry, plus the used shadow. */
export interface DeviceQueueState {
  /** Next avail->ring slot to pop (free-running 16-bit). */
  lastAvailIdx: number;
  /** Next used->ring slot to fill (free-running 16-bit); mirrors used->idx. */
  usedIdx: number;
}

/**
 * The device's view of a split virtqueue. Never reads or writes outside guest
 * memory: the rings are checked once at construction, every descriptor on every
 * pop. A broken ring puts the queue into NEEDS_RESET (§2.1.2); a broken chain is
 * returned as a ChainError for the device to discard or escalate.
 */
export class DeviceQueue {
  readonly size: number;
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly notifyOnEmpty: boolean;

  private readonly mem: MemoryAccessor;
  private readonly memSize: number;
  private readonly mask: number;
  private readonly availIdxAddr: number;
  private readonly availRingAddr: number;
  private readonly usedEventAddr: number;
  private readonly usedIdxAddr: number;
  private readonly usedRingAddr: number;
  private readonly availEventAddr: number;

  private lastAvail = 0;
  private used = 0;
  private signalledUsed = 0;
  private signalledValid = false;
  private notificationsOn = true;
  private resetReason: ChainError | null = null;
  // Loop detection in the main table without allocating: a descriptor was seen
  // in this walk iff seen[i] === generation.
  private readonly seen: Uint32Array;
  private generation = 0;

  /**
   * @param memory guest memory; the device writes through `memory.device`, so its writes hit the device dirty log.
   * @param state  resume position. Omitted fields are re-derived from guest memory: usedIdx from used->idx,
   *               lastAvailIdx = usedIdx (correct when every popped chain was completed; see README "Restart").
   * @throws QueueConfigError if the queue size, alignment or placement is invalid (§2.7, §2.7.1).
   */
  constructor(memory: GuestMemory, cfg: QueueConfig, state: Partial<DeviceQueueState> = {}) {
    const err = checkQueueAddresses(cfg, memory.size);
    if (err) throw err;
    this.mem = memory.device;
    this.memSize = memory.size;
    this.size = cfg.size;
    this.mask = cfg.size - 1;
    this.descAddr = cfg.descAddr;
    this.availAddr = cfg.availAddr;
    this.usedAddr = cfg.usedAddr;
    this.eventIdx = cfg.eventIdx ?? false;
    this.indirect = cfg.indirect ?? false;
    this.notifyOnEmpty = cfg.notifyOnEmpty ?? false;
    this.availIdxAddr = cfg.availAddr + 2;
    this.availRingAddr = cfg.availAddr + 4;
    this.usedEventAddr = cfg.availAddr + 4 + 2 * cfg.size;
    this.usedIdxAddr = cfg.usedAddr + 2;
    this.usedRingAddr = cfg.usedAddr + 4;
    this.availEventAddr = cfg.usedAddr + 4 + 8 * cfg.size;
    this.seen = new Uint32Array(cfg.size);
    this.used = state.usedIdx ?? this.mem.loadU16Atomic(this.usedIdxAddr);
    this.lastAvail = state.lastAvailIdx ?? this.used;
    this.used &= 0xffff;
    this.lastAvail &= 0xffff;
  }

  /** A DescriptorChain sized for this queue (a chain never has more than Queue Size segments). */
  newChain(): DescriptorChain {
    return new DescriptorChain(this.size);
  }

  /** last_avail_idx, for VHOST_GET_VRING_BASE. */
  get lastAvailIdx(): number {
    return this.lastAvail;
  }
  /** VHOST_SET_VRING_BASE: resume popping at `idx`. */
  set lastAvailIdx(idx: number) {
    this.lastAvail = idx & 0xffff;
  }

  /** The device's shadow of used->idx. */
  get usedIdx(): number {
    return this.used;
  }

  /** Position to save across a device restart (together with an inflight log if completions are out of order). */
  get state(): DeviceQueueState {
    return { lastAvailIdx: this.lastAvail, usedIdx: this.used };
  }

  /** Why the queue is in NEEDS_RESET, or null. */
  get needsReset(): ChainError | null {
    return this.resetReason;
  }

  /**
   * Enter NEEDS_RESET (§2.1.2: "The device SHOULD set DEVICE_NEEDS_RESET when it
   * enters an error state that a reset is needed"). pop() returns null from now on;
   * the transport should set VIRTIO_CONFIG_S_NEEDS_RESET and send a config change.
   */
  enterNeedsReset(reason: ChainError): void {
    if (!this.resetReason) this.resetReason = reason;
  }

  /** Device reset: forget all position and error state. The driver re-initialises the rings. */
  reset(state: DeviceQueueState = { lastAvailIdx: 0, usedIdx: 0 }): void {
    this.lastAvail = state.lastAvailIdx & 0xffff;
    this.used = state.usedIdx & 0xffff;
    this.signalledValid = false;
    this.notificationsOn = true;
    this.resetReason = null;
  }

  /** avail->idx as the driver last published it. */
  availIdx(): number {
    return this.mem.loadU16Atomic(this.availIdxAddr);
  }

  /** True if the driver has made buffers available that were not popped yet. */
  hasPending(): boolean {
    return this.resetReason === null && this.availIdx() !== this.lastAvail;
  }

  /**
   * Pops the next available chain into `chain` (reused; no allocation).
   * Returns `chain` on success, null if nothing is available (or the queue is in
   * NEEDS_RESET), or a ChainError. A non-fatal error consumed its avail slot: the
   * device can discard() it (return it with len 0) or enterNeedsReset(). A fatal
   * one has already put the queue into NEEDS_RESET.
   */
  pop(chain: DescriptorChain): DescriptorChain | ChainError | null {
    if (this.resetReason) return null;
    const availIdx = this.mem.loadU16Atomic(this.availIdxAddr);
    if (availIdx === this.lastAvail) return null;
    // §2.7.13.3 / §2.7: the driver adds at most Queue Size buffers ahead of us
    // and never decrements idx (§2.7.6.1). A larger gap is a corrupt ring: vhost
    // reports "Guest moved avail index from %u to %u".
    if (((availIdx - this.lastAvail) & 0xffff) > this.size) {
      const err = new ChainError(ChainErrorCode.AvailIdxOutOfRange, -1, -1, false, true,
        `avail->idx ${availIdx} is more than Queue Size ${this.size} ahead of last_avail_idx ${this.lastAvail}`);
      this.resetReason = err;
      return err;
    }
    const head = this.mem.readU16(this.availRingAddr + 2 * (this.lastAvail & this.mask));
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    if (this.eventIdx && this.notificationsOn) {
      // Like QEMU's virtqueue_pop: while notifications are on, ask for a kick as
      // soon as the driver publishes past what we have consumed (§2.7.10.2).
      this.mem.storeU16Atomic(this.availEventAddr, this.lastAvail);
    }
    if (head >= this.size) {
      // §2.7.6: ring entries are descriptor table indexes. There is no valid id
      // to hand back on the used ring, so this is fatal (QEMU: virtio_error).
      const err = new ChainError(ChainErrorCode.HeadOutOfRange, -1, head, false, true,
        `avail->ring[${(this.lastAvail - 1) & this.mask}] = ${head} >= Queue Size ${this.size}`);
      this.resetReason = err;
      return err;
    }
    return this.walkChain(head, chain);
  }

  /**
   * Walks and validates the chain starting at descriptor `head` without touching
   * the avail ring. pop() uses it; a restarted device uses it to re-submit the
   * heads an inflight log says were popped but not completed.
   */
  walkChain(head: number, chain: DescriptorChain): DescriptorChain | ChainError {
    chain.reset(head);
    if (!(head >= 0 && head < this.size && Number.isInteger(head))) {
      return new ChainError(ChainErrorCode.HeadOutOfRange, -1, head, false, false, `head ${head} >= Queue Size ${this.size}`);
    }
    if (chain.capacity < this.size) throw new RangeError(`DescriptorChain capacity ${chain.capacity} < Queue Size ${this.size}; use newChain()`);
    const mem = this.mem;
    const memSize = this.memSize;
    const queueSize = this.size;
    const seen = this.seen;
    let gen = ++this.generation;
    if (gen > 0xffff_fff0) {
      seen.fill(0);
      gen = this.generation = 1;
    }

    let tableAddr = this.descAddr;
    let tableLen = queueSize; // entries in the table being walked
    let inIndirect = false;
    let stepsInTable = 0;
    let idx = head;
    let seenWritable = false;
    let totalBytes = 0;

    // Terminates: in the main table each step visits a new index (seen[]) so at
    // most Queue Size steps; in an indirect table at most len/16 steps
    // (stepsInTable) and at most Queue Size segments (count); only one indirect
    // table per chain (NestedIndirect).
    for (;;) {
      // §2.7.5 / §2.7.5.3: next must index the table being walked.
      if (idx >= tableLen) {
        return this.chainError(ChainErrorCode.DescIndexOutOfRange, head, idx, inIndirect,
          `next index ${idx} >= ${inIndirect ? "indirect table size" : "Queue Size"} ${tableLen}`);
      }
      if (inIndirect) {
        // §2.7.5.2: visiting more descriptors than the table holds means one repeats.
        if (++stepsInTable > tableLen) {
          return this.chainError(ChainErrorCode.DescriptorLoop, head, idx, true, `indirect chain revisits a descriptor (table of ${tableLen})`);
        }
      } else {
        // §2.7.5.2: "loops in the descriptor chain are forbidden".
        if (seen[idx] === gen) return this.chainError(ChainErrorCode.DescriptorLoop, head, idx, false, `descriptor ${idx} appears twice in the chain`);
        seen[idx] = gen;
      }

      // In range: the main table was checked at construction, an indirect table
      // (tableAddr + 16 * tableLen <= memSize) before we switched to it.
      const d = tableAddr + idx * DESC_SIZE;
      const lo = mem.readU32(d);
      const hi = mem.readU32(d + 4);
      const len = mem.readU32(d + 8);
      const flags = mem.readU16(d + 12);
      const next = mem.readU16(d + 14);

      // §2.7.5 (le64 addr, le32 len): reject addr + len wrapping past 2^64, then
      // anything ending beyond guest memory. Computed on the two u32 halves, so
      // no precision is lost on huge addresses.
      if (hi >= HI_LIMIT) {
        const wraps = hi === 0xffff_ffff && lo + len >= TWO_POW_32;
        return this.chainError(wraps ? ChainErrorCode.AddressOverflow : ChainErrorCode.AddressOutOfRange, head, idx, inIndirect,
          `addr 0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")} + len ${len} ${wraps ? "wraps past 2^64" : `is outside guest memory of ${memSize} bytes`}`);
      }
      const addr = hi * TWO_POW_32 + lo;
      if (addr + len > memSize) {
        return this.chainError(ChainErrorCode.AddressOutOfRange, head, idx, inIndirect,
          `[0x${addr.toString(16)}, +${len}) is outside guest memory of ${memSize} bytes`);
      }

      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (!this.indirect) {
          return this.chainError(ChainErrorCode.IndirectNotNegotiated, head, idx, inIndirect, "INDIRECT flag but VIRTIO_F_INDIRECT_DESC was not negotiated");
        }
        if (inIndirect) return this.chainError(ChainErrorCode.NestedIndirect, head, idx, true, "INDIRECT flag inside an indirect table");
        if (flags & VIRTQ_DESC_F_NEXT) return this.chainError(ChainErrorCode.IndirectWithNext, head, idx, false, "both INDIRECT and NEXT set");
        if (len === 0) return this.chainError(ChainErrorCode.IndirectTableEmpty, head, idx, false, "indirect table of length 0");
        if (len % DESC_SIZE !== 0) return this.chainError(ChainErrorCode.IndirectLenNotMultiple, head, idx, false, `indirect table length ${len} is not a multiple of 16`);
        // §2.7.5.3.2: the WRITE flag of this descriptor is ignored. Zero or more
        // direct descriptors may precede it; the table ends the chain (no NEXT).
        tableAddr = addr;
        tableLen = len / DESC_SIZE;
        inIndirect = true;
        stepsInTable = 0;
        chain.indirect = true;
        idx = 0; // §2.7.5.3: the first indirect descriptor is at index 0
        continue;
      }

      // §2.7.5.3.1 / §2.7.5: no chain longer than Queue Size.
      const n = chain.count;
      if (n >= queueSize) {
        return this.chainError(ChainErrorCode.ChainTooLong, head, idx, inIndirect, `more than Queue Size ${queueSize} descriptors`);
      }
      if (flags & VIRTQ_DESC_F_WRITE) {
        seenWritable = true;
        chain.writableBytes += len;
      } else {
        // §2.7.4.2: device-writable elements come after all device-readable ones.
        if (seenWritable) return this.chainError(ChainErrorCode.ReadableAfterWritable, head, idx, inIndirect, "device-readable descriptor after a device-writable one");
        chain.readableCount = n + 1;
        chain.readableBytes += len;
      }
      totalBytes += len;
      // §2.7.5.2: no chain longer than 2^32 bytes in total.
      if (totalBytes > TWO_POW_32) return this.chainError(ChainErrorCode.ChainTooBig, head, idx, inIndirect, `chain exceeds 2^32 bytes (${totalBytes})`);
      chain.addr[n] = addr;
      chain.len[n] = len;
      chain.flags[n] = flags;
      chain.count = n + 1;

      if (!(flags & VIRTQ_DESC_F_NEXT)) return chain;
      idx = next;
    }
  }

  private chainError(code: ChainErrorCode, head: number, descIndex: number, inIndirect: boolean, detail: string): ChainError {
    return new ChainError(code, head, descIndex, inIndirect, false, detail);
  }

  /**
   * Gives a rejected chain back to the driver with len 0, so its descriptors are
   * not leaked and the queue keeps serving (QEMU's virtqueue_detach_element +
   * push with len 0). Returns false if the error has no valid head (fatal errors).
   */
  discard(err: ChainError): boolean {
    if (err.fatal || err.head < 0) return false;
    this.addUsed(err.head, 0);
    return true;
  }

  /**
   * Returns a chain on the used ring and publishes used->idx.
   * @param head the id popped (chain.head)
   * @param len  bytes written into the chain's device-writable buffers (§2.7.8)
   */
  addUsed(head: number, len: number): void {
    if (!(head >= 0 && head < this.size && Number.isInteger(head))) throw new RangeError(`addUsed: head ${head} not in [0, ${this.size})`);
    if (!(len >= 0 && len <= 0xffff_ffff && Number.isInteger(len))) throw new RangeError(`addUsed: len ${len} is not a u32`);
    const e = this.usedRingAddr + 8 * (this.used & this.mask);
    this.mem.writeU32(e, head);
    this.mem.writeU32(e + 4, len);
    this.used = (this.used + 1) & 0xffff;
    // §2.7.8.2: id and len are written before idx; the seq-cst store orders them.
    this.mem.storeU16Atomic(this.usedIdxAddr, this.used);
  }

  /**
   * Whether to send a used buffer notification (interrupt) for the buffers
   * added since the last call. §2.7.7.2; Linux vhost_notify.
   */
  needsInterrupt(): boolean {
    const newIdx = this.used;
    const oldIdx = this.signalledUsed;
    const valid = this.signalledValid;
    this.signalledUsed = newIdx;
    this.signalledValid = true;
    if (valid && newIdx === oldIdx) return false; // nothing new used
    // The loads below follow our seq-cst store of used->idx: the smp_mb of
    // vhost_notify, so we cannot miss a used_event the driver set concurrently.
    if (this.notifyOnEmpty && this.mem.loadU16Atomic(this.availIdxAddr) === this.lastAvail) {
      // §6.3 VIRTIO_F_NOTIFY_ON_EMPTY: notify when out of available buffers even if suppressed.
      return true;
    }
    if (!this.eventIdx) {
      // §2.7.7.2 without EVENT_IDX: flags 1 means "SHOULD NOT", 0 means "MUST".
      return (this.mem.loadU16Atomic(this.availAddr) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (!valid) return true;
    // §2.7.7.2 with EVENT_IDX: notify iff used->idx crossed used_event.
    return vringNeedEvent(this.mem.loadU16Atomic(this.usedEventAddr), newIdx, oldIdx);
  }

  /**
   * Asks the driver for available buffer notifications (kicks) again (§2.7.10.2).
   * Returns true if buffers became available meanwhile: the caller must poll
   * again instead of sleeping (vhost_enable_notify's race check).
   */
  enableNotifications(): boolean {
    this.notificationsOn = true;
    if (this.eventIdx) this.mem.storeU16Atomic(this.availEventAddr, this.lastAvail);
    else this.mem.storeU16Atomic(this.usedAddr, 0);
    // Seq-cst store above, seq-cst load below: the store->load barrier.
    return this.hasPending();
  }

  /** Suppresses kicks while the device is polling (§2.7.10.2; vhost_disable_notify). */
  disableNotifications(): void {
    this.notificationsOn = false;
    // With EVENT_IDX the device MUST keep flags 0; avail_event is simply left
    // behind, so the driver stops kicking once it has passed it.
    if (!this.eventIdx) this.mem.storeU16Atomic(this.usedAddr, VIRTQ_USED_F_NO_NOTIFY);
  }

  /**
   * Copies the chain's device-readable bytes, starting `skip` bytes in, into dst.
   * Returns the number of bytes copied. Addresses were validated by the walk.
   */
  readChain(chain: DescriptorChain, dst: Uint8Array, skip = 0): number {
    let copied = 0;
    for (let i = 0; i < chain.readableCount && copied < dst.length; i++) {
      let len = chain.len[i]!;
      let addr = chain.addr[i]!;
      if (skip >= len) {
        skip -= len;
        continue;
      }
      addr += skip;
      len -= skip;
      skip = 0;
      const n = Math.min(len, dst.length - copied);
      this.mem.read(addr, dst.subarray(copied, copied + n));
      copied += n;
    }
    return copied;
  }

  /**
   * Copies src into the chain's device-writable buffers, starting `skip` bytes
   * into them; logged in the device dirty log. Returns bytes written (use it for
   * the used len, §2.7.8.2).
   */
  writeChain(chain: DescriptorChain, src: Uint8Array, skip = 0): number {
    let written = 0;
    for (let i = chain.readableCount; i < chain.count && written < src.length; i++) {
      let len = chain.len[i]!;
      let addr = chain.addr[i]!;
      if (skip >= len) {
        skip -= len;
        continue;
      }
      addr += skip;
      len -= skip;
      skip = 0;
      const n = Math.min(len, src.length - written);
      this.mem.write(addr, src.subarray(written, written + n));
      written += n;
    }
    return written;
  }
}

/**
 * Reads a queue's position from guest memory, for a device process that restarts
 * without saved state. used->idx is authoritative (only the device writes it);
 * avail->idx says how far the driver got. Every head in avail slots
 * [usedIdx, availIdx) was either never popped or popped but not completed: with
 * in-order completion (and no inflight log) resuming at lastAvailIdx = usedIdx
 * re-processes exactly those. With out-of-order completion an inflight log (like
 * vhost-user's inflight region) must say which heads are still outstanding.
 */
export function readQueuePosition(memory: GuestMemory, cfg: SplitQueueAddresses): { availIdx: number; usedIdx: number; inFlight: number } {
  const err = checkQueueAddresses(cfg, memory.size);
  if (err) throw err;
  const availIdx = memory.device.loadU16Atomic(cfg.availAddr + 2);
  const usedIdx = memory.device.loadU16Atomic(cfg.usedAddr + 2);
  return { availIdx, usedIdx, inFlight: (availIdx - usedIdx) & 0xffff };
}
