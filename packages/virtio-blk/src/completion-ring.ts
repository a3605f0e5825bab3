// The vhost-blk completion ring: vhost-worker (producer) hands finished requests
// to completion-thread (consumer) through a single-producer single-consumer ring
// in a shared file, as Linux AIO's completion ring (struct aio_ring) is shared
// between the kernel and io_getevents. The seed's worker_host_kick thread reads
// io_events and does set_status + vhost_add_used + vhost_signal; here that thread
// is another process.
//
// File layout (little-endian; one file per queue, COMPLETION_RING_HEADER_BYTES + 16 * entries):
//   0   u32 magic "VBCR"       written last at create, so a reader trusts the rest
//   4   u32 version
//   8   u32 entries            ring capacity = Queue Size (one entry per head in flight at most)
//   12  u32 queue size
//   16  f64 desc addr          } the guest queue (VHOST_SET_VRING_ADDR), so the consumer
//   24  f64 avail addr         } can fill the used ring without another control call
//   32  f64 used addr          }
//   40  u32 flags              EVENT_IDX | LOG_ALL | NOTIFY_ON_EMPTY (Atomics; LOG_ALL can change live)
//   44  u32 tail               producer index (free-running), Atomics.store after the entry is written
//   48  u32 head               consumer index (free-running), Atomics.store after used->idx is published
//   52  u32 consumer pid       0 when no completion-thread is attached
//   64  16-byte Doorbell       the producer rings it; the consumer sleeps on it when the ring is empty
//   4096 entries[entries]: u32 id (head | status << 16), u32 len, f64 status addr
//   T    trace slots[Queue Size], 64 bytes each, one per descriptor head (T = traceSlotsOffset):
//        0 u32 state (0 none, 1 the guest's span context is here, 2 the worker's span id too)
//        4 u32 trace flags   8 trace id (16 bytes)   24 guest span id (8)   32 worker span id (8)
//        The guest writes a slot only for a sampled request and clears it when the request
//        completes, so an unsampled request costs one Atomics.load on each side and no span.
//   I    inflight[Queue Size] u32 (I = inflightOffset): 0 free, 1 popped and submitted by the
//        worker, 2 its completion is in the ring. The worker stores 1 at pop (before last avail
//        idx), 1 -> 2 after the push; the consumer stores 0 before publishing the used element.
//        vhost-user's inflight region: a restarted worker re-submits every head still at 1
//        that is not in the ring, and nothing else.
//
// Ordering: an entry's plain writes happen before the seq-cst store of tail; the
// consumer's seq-cst load of tail happens before its plain reads of the entry.
// tail - head (u32) is the number of completions not yet on the used ring.

export const COMPLETION_RING_MAGIC = 0x52434256; // "VBCR"
export const COMPLETION_RING_VERSION = 1;
export const COMPLETION_RING_HEADER_BYTES = 4096;
export const COMPLETION_ENTRY_BYTES = 16;
export const COMPLETION_DOORBELL_OFFSET = 64;

export const CRING_F_EVENT_IDX = 1;
export const CRING_F_LOG_ALL = 2;
export const CRING_F_NOTIFY_ON_EMPTY = 4;

const W_MAGIC = 0;
const W_VERSION = 1;
const W_ENTRIES = 2;
const W_QSIZE = 3;
const W_FLAGS = 10;
const W_TAIL = 11;
const W_HEAD = 12;
const W_PID = 13;
const W_LAST_AVAIL = 14;
const W_BATCH_VALID = 20;
const W_BATCH_HEAD = 21;
const W_BATCH_USED = 22;

export const TRACE_SLOT_BYTES = 64;
export const TRACE_NONE = 0;
export const TRACE_GUEST = 1;
export const TRACE_WORKER = 2;

export function traceSlotsOffset(entries: number): number {
  return Math.ceil((COMPLETION_RING_HEADER_BYTES + COMPLETION_ENTRY_BYTES * entries) / TRACE_SLOT_BYTES) * TRACE_SLOT_BYTES;
}

export function inflightOffset(entries: number): number {
  return traceSlotsOffset(entries) + TRACE_SLOT_BYTES * entries;
}

export function completionRingBytes(entries: number): number {
  return inflightOffset(entries) + 4 * entries;
}

export const INFLIGHT_FREE = 0;
export const INFLIGHT_SUBMITTED = 1;
export const INFLIGHT_PUSHED = 2;

/** A W3C span context read from a trace slot (hex strings, as @opentelemetry/api wants them). */
export interface SlotSpanContext {
  traceId: string;
  traceFlags: number;
  guestSpanId: string;
  workerSpanId: string;
}

const hex = (b: Uint8Array, from: number, to: number): string => {
  let s = "";
  for (let i = from; i < to; i++) s += b[i]!.toString(16).padStart(2, "0");
  return s;
};
const unhex = (b: Uint8Array, at: number, h: string, n: number): void => {
  for (let i = 0; i < n; i++) b[at + i] = parseInt(h.slice(2 * i, 2 * i + 2), 16) || 0;
};

/** Where vhost-worker puts a queue's completion ring: `<shmDir>/vhost-blk.<vm>.<device>.<index>.cring`. */
export function completionRingFileName(vm: string, device: string, index: number): string {
  return `vhost-blk.${vm}.${device}.${index}.cring`;
}

export interface CompletionRingQueue {
  size: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
}

/** A view of a completion ring inside `buffer` (a MAP_SHARED mapping of the ring file). */
export class CompletionRing {
  readonly entries: number;
  readonly mask: number;
  readonly queue: CompletionRingQueue;
  private readonly words: Int32Array;
  private readonly u32: Uint32Array;
  private readonly ent32: Uint32Array;
  private readonly entF64: Float64Array;
  private readonly traceWords: Int32Array;
  private readonly traceBytes: Uint8Array;
  private readonly inflight: Int32Array;

  private constructor(buffer: ArrayBufferLike) {
    this.words = new Int32Array(buffer, 0, COMPLETION_RING_HEADER_BYTES / 4);
    this.u32 = new Uint32Array(buffer, 0, COMPLETION_RING_HEADER_BYTES / 4);
    const f64 = new Float64Array(buffer, 0, 8);
    this.entries = this.u32[W_ENTRIES]!;
    this.mask = this.entries - 1;
    this.queue = { size: this.u32[W_QSIZE]!, descAddr: f64[2]!, availAddr: f64[3]!, usedAddr: f64[4]! };
    this.ent32 = new Uint32Array(buffer, COMPLETION_RING_HEADER_BYTES, (COMPLETION_ENTRY_BYTES / 4) * this.entries);
    this.entF64 = new Float64Array(buffer, COMPLETION_RING_HEADER_BYTES, (COMPLETION_ENTRY_BYTES / 8) * this.entries);
    const t = traceSlotsOffset(this.entries);
    this.traceWords = new Int32Array(buffer, t, (TRACE_SLOT_BYTES / 4) * this.entries);
    this.traceBytes = new Uint8Array(buffer, t, TRACE_SLOT_BYTES * this.entries);
    this.inflight = new Int32Array(buffer, inflightOffset(this.entries), this.entries);
  }

  // --- inflight region (crash recovery) ---

  inflightState(head: number): number {
    return Atomics.load(this.inflight, head & this.mask);
  }
  /** Worker, at pop: the head is ours until its used element is published. */
  markSubmitted(head: number, lastAvailIdx: number): void {
    Atomics.store(this.inflight, head & this.mask, INFLIGHT_SUBMITTED);
    Atomics.store(this.words, W_LAST_AVAIL, lastAvailIdx & 0xffff);
  }
  /** Worker, after push: the completion is in the ring (1 -> 2 only: the consumer may have cleared it already). */
  markPushed(head: number): void {
    Atomics.compareExchange(this.inflight, head & this.mask, INFLIGHT_SUBMITTED, INFLIGHT_PUSHED);
  }
  /** Consumer, before publishing the used element: the guest may reuse the head after that. */
  markFree(head: number): void {
    Atomics.store(this.inflight, head & this.mask, INFLIGHT_FREE);
  }
  get lastAvailIdx(): number {
    return Atomics.load(this.words, W_LAST_AVAIL) & 0xffff;
  }
  /** True if a completion for `id` sits in the ring, not yet consumed. */
  hasPendingCompletion(id: number): boolean {
    const tail = Atomics.load(this.u32, W_TAIL);
    for (let i = Atomics.load(this.u32, W_HEAD); i !== tail; i = (i + 1) >>> 0) if (this.entryId(i) === id) return true;
    return false;
  }
  /** Consumer: records where the batch it is about to commit starts. */
  beginBatch(head: number, usedIdx: number): void {
    Atomics.store(this.u32, W_BATCH_HEAD, head >>> 0);
    Atomics.store(this.u32, W_BATCH_USED, usedIdx & 0xffff);
    Atomics.store(this.u32, W_BATCH_VALID, 1);
  }
  /**
   * Consumer restart: the first entry not yet on the used ring, given used->idx
   * from guest memory (the commit point of each element).
   */
  recoverHead(usedIdx: number): number {
    if (Atomics.load(this.u32, W_BATCH_VALID) !== 1) return this.head;
    const committed = (usedIdx - Atomics.load(this.u32, W_BATCH_USED)) & 0xffff;
    return (Atomics.load(this.u32, W_BATCH_HEAD) + committed) >>> 0;
  }

  /** Trace slot state of descriptor head `head` (one Atomics.load: the unsampled fast path). */
  traceState(head: number): number {
    return Atomics.load(this.traceWords, (head & this.mask) * (TRACE_SLOT_BYTES / 4));
  }

  /** Guest: a sampled request's span context, published with the state store. */
  writeGuestTrace(head: number, traceId: string, spanId: string, traceFlags: number): void {
    const at = (head & this.mask) * TRACE_SLOT_BYTES;
    unhex(this.traceBytes, at + 8, traceId, 16);
    unhex(this.traceBytes, at + 24, spanId, 8);
    this.traceWords[at / 4 + 1] = traceFlags;
    Atomics.store(this.traceWords, at / 4, TRACE_GUEST);
  }

  /** Worker: its span id, the parent of the completion-thread's span. */
  writeWorkerSpan(head: number, spanId: string): void {
    const at = (head & this.mask) * TRACE_SLOT_BYTES;
    unhex(this.traceBytes, at + 32, spanId, 8);
    Atomics.store(this.traceWords, at / 4, TRACE_WORKER);
  }

  readTrace(head: number): SlotSpanContext {
    const at = (head & this.mask) * TRACE_SLOT_BYTES;
    const b = this.traceBytes;
    return { traceId: hex(b, at + 8, at + 24), traceFlags: this.traceWords[at / 4 + 1]!, guestSpanId: hex(b, at + 24, at + 32), workerSpanId: hex(b, at + 32, at + 40) };
  }

  /** Guest: the request completed; the head may be reused by an unsampled request. */
  clearTrace(head: number): void {
    Atomics.store(this.traceWords, (head & this.mask) * (TRACE_SLOT_BYTES / 4), TRACE_NONE);
  }

  /** Initialises a fresh ring (the producer, at BLK_SET_BACKEND) and returns its view. */
  static init(buffer: ArrayBufferLike, q: CompletionRingQueue, flags: number): CompletionRing {
    const entries = q.size;
    if (!(entries >= 1 && (entries & (entries - 1)) === 0)) throw new RangeError(`completion ring: ${entries} entries is not a power of 2`);
    if (buffer.byteLength < completionRingBytes(entries)) throw new RangeError(`completion ring: buffer of ${buffer.byteLength} bytes < ${completionRingBytes(entries)}`);
    const w = new Int32Array(buffer, 0, COMPLETION_RING_HEADER_BYTES / 4);
    const f64 = new Float64Array(buffer, 0, 8);
    Atomics.store(w, W_MAGIC, 0);
    w[W_VERSION] = COMPLETION_RING_VERSION;
    w[W_ENTRIES] = entries;
    w[W_QSIZE] = q.size;
    f64[2] = q.descAddr;
    f64[3] = q.availAddr;
    f64[4] = q.usedAddr;
    Atomics.store(w, W_FLAGS, flags);
    Atomics.store(w, W_TAIL, 0);
    Atomics.store(w, W_HEAD, 0);
    Atomics.store(w, W_PID, 0);
    new Uint8Array(buffer, traceSlotsOffset(entries), completionRingBytes(entries) - traceSlotsOffset(entries)).fill(0);
    Atomics.store(w, W_LAST_AVAIL, 0);
    Atomics.store(w, W_BATCH_VALID, 0);
    Atomics.store(w, W_MAGIC, COMPLETION_RING_MAGIC);
    return new CompletionRing(buffer);
  }

  /** Opens an initialised ring (the consumer, or a restarted producer). Checks the header. */
  static open(buffer: ArrayBufferLike): CompletionRing {
    if (buffer.byteLength < COMPLETION_RING_HEADER_BYTES) throw new RangeError(`completion ring: file of ${buffer.byteLength} bytes is too small`);
    const w = new Int32Array(buffer, 0, COMPLETION_RING_HEADER_BYTES / 4);
    if (Atomics.load(w, W_MAGIC) !== COMPLETION_RING_MAGIC) throw new Error("completion ring: bad magic (not initialised)");
    if (w[W_VERSION] !== COMPLETION_RING_VERSION) throw new Error(`completion ring: version ${w[W_VERSION]}, expected ${COMPLETION_RING_VERSION}`);
    const entries = w[W_ENTRIES]!;
    if (!(entries >= 1 && entries <= 32768 && (entries & (entries - 1)) === 0)) throw new Error(`completion ring: bad entry count ${entries}`);
    if (buffer.byteLength < completionRingBytes(entries)) throw new Error(`completion ring: file too small for ${entries} entries`);
    return new CompletionRing(buffer);
  }

  get flags(): number {
    return Atomics.load(this.words, W_FLAGS);
  }
  set flags(f: number) {
    Atomics.store(this.words, W_FLAGS, f);
  }
  get tail(): number {
    return Atomics.load(this.u32, W_TAIL);
  }
  get head(): number {
    return Atomics.load(this.u32, W_HEAD);
  }
  /** Completions pushed and not yet consumed. */
  get pending(): number {
    return (Atomics.load(this.u32, W_TAIL) - Atomics.load(this.u32, W_HEAD)) >>> 0;
  }
  get consumerPid(): number {
    return Atomics.load(this.words, W_PID);
  }
  set consumerPid(pid: number) {
    Atomics.store(this.words, W_PID, pid);
  }

  /**
   * Producer: appends one completion and publishes it. Never allocates. Returns
   * false if the ring is full (cannot happen while at most `entries` heads are in flight).
   */
  push(id: number, status: number, len: number, statusAddr: number): boolean {
    const t = Atomics.load(this.u32, W_TAIL);
    if (((t - Atomics.load(this.u32, W_HEAD)) >>> 0) >= this.entries) return false;
    const i = t & this.mask;
    this.ent32[4 * i] = (id & 0xffff) | ((status & 0xff) << 16);
    this.ent32[4 * i + 1] = len;
    this.entF64[2 * i + 1] = statusAddr;
    // Seq-cst: the entry above is visible before the new tail.
    Atomics.store(this.u32, W_TAIL, (t + 1) >>> 0);
    return true;
  }

  /** Consumer: the entry at free-running index `idx` (between head and tail). */
  entryId(idx: number): number {
    return this.ent32[4 * (idx & this.mask)]! & 0xffff;
  }
  entryStatus(idx: number): number {
    return (this.ent32[4 * (idx & this.mask)]! >>> 16) & 0xff;
  }
  entryLen(idx: number): number {
    return this.ent32[4 * (idx & this.mask) + 1]!;
  }
  entryStatusAddr(idx: number): number {
    return this.entF64[2 * (idx & this.mask) + 1]!;
  }
  /** Consumer: everything before `idx` is on the used ring. */
  consumeTo(idx: number): void {
    Atomics.store(this.u32, W_HEAD, idx >>> 0);
  }
}
