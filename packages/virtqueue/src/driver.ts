// Driver side of a virtio 1.x split virtqueue (virtio 1.2 §2.7.13, §2.7.14):
// what the guest's virtio_ring.c does. Used by guest-driver and by the tests'
// mock driver. It writes through `memory.vcpu`, so its writes are vCPU writes
// for the dirty log.
//
// The driver's own bookkeeping (free list, chain lengths, outstanding heads,
// its shadow indexes) lives in a state block outside guest memory, never read
// back from the rings, so a misbehaving device cannot corrupt it (Linux keeps
// desc_extra/desc_state the same way). The block is private by default; given a
// SharedArrayBuffer, several DriverQueue objects (one per vCPU thread) drive the
// same queue, as a guest's vCPUs share one struct vring_virtqueue, and like
// them they must serialize their calls with a lock (virtio_blk's vq->lock).

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
  /**
   * Keep the driver state in this shared block (driverStateBytes(size) bytes at
   * byteOffset, 8-byte aligned) so other threads can attach to the same queue.
   * attach: false lays the block out (and the rings, per initRings); true joins
   * a queue another DriverQueue laid out, touching neither.
   */
  sharedState?: { buffer: SharedArrayBuffer; byteOffset: number; attach: boolean };
}

// Driver state block: scalar words, then the per-descriptor arrays.
const ST_MAGIC = 0;
const ST_SIZE = 1;
const ST_FREE_HEAD = 2;
const ST_FREE = 3;
const ST_AVAIL_SHADOW = 4;
const ST_NUM_ADDED = 5;
const ST_LAST_USED = 6;
const ST_CALLBACKS_ON = 7;
const ST_BROKEN = 8;
const ST_WORDS = 16;
const STATE_MAGIC = 0x76716472; // "vqdr"
const align8 = (n: number): number => (n + 7) & ~7;

/** Bytes of the driver state block for a queue of `size` (DriverQueueOptions.sharedState). */
export function driverStateBytes(size: number): number {
  return ST_WORDS * 4 + align8(2 * size) * 2 + 8 * size;
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

  /** Scalar state: free head and count, shadow avail idx, adds since the last kick check, last used idx, callbacks on, broken. */
  private readonly st: Int32Array;
  private readonly nextFree: Uint16Array; // private free-list links
  private readonly chainDescs: Uint16Array; // main-table descriptors per outstanding head (0 = not outstanding)
  private readonly chainWritable: Float64Array; // writable bytes offered per head, to check used len
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

    const n = cfg.size;
    const shared = opts.sharedState;
    const bytes = driverStateBytes(n);
    let buf: ArrayBufferLike;
    let off = 0;
    if (shared) {
      if (!Number.isInteger(shared.byteOffset) || shared.byteOffset < 0 || shared.byteOffset % 8 !== 0 || shared.byteOffset + bytes > shared.buffer.byteLength) {
        throw new RangeError(`sharedState: ${bytes} bytes at offset ${shared.byteOffset} (8-byte aligned) do not fit the ${shared.buffer.byteLength}-byte buffer`);
      }
      buf = shared.buffer;
      off = shared.byteOffset;
    } else buf = new ArrayBuffer(bytes);
    this.st = new Int32Array(buf, off, ST_WORDS);
    this.nextFree = new Uint16Array(buf, off + ST_WORDS * 4, n);
    this.chainDescs = new Uint16Array(buf, off + ST_WORDS * 4 + align8(2 * n), n);
    this.chainWritable = new Float64Array(buf, off + ST_WORDS * 4 + 2 * align8(2 * n), n);

    if (shared?.attach) {
      if (Atomics.load(this.st, ST_MAGIC) !== STATE_MAGIC || this.st[ST_SIZE] !== n) {
        throw new RangeError(`sharedState: no driver state for a queue of size ${n} at offset ${off} (lay it out with attach: false first)`);
      }
      return;
    }
    for (let i = 0; i < n; i++) {
      this.nextFree[i] = i + 1 < n ? i + 1 : NONE;
      this.chainDescs[i] = 0;
      this.chainWritable[i] = 0;
    }
    const st = this.st;
    st.fill(0);
    st[ST_SIZE] = n;
    st[ST_FREE] = n;
    st[ST_CALLBACKS_ON] = 1;
    if (opts.initRings ?? true) {
      this.mem.fill(cfg.descAddr, descTableBytes(n), 0);
      this.mem.fill(cfg.availAddr, availRingBytes(n), 0);
      this.mem.fill(cfg.usedAddr, usedRingBytes(n), 0);
    } else {
      st[ST_AVAIL_SHADOW] = this.mem.loadU16Atomic(this.availIdxAddr);
      st[ST_LAST_USED] = this.mem.loadU16Atomic(this.usedIdxAddr);
    }
    // Seq-cst store last: a thread that attaches after seeing the magic sees the rest.
    Atomics.store(st, ST_MAGIC, STATE_MAGIC);
  }

  /** Free descriptors in the main table. */
  get numFree(): number {
    return this.st[ST_FREE]!;
  }

  /**
   * The head the next add() will use, or -1 if no descriptor is free: lets a
   * driver fill per-head side data before the chain becomes visible.
   */
  get nextHead(): number {
    return this.st[ST_FREE]! > 0 ? this.st[ST_FREE_HEAD]! : -1;
  }

  /** Chains added and not yet taken back from the used ring. */
  get outstanding(): number {
    return (this.st[ST_AVAIL_SHADOW]! - this.st[ST_LAST_USED]!) & 0xffff;
  }

  /** The device protocol violation that stopped this queue (seen by any thread sharing it), or null. */
  get brokenReason(): DeviceProtocolError | null {
    return this.checkBroken();
  }

  private checkBroken(): DeviceProtocolError | null {
    if (this.broken === null && this.st[ST_BROKEN] !== 0) this.broken = new DeviceProtocolError("the device broke the used ring protocol (seen by another thread driving this queue)");
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
    const st = this.st;
    if (st[ST_BROKEN] !== 0) throw this.checkBroken()!;
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
    if (st[ST_FREE]! < needed) return -1;

    const head = st[ST_FREE_HEAD]!;
    if (indirect) {
      const table = this.indirectAddr + head * this.maxIndirect * DESC_SIZE;
      for (let i = 0; i < total; i++) {
        const w = i >= readable.length;
        const s = w ? writable[i - readable.length]! : readable[i]!;
        const last = i === total - 1;
        this.writeDesc(table + i * DESC_SIZE, s.addr, s.len, (w ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT), last ? 0 : i + 1);
      }
      st[ST_FREE_HEAD] = this.nextFree[head]!;
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
      st[ST_FREE_HEAD] = this.nextFree[idx]!;
    }
    st[ST_FREE] = st[ST_FREE]! - needed;
    this.chainDescs[head] = needed;
    this.chainWritable[head] = writableBytes;

    // §2.7.13.2: place the head in the next avail ring slot...
    const avail = st[ST_AVAIL_SHADOW]!;
    this.mem.writeU16(this.availRingAddr + 2 * (avail & this.mask), head);
    const newAvail = (avail + 1) & 0xffff;
    st[ST_AVAIL_SHADOW] = newAvail;
    st[ST_NUM_ADDED] = st[ST_NUM_ADDED]! + 1;
    // ...§2.7.13.3.1: then publish idx after a barrier. Atomics.store is
    // sequentially consistent: every plain write above (descriptors, ring
    // entry) happens-before it, so a device that Atomics.load()s the new idx
    // sees them (the virtio_wmb + store of virtio_ring.c).
    this.mem.storeU16Atomic(this.availIdxAddr, newAvail);
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
    const st = this.st;
    const added = st[ST_NUM_ADDED]!;
    if (added === 0) return false;
    st[ST_NUM_ADDED] = 0;
    // 65536 or more adds without a check: the 16-bit window is ambiguous, kick.
    if (added > 0xffff) return true;
    if (this.eventIdx) {
      const newIdx = st[ST_AVAIL_SHADOW]!;
      const oldIdx = (newIdx - added) & 0xffff;
      // §2.7.10.1 with EVENT_IDX: notify iff avail->idx crossed avail_event.
      return vringNeedEvent(this.mem.loadU16Atomic(this.availEventAddr), newIdx, oldIdx);
    }
    // §2.7.10.1 without EVENT_IDX: used->flags 1 "SHOULD NOT", 0 "MUST".
    return (this.mem.loadU16Atomic(this.usedAddr) & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /** True if the device has returned buffers not yet taken with popUsed(). */
  hasUsed(): boolean {
    return this.mem.loadU16Atomic(this.usedIdxAddr) !== Atomics.load(this.st, ST_LAST_USED);
  }

  /**
   * Takes the next used element (virtqueue_get_buf) and frees its descriptors.
   * Returns null if none. `out` is filled and returned (default: an internal
   * object reused by every call). Throws DeviceProtocolError if the device
   * returned an id that is not an outstanding head, a len larger than the
   * writable bytes offered, or moved used->idx too far.
   */
  popUsed(out: UsedElement = this.scratch): UsedElement | null {
    const st = this.st;
    if (st[ST_BROKEN] !== 0) throw this.checkBroken()!;
    const usedIdx = this.mem.loadU16Atomic(this.usedIdxAddr);
    const lastUsed = st[ST_LAST_USED]!;
    if (usedIdx === lastUsed) return null;
    // The seq-cst load of used->idx above orders the element reads below after
    // it (virtio_rmb); the device stored id/len before idx (§2.7.8.2).
    if (((usedIdx - lastUsed) & 0xffff) > this.outstanding) {
      return this.fail(`used->idx moved from ${lastUsed} to ${usedIdx} with only ${this.outstanding} buffers outstanding`);
    }
    const e = this.usedRingAddr + 8 * (lastUsed & this.mask);
    const id = this.mem.readU32(e);
    const len = this.mem.readU32(e + 4);
    if (id >= this.size || this.chainDescs[id] === 0) return this.fail(`used id ${id} is not an outstanding head`);
    if (len > this.chainWritable[id]!) return this.fail(`used len ${len} for head ${id} exceeds the ${this.chainWritable[id]} writable bytes offered`);
    this.freeChain(id);
    const next = (lastUsed + 1) & 0xffff;
    Atomics.store(st, ST_LAST_USED, next);
    if (this.eventIdx && st[ST_CALLBACKS_ON] !== 0) {
      // Ask for an interrupt for the very next used entry (virtqueue_get_buf_ctx_split).
      this.mem.storeU16Atomic(this.usedEventAddr, next);
    }
    out.id = id;
    out.len = len;
    return out;
  }

  private fail(msg: string): never {
    this.broken = new DeviceProtocolError(msg);
    Atomics.store(this.st, ST_BROKEN, 1);
    throw this.broken;
  }

  private freeChain(head: number): void {
    const n = this.chainDescs[head]!;
    this.chainDescs[head] = 0;
    // Walk our private links, not the descriptor table the device could have scribbled on.
    let idx = head;
    for (let i = 1; i < n; i++) idx = this.nextFree[idx]!;
    const st = this.st;
    this.nextFree[idx] = st[ST_FREE_HEAD]!;
    st[ST_FREE_HEAD] = head;
    st[ST_FREE] = st[ST_FREE]! + n;
  }

  /**
   * Re-enables used buffer notifications (virtqueue_enable_cb). Returns true if
   * used buffers are already pending: poll them instead of waiting (§2.7.14 note).
   */
  enableCallbacks(): boolean {
    this.st[ST_CALLBACKS_ON] = 1;
    if (this.eventIdx) this.mem.storeU16Atomic(this.usedEventAddr, this.st[ST_LAST_USED]!);
    else this.mem.storeU16Atomic(this.availAddr, 0);
    // Seq-cst store, then seq-cst load: the mb() of the §2.7.14 example.
    return this.hasUsed();
  }

  /** Suppresses used buffer notifications while polling (virtqueue_disable_cb). */
  disableCallbacks(): void {
    this.st[ST_CALLBACKS_ON] = 0;
    if (this.eventIdx) {
      // §2.7.7.1: with EVENT_IDX flags MUST stay 0. Park used_event half the
      // index space ahead: the device cannot get there while at most Queue
      // Size (<= 32768) buffers are outstanding.
      this.mem.storeU16Atomic(this.usedEventAddr, (this.st[ST_LAST_USED]! + 0x8000) & 0xffff);
    } else {
      this.mem.storeU16Atomic(this.availAddr, VIRTQ_AVAIL_F_NO_INTERRUPT);
    }
  }
}
