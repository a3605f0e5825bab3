// Driver side of a virtio 1.x split virtqueue (virtio 1.2 §2.7.13, §2.7.14):
// what the guest's virtio_ring.c does. Used by guest-driver and by the tests'
// mock driver. It writes through `memory.vcpu`, so its writes are vCPU writes
// for the dirty log.
//
// The driver's own bookkeeping (free list, chain lengths, outstanding heads)
// lives in private arrays, never re-read from shared memory, so a misbehaving
// device cannot corrupt it (Linux keeps desc_extra/desc_state the same way).

import * as C from "./constants";
import type { QueueConfig } from "./device";
import { vringNeedEvent } from "./event-idx";
import type { GuestMemory, MemoryAccessor } from "./guest-memory";
import { availRingBytes, checkQueueAddresses, descTableBytes, usedRingBytes } from "./layout";

// Module-local copies: the CommonJS output of tsx/esbuild reads imported bindings through
// getters, which cost a quarter of the per-request time on the ring's hot path.
const DESC_SIZE = C.DESC_SIZE;
const VIRTQ_AVAIL_F_NO_INTERRUPT = C.VIRTQ_AVAIL_F_NO_INTERRUPT;
const VIRTQ_DESC_F_INDIRECT = C.VIRTQ_DESC_F_INDIRECT;
const VIRTQ_DESC_F_NEXT = C.VIRTQ_DESC_F_NEXT;
const VIRTQ_DESC_F_WRITE = C.VIRTQ_DESC_F_WRITE;
const VIRTQ_USED_F_NO_NOTIFY = C.VIRTQ_USED_F_NO_NOTIFY;

/** One physically contiguous guest buffer element. */
export interface BufferSegment {
  addr: number;
  len: number;
}

/** An entry taken off the used ring. */
export interface UsedElement {
  /** Head id returned by add(). */
  id: number;
  /** Bytes the device wrote into the writable part (§2.7.8). */
  len: number;
}

export interface DriverQueueOptions {
  /**
   * Guest memory reserved for indirect tables (needs cfg.indirect): one table of
   * `maxIndirect` descriptors per head, at addr + head * maxIndirect * 16.
   * Size it with indirectAreaBytes().
   */
  indirectArea?: { addr: number; maxIndirect: number };
  /** Zero the three ring parts first (a fresh queue; §2.7.10.1: used flags start at 0). Default true. */
  initRings?: boolean;
}

/** Bytes needed for DriverQueueOptions.indirectArea. */
export const indirectAreaBytes = (queueSize: number, maxIndirect: number): number => queueSize * maxIndirect * DESC_SIZE;

/** The device broke the used ring protocol (Linux: BAD_RING). The queue is unusable until reset. */
export class DeviceProtocolError extends Error {
  override readonly name = "DeviceProtocolError";
}

const TWO_POW_32 = 0x1_0000_0000;
const NONE = 0xffff;

export class DriverQueue {
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;

  private readonly mem: MemoryAccessor;
  private readonly mask: number;
  private readonly availIdxAddr: number;
  private readonly availRingAddr: number;
  private readonly usedEventAddr: number;
  private readonly usedIdxAddr: number;
  private readonly usedRingAddr: number;
  private readonly availEventAddr: number;

  private readonly indirectAddr: number;
  private readonly maxIndirect: number;

  private freeHead = 0;
  private free: number;
  private readonly nextFree: Uint16Array; // private free-list links
  private readonly chainDescs: Uint16Array; // main-table descriptors per outstanding head (0 = not outstanding)
  private readonly chainWritable: Float64Array; // writable bytes offered per head, to check used len
  private availShadow = 0;
  private numAdded = 0;
  private lastUsed = 0;
  private callbacksOn = true;
  private broken: DeviceProtocolError | null = null;
  private readonly scratch: UsedElement = { id: 0, len: 0 };

  /** @throws QueueConfigError on a bad size or placement; RangeError on a bad indirect area. */
  constructor(memory: GuestMemory, cfg: QueueConfig, opts: DriverQueueOptions = {}) {
    const err = checkQueueAddresses(cfg, memory.size);
    if (err) throw err;
    this.mem = memory.vcpu;
    this.size = cfg.size;
    this.mask = cfg.size - 1;
    this.eventIdx = cfg.eventIdx ?? false;
    this.indirect = cfg.indirect ?? false;
    this.descAddr = cfg.descAddr;
    this.availAddr = cfg.availAddr;
    this.usedAddr = cfg.usedAddr;
    this.availIdxAddr = cfg.availAddr + 2;
    this.availRingAddr = cfg.availAddr + 4;
    this.usedEventAddr = cfg.availAddr + 4 + 2 * cfg.size;
    this.usedIdxAddr = cfg.usedAddr + 2;
    this.usedRingAddr = cfg.usedAddr + 4;
    this.availEventAddr = cfg.usedAddr + 4 + 8 * cfg.size;

    const area = opts.indirectArea;
    if (area && this.indirect) {
      if (!Number.isInteger(area.maxIndirect) || area.maxIndirect < 1 || area.maxIndirect > cfg.size) {
        throw new RangeError(`indirectArea.maxIndirect ${area.maxIndirect} must be in [1, Queue Size] (§2.7.5.3.1)`);
      }
      if (!this.mem.inRange(area.addr, indirectAreaBytes(cfg.size, area.maxIndirect))) {
        throw new RangeError(`indirect area at 0x${area.addr.toString(16)} does not fit guest memory`);
      }
      this.indirectAddr = area.addr;
      this.maxIndirect = area.maxIndirect;
    } else {
      this.indirectAddr = -1;
      this.maxIndirect = 0;
    }

    this.nextFree = new Uint16Array(cfg.size);
    for (let i = 0; i < cfg.size; i++) this.nextFree[i] = i + 1 < cfg.size ? i + 1 : NONE;
    this.free = cfg.size;
    this.chainDescs = new Uint16Array(cfg.size);
    this.chainWritable = new Float64Array(cfg.size);

    if (opts.initRings ?? true) {
      this.mem.fill(cfg.descAddr, descTableBytes(cfg.size), 0);
      this.mem.fill(cfg.availAddr, availRingBytes(cfg.size), 0);
      this.mem.fill(cfg.usedAddr, usedRingBytes(cfg.size), 0);
    } else {
      this.availShadow = this.mem.loadU16Atomic(this.availIdxAddr);
      this.lastUsed = this.mem.loadU16Atomic(this.usedIdxAddr);
    }
  }

  /** Free descriptors in the main table. */
  get numFree(): number {
    return this.free;
  }

  /** Chains added and not yet taken back from the used ring. */
  get outstanding(): number {
    return (this.availShadow - this.lastUsed) & 0xffff;
  }

  /** The device protocol violation that stopped this queue, or null. */
  get brokenReason(): DeviceProtocolError | null {
    return this.broken;
  }

  /**
   * Exposes one buffer: `readable` segments (device reads) then `writable`
   * ones (device writes), in that order (§2.7.4.2). Writes the descriptors
   * (§2.7.13.1), the avail ring entry (§2.7.13.2) and publishes avail->idx
   * (§2.7.13.3). Returns the head id, or -1 if there are not enough free
   * descriptors (the ring is full: reap used buffers first).
   *
   * @param useIndirect put the chain in an indirect table (default: when
   *   negotiated, an indirect area was given, there is more than one segment
   *   and it fits).
   */
  add(readable: readonly BufferSegment[], writable: readonly BufferSegment[], useIndirect?: boolean): number {
    if (this.broken) throw this.broken;
    const total = readable.length + writable.length;
    if (total === 0) throw new RangeError("add: a buffer needs at least one segment");
    if (total > this.size) throw new RangeError(`add: ${total} segments exceed Queue Size ${this.size} (§2.7.5.3.1)`);
    let writableBytes = 0;
    let totalBytes = 0;
    for (const s of readable) totalBytes += this.checkSegment(s);
    for (const s of writable) {
      const n = this.checkSegment(s);
      totalBytes += n;
      writableBytes += n;
    }
    if (totalBytes > TWO_POW_32) throw new RangeError(`add: ${totalBytes} bytes exceed 2^32 (§2.7.5.2)`);

    const indirect = useIndirect ?? (this.maxIndirect > 0 && total > 1 && total <= this.maxIndirect);
    if (indirect && (this.maxIndirect === 0 || total > this.maxIndirect)) {
      throw new RangeError(`add: indirect not available for ${total} segments (negotiated: ${this.indirect}, table size ${this.maxIndirect})`);
    }
    const needed = indirect ? 1 : total;
    if (this.free < needed) return -1;

    const head = this.freeHead;
    if (indirect) {
      const table = this.indirectAddr + head * this.maxIndirect * DESC_SIZE;
      for (let i = 0; i < total; i++) {
        const w = i >= readable.length;
        const s = w ? writable[i - readable.length]! : readable[i]!;
        const last = i === total - 1;
        this.writeDesc(table + i * DESC_SIZE, s.addr, s.len, (w ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT), last ? 0 : i + 1);
      }
      this.freeHead = this.nextFree[head]!;
      this.writeDesc(this.descAddr + head * DESC_SIZE, table, total * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0);
    } else {
      let idx = head;
      for (let i = 0; i < total; i++) {
        const w = i >= readable.length;
        const s = w ? writable[i - readable.length]! : readable[i]!;
        const last = i === total - 1;
        const nxt = this.nextFree[idx]!;
        this.writeDesc(this.descAddr + idx * DESC_SIZE, s.addr, s.len, (w ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT), last ? 0 : nxt);
        if (!last) idx = nxt;
      }
      this.freeHead = this.nextFree[idx]!;
    }
    this.free -= needed;
    this.chainDescs[head] = needed;
    this.chainWritable[head] = writableBytes;

    // §2.7.13.2: place the head in the next avail ring slot...
    this.mem.writeU16(this.availRingAddr + 2 * (this.availShadow & this.mask), head);
    this.availShadow = (this.availShadow + 1) & 0xffff;
    this.numAdded++;
    // ...§2.7.13.3.1: then publish idx after a barrier. Atomics.store is
    // sequentially consistent: every plain write above (descriptors, ring
    // entry) happens-before it, so a device that Atomics.load()s the new idx
    // sees them (the virtio_wmb + store of virtio_ring.c).
    this.mem.storeU16Atomic(this.availIdxAddr, this.availShadow);
    return head;
  }

  private checkSegment(s: BufferSegment): number {
    if (!this.mem.inRange(s.addr, s.len) || s.len > 0xffff_ffff) {
      throw new RangeError(`add: segment [${s.addr}, +${s.len}) is outside guest memory or longer than 2^32-1`);
    }
    return s.len;
  }

  private writeDesc(d: number, addr: number, len: number, flags: number, next: number): void {
    this.mem.writeU32(d, addr >>> 0 === addr ? addr : addr % TWO_POW_32);
    this.mem.writeU32(d + 4, Math.floor(addr / TWO_POW_32));
    this.mem.writeU32(d + 8, len);
    this.mem.writeU16(d + 12, flags);
    this.mem.writeU16(d + 14, next);
  }

  /**
   * Whether to notify the device about the buffers added since the last call
   * (virtqueue_kick_prepare). §2.7.13.4.1: the avail->idx store was seq-cst,
   * so the seq-cst load of avail_event/flags below cannot move before it.
   */
  kickPrepare(): boolean {
    const added = this.numAdded;
    if (added === 0) return false;
    this.numAdded = 0;
    // 65536 or more adds without a check: the 16-bit window is ambiguous, kick.
    if (added > 0xffff) return true;
    if (this.eventIdx) {
      const newIdx = this.availShadow;
      const oldIdx = (newIdx - added) & 0xffff;
      // §2.7.10.1 with EVENT_IDX: notify iff avail->idx crossed avail_event.
      return vringNeedEvent(this.mem.loadU16Atomic(this.availEventAddr), newIdx, oldIdx);
    }
    // §2.7.10.1 without EVENT_IDX: used->flags 1 "SHOULD NOT", 0 "MUST".
    return (this.mem.loadU16Atomic(this.usedAddr) & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /** True if the device has returned buffers not yet taken with popUsed(). */
  hasUsed(): boolean {
    return this.mem.loadU16Atomic(this.usedIdxAddr) !== this.lastUsed;
  }

  /**
   * Takes the next used element (virtqueue_get_buf) and frees its descriptors.
   * Returns null if none. `out` is filled and returned (default: an internal
   * object reused by every call). Throws DeviceProtocolError if the device
   * returned an id that is not an outstanding head, a len larger than the
   * writable bytes offered, or moved used->idx too far.
   */
  popUsed(out: UsedElement = this.scratch): UsedElement | null {
    if (this.broken) throw this.broken;
    const usedIdx = this.mem.loadU16Atomic(this.usedIdxAddr);
    if (usedIdx === this.lastUsed) return null;
    // The seq-cst load of used->idx above orders the element reads below after
    // it (virtio_rmb); the device stored id/len before idx (§2.7.8.2).
    if (((usedIdx - this.lastUsed) & 0xffff) > this.outstanding) {
      return this.fail(`used->idx moved from ${this.lastUsed} to ${usedIdx} with only ${this.outstanding} buffers outstanding`);
    }
    const e = this.usedRingAddr + 8 * (this.lastUsed & this.mask);
    const id = this.mem.readU32(e);
    const len = this.mem.readU32(e + 4);
    if (id >= this.size || this.chainDescs[id] === 0) return this.fail(`used id ${id} is not an outstanding head`);
    if (len > this.chainWritable[id]!) return this.fail(`used len ${len} for head ${id} exceeds the ${this.chainWritable[id]} writable bytes offered`);
    this.freeChain(id);
    this.lastUsed = (this.lastUsed + 1) & 0xffff;
    if (this.eventIdx && this.callbacksOn) {
      // Ask for an interrupt for the very next used entry (virtqueue_get_buf_ctx_split).
      this.mem.storeU16Atomic(this.usedEventAddr, this.lastUsed);
    }
    out.id = id;
    out.len = len;
    return out;
  }

  private fail(msg: string): never {
    this.broken = new DeviceProtocolError(msg);
    throw this.broken;
  }

  private freeChain(head: number): void {
    const n = this.chainDescs[head]!;
    this.chainDescs[head] = 0;
    // Walk our private links, not the descriptor table the device could have scribbled on.
    let idx = head;
    for (let i = 1; i < n; i++) idx = this.nextFree[idx]!;
    this.nextFree[idx] = this.freeHead;
    this.freeHead = head;
    this.free += n;
  }

  /**
   * Re-enables used buffer notifications (virtqueue_enable_cb). Returns true if
   * used buffers are already pending: poll them instead of waiting (§2.7.14 note).
   */
  enableCallbacks(): boolean {
    this.callbacksOn = true;
    if (this.eventIdx) this.mem.storeU16Atomic(this.usedEventAddr, this.lastUsed);
    else this.mem.storeU16Atomic(this.availAddr, 0);
    // Seq-cst store, then seq-cst load: the mb() of the §2.7.14 example.
    return this.hasUsed();
  }

  /** Suppresses used buffer notifications while polling (virtqueue_disable_cb). */
  disableCallbacks(): void {
    this.callbacksOn = false;
    if (this.eventIdx) {
      // §2.7.7.1: with EVENT_IDX flags MUST stay 0. Park used_event half the
      // index space ahead: the device cannot get there while at most Queue
      // Size (<= 32768) buffers are outstanding.
      this.mem.storeU16Atomic(this.usedEventAddr, (this.lastUsed + 0x8000) & 0xffff);
    } else {
      this.mem.storeU16Atomic(this.availAddr, VIRTQ_AVAIL_F_NO_INTERRUPT);
    }
  }
}
