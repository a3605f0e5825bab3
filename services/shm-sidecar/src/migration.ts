// The source side of the migration page stream, after QEMU migration/ram.c:
//  - MigrationBitmap is RAMBlock->bmap: one bit per guest page still to send,
//    the skip bitmap (ballooned, free-hinted pages) is left out of its first fill;
//  - mergeLog / mergeRange are migration_bitmap_sync's fold of the dirty logs;
//  - sendDirtyPages is ram_save_iterate / ram_find_and_save_block: every set
//    page in pfn order, zero pages as a flag (save_zero_page), the rest with
//    their bytes, through a rate limiter (migration_rate_limit, max-bandwidth);
//  - checksumPages is the memory comparison the stop-and-copy phase ends with (crc32c).
// Everything here is pure or does only the I/O it is handed (a PageSink, a
// clock, a sleep), so the unit tests drive it without gRPC, files or timers.
import { crc32c } from "@virtmesh/shm";
import { status as Status } from "@grpc/grpc-js";
import type { sidecar } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { GUEST_PAGE_SIZE } from "./config";

export const DEFAULT_BATCH_PAGES = 256;
/** A batch of 4096 pages is 16 MiB of data: well inside the 64 MiB gRPC message limit of the receiver. */
export const MAX_BATCH_PAGES = 4096;
/** Below one page per second a migration never ends; 0 means unlimited. */
export const MIN_BANDWIDTH_BYTES_PER_S = GUEST_PAGE_SIZE;
/** The rate limiter lets this much time's worth of bytes go at once (QEMU's BUFFER_DELAY, 100 ms). */
export const RATE_WINDOW_MS = 100;

/** Bytes of a page bitmap for `pages` pages: whole little-endian 64-bit words, as FetchDirtyLog's bitmap. */
export function pageBitmapBytes(pages: number): number {
  return Math.ceil(pages / 64) * 8;
}

function popcount32(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** Bit `b` and up of a 32-bit word. */
const fromBit = (b: number): number => (b >= 32 ? 0 : (0xffffffff << b) >>> 0);

/**
 * Checks a caller's page bitmap (skip_bitmap, exclude_bitmap): empty, or exactly
 * ceil(pages/64)*8 bytes with no bit past the last page. INVALID_ARGUMENT otherwise.
 */
export function checkPageBitmap(field: string, bitmap: Uint8Array, pages: number): void {
  if (bitmap.length === 0) return;
  const want = pageBitmapBytes(pages);
  if (bitmap.length !== want) {
    throw new GrpcError(
      Status.INVALID_ARGUMENT,
      `${field} has ${bitmap.length} bytes; ${pages} guest pages need exactly ${want} (one bit per page in 64-bit words) or none`,
    );
  }
  for (let byte = pages >>> 3; byte < bitmap.length; byte++) {
    const v = bitmap[byte]! & (byte === pages >>> 3 ? ~((1 << (pages & 7)) - 1) & 0xff : 0xff);
    if (v !== 0) {
      const bit = byte * 8 + (31 - Math.clz32(v & -v));
      throw new GrpcError(Status.INVALID_ARGUMENT, `${field} sets bit ${bit}, past the last guest page ${pages - 1}`);
    }
  }
}

/** A page bitmap in 32-bit words (bit n: word n >>> 5, bit n & 31), the little-endian layout of the proto's 64-bit words. */
function wordsOf(bitmap: Uint8Array, words: number): Uint32Array {
  const out = new Uint32Array(words);
  new Uint8Array(out.buffer).set(bitmap.subarray(0, words * 4));
  return out;
}

/**
 * RAMBlock->bmap: the pages still to send. `skip` pages (ballooned, free-page
 * hinted) are left out of the first fill only: a skipped page the guest writes
 * later (deflated, or allocated again) shows up in a dirty log and is sent like
 * any other (QEMU's free page hinting clears hinted pages from the bitmap once;
 * the dirty log still catches their reuse).
 */
export class MigrationBitmap {
  readonly words: Uint32Array;
  readonly skipped: number;
  private readonly keep: Uint32Array;
  private count = 0;
  /** The round of the last SendDirty that succeeded; rounds never go back. */
  lastRound = -1;
  /** A SendDirty is streaming pages of this bitmap. */
  sending = false;

  /** Every page set except the skipped ones. `skip` was checked with checkPageBitmap. */
  constructor(
    readonly pages: number,
    skip: Uint8Array = new Uint8Array(0),
  ) {
    const n = Math.ceil(pages / 32);
    this.words = new Uint32Array(n);
    this.keep = new Uint32Array(n);
    const sk = skip.length ? wordsOf(skip, n) : null;
    let skipped = 0;
    for (let i = 0; i < n; i++) {
      let w = 0xffffffff;
      if (i === n - 1 && pages & 31) w = (1 << (pages & 31)) - 1;
      const s = sk ? sk[i]! & w : 0;
      skipped += popcount32(s);
      w = (w & ~s) >>> 0;
      this.keep[i] = w;
      this.words[i] = w;
      this.count += popcount32(w);
    }
    this.skipped = skipped;
  }

  /** Bits set: the pages still to send (migration's `remaining`). */
  get dirty(): number {
    return this.count;
  }

  isSkipped(pfn: number): boolean {
    return pfn >= 0 && pfn < this.pages && (this.keep[pfn >>> 5]! & (1 << (pfn & 31))) === 0;
  }

  test(pfn: number): boolean {
    return (this.words[pfn >>> 5]! & (1 << (pfn & 31))) !== 0;
  }

  /** Clears one page's bit (migration_bitmap_clear_dirty); true when it was set. */
  clear(pfn: number): boolean {
    const i = pfn >>> 5;
    const m = 1 << (pfn & 31);
    const w = this.words[i]!;
    if ((w & m) === 0) return false;
    this.words[i] = w & ~m;
    this.count--;
    return true;
  }

  /**
   * migration_bitmap_sync for one whole-VM log (KVM_GET_DIRTY_LOG's layout, as
   * FetchDirtyLog returns it): ors it in minus skipped pages; returns the pages
   * newly set.
   */
  mergeLog(log: Uint8Array): number {
    const words = log.byteOffset % 4 === 0 && log.length >= this.words.length * 4
      ? new Uint32Array(log.buffer, log.byteOffset, this.words.length)
      : wordsOf(log, this.words.length);
    return this.orWords(words);
  }

  /** Ors in another bitmap's words (same page count); returns the pages newly set. A skipped page written since is skipped no more. */
  orWords(words: Uint32Array): number {
    let added = 0;
    const last = this.words.length - 1;
    for (let i = 0; i < this.words.length; i++) {
      const old = this.words[i]!;
      const valid = i === last && this.pages & 31 ? (1 << (this.pages & 31)) - 1 : 0xffffffff;
      const add = (words[i]! & valid & ~old) >>> 0;
      if (add === 0) continue;
      this.keep[i] = (this.keep[i]! | add) >>> 0;
      this.words[i] = (old | add) >>> 0;
      added += popcount32(add);
    }
    this.count += added;
    return added;
  }

  /**
   * Ors in a bitmap whose bit n is page firstPfn + n, for npages pages (a VFIO
   * GET_BITMAP over one DMA mapping, bits by iova, placed at the mapping's gpa).
   * Pages past guest memory are ignored. Returns the pages newly set.
   */
  mergeRange(bitmap: Uint8Array, firstPfn: number, npages: number): number {
    let added = 0;
    const end = Math.min(npages, this.pages - firstPfn);
    for (let byte = 0; byte * 8 < end; byte++) {
      let v = bitmap[byte] ?? 0;
      while (v !== 0) {
        const b = 31 - Math.clz32(v & -v);
        v &= v - 1;
        const n = byte * 8 + b;
        if (n >= end) break;
        const pfn = firstPfn + n;
        const i = pfn >>> 5;
        const m = 1 << (pfn & 31);
        if ((this.words[i]! & m) !== 0) continue;
        this.keep[i] = (this.keep[i]! | m) >>> 0;
        this.words[i] = this.words[i]! | m;
        added++;
      }
    }
    this.count += added;
    return added;
  }

  /** find_next_bit: the first set page at or after `from`, or -1. */
  nextDirty(from: number): number {
    if (from >= this.pages) return -1;
    let i = from >>> 5;
    let w = (this.words[i]! & fromBit(from & 31)) >>> 0;
    for (;;) {
      if (w !== 0) return i * 32 + (31 - Math.clz32(w & -w));
      if (++i >= this.words.length) return -1;
      w = this.words[i]!;
    }
  }
}

/** A set of pages in 32-bit words: the pages a SendDirty has taken out of the bitmap. */
export class PageSet {
  readonly words: Uint32Array;
  size = 0;
  constructor(readonly pages: number) {
    this.words = new Uint32Array(Math.ceil(pages / 32));
  }
  add(pfn: number): void {
    const i = pfn >>> 5;
    const m = 1 << (pfn & 31);
    if ((this.words[i]! & m) !== 0) return;
    this.words[i] = this.words[i]! | m;
    this.size++;
  }
}

/**
 * A token bucket for max-bandwidth (QEMU's migration rate limit): `take`
 * charges the bytes about to go and says how long to wait before sending them.
 * The bucket may go into debt, so a batch larger than the burst still goes and
 * the average rate holds. Pure: the caller passes the time.
 */
export class TokenBucket {
  private tokens: number;
  private last: number;
  readonly burstBytes: number;

  constructor(
    readonly rateBytesPerS: number,
    nowMs: number,
    burstBytes = Math.max(1, Math.floor((rateBytesPerS * RATE_WINDOW_MS) / 1000)),
  ) {
    if (!(rateBytesPerS > 0) || !Number.isFinite(rateBytesPerS)) throw new RangeError(`TokenBucket: rate ${rateBytesPerS} must be positive`);
    if (!(burstBytes > 0)) throw new RangeError(`TokenBucket: burst ${burstBytes} must be positive`);
    this.burstBytes = burstBytes;
    this.tokens = burstBytes;
    this.last = nowMs;
  }

  /** Charges `bytes` at `nowMs`; returns the milliseconds to wait before they may go (0: at once). */
  take(bytes: number, nowMs: number): number {
    if (nowMs > this.last) {
      this.tokens = Math.min(this.burstBytes, this.tokens + ((nowMs - this.last) * this.rateBytesPerS) / 1000);
      this.last = nowMs;
    }
    this.tokens -= bytes;
    return this.tokens >= 0 ? 0 : (-this.tokens * 1000) / this.rateBytesPerS;
  }
}

/**
 * Guest memory as Buffers over windows of the mapping (one window when it fits
 * one ArrayBuffer), so reading a page allocates nothing: Buffer.compare and
 * Buffer.copy take offsets.
 */
export class GuestPages {
  private window: Buffer | null = null;
  private windowBase = 0;
  readonly pages: number;
  readonly windowBytes: number;

  constructor(
    readonly memoryBytes: number,
    private readonly view: (offset: number, length: number) => ArrayBuffer,
    windowBytes = 1 << 30,
    /** The memory file's data as [start, end) byte pairs (lseek SEEK_DATA/SEEK_HOLE); the rest reads as zeros. Absent: all data. */
    private readonly dataSegments: ((offset: number, length: number) => number[]) | null = null,
  ) {
    this.pages = memoryBytes / GUEST_PAGE_SIZE;
    this.windowBytes = Math.min(memoryBytes, Math.max(GUEST_PAGE_SIZE, windowBytes - (windowBytes % GUEST_PAGE_SIZE)));
  }

  /** The window holding page `pfn` and the page's offset in it. */
  private at(pfn: number): number {
    const off = pfn * GUEST_PAGE_SIZE;
    if (this.window === null || off < this.windowBase || off >= this.windowBase + this.window.length) {
      const base = off - (off % this.windowBytes);
      const len = Math.min(this.windowBytes, this.memoryBytes - base);
      this.window = Buffer.from(this.view(base, len));
      this.windowBase = base;
    }
    return off - this.windowBase;
  }

  /** The hole map of one chunk of HOLE_CHUNK_PAGES pages, asked once per chunk. */
  private holeChunk = -1;
  private holeBits: Uint8Array | null = null;

  /** Page `pfn` is a hole of the memory file: zeros, and reading it would allocate it (tmpfs). */
  isHole(pfn: number): boolean {
    if (!this.dataSegments) return false;
    const chunk = Math.floor(pfn / HOLE_CHUNK_PAGES);
    if (chunk !== this.holeChunk || !this.holeBits) {
      const first = chunk * HOLE_CHUNK_PAGES;
      const n = Math.min(HOLE_CHUNK_PAGES, this.pages - first);
      const bits = (this.holeBits ??= new Uint8Array(HOLE_CHUNK_PAGES));
      bits.fill(0);
      for (const s of this.segments(first, n)) if (s.hole) bits.fill(1, s.pfn - first, s.pfn - first + s.count);
      this.holeChunk = chunk;
    }
    return this.holeBits[pfn - chunk * HOLE_CHUNK_PAGES] === 1;
  }

  /** Forget the hole map (the file changed: pages written or punched since). */
  forgetHoles(): void {
    this.holeChunk = -1;
  }

  isZero(pfn: number): boolean {
    if (this.isHole(pfn)) return true;
    const o = this.at(pfn);
    return this.window!.compare(ZERO_PAGE, 0, GUEST_PAGE_SIZE, o, o + GUEST_PAGE_SIZE) === 0;
  }

  /**
   * Pages [pfn, pfn + count) as runs of holes (zero: true, never read: on tmpfs reading
   * a hole through the mapping would allocate it) and of data, in order.
   */
  private segments(pfn: number, count: number): { pfn: number; count: number; hole: boolean }[] {
    if (!this.dataSegments) return [{ pfn, count, hole: false }];
    const out: { pfn: number; count: number; hole: boolean }[] = [];
    const seg = this.dataSegments(pfn * GUEST_PAGE_SIZE, count * GUEST_PAGE_SIZE);
    let at = pfn;
    const end = pfn + count;
    for (let i = 0; i < seg.length; i += 2) {
      // Data boundaries are page-aligned on tmpfs; widen to whole pages to be safe.
      const a = Math.max(at, Math.floor(seg[i]! / GUEST_PAGE_SIZE));
      const b = Math.min(end, Math.ceil(seg[i + 1]! / GUEST_PAGE_SIZE));
      if (a > at) out.push({ pfn: at, count: a - at, hole: true });
      if (b > a) out.push({ pfn: a, count: b - a, hole: false });
      at = Math.max(at, b);
    }
    if (at < end) out.push({ pfn: at, count: end - at, hole: true });
    return out;
  }

  /** crc32c of pages [pfn, pfn + count) continuing from `seed`: holes from a zero buffer, data window by window. */
  crcPages(pfn: number, count: number, seed: number): number {
    let crc = seed;
    for (const s of this.segments(pfn, count)) {
      if (s.hole) {
        for (let left = s.count * GUEST_PAGE_SIZE; left > 0; left -= ZERO_CHUNK.length) crc = crc32c(ZERO_CHUNK, 0, Math.min(left, ZERO_CHUNK.length), crc);
        continue;
      }
      let p = s.pfn;
      let n = s.count;
      while (n > 0) {
        const o = this.at(p);
        const k = Math.min(n, (this.window!.length - o) / GUEST_PAGE_SIZE);
        crc = crc32c(this.window!, o, k * GUEST_PAGE_SIZE, crc);
        p += k;
        n -= k;
      }
    }
    return crc;
  }

  /** How many of pages [pfn, pfn + count) are all zero (holes without reading them). */
  countZero(pfn: number, count: number): number {
    let zero = 0;
    for (const s of this.segments(pfn, count)) {
      if (s.hole) zero += s.count;
      else for (let p = s.pfn; p < s.pfn + s.count; p++) if (this.isZero(p)) zero++;
    }
    return zero;
  }

  /** Copies page `pfn` into dst at `dstOffset`. */
  copyPage(pfn: number, dst: Buffer, dstOffset: number): void {
    const o = this.at(pfn);
    this.window!.copy(dst, dstOffset, o, o + GUEST_PAGE_SIZE);
  }
}

const ZERO_PAGE = Buffer.alloc(GUEST_PAGE_SIZE);
const ZERO_CHUNK = Buffer.alloc(1 << 20);
const HOLE_CHUNK_PAGES = 4096;

/** Where SendDirty's batches go: the ReceivePages client stream of the destination sidecar (or a fake in tests). */
export interface PageSink {
  /** Queues one batch; false when the stream wants the writer to wait for drain (write() backpressure). */
  write(batch: sidecar.PageBatch): boolean;
  /** Resolves on 'drain', or when the call has failed (then failure() is set). */
  waitDrain(): Promise<void>;
  /** The call's failure, once it failed. */
  failure(): Error | null;
  /** Half-closes and waits for the receiver's answer; rejects when the call failed. */
  finish(): Promise<sidecar.ReceivePagesResponse>;
  /** Cancels the call (the sender gave up). */
  cancel(): void;
}

export interface SendOptions {
  vm: string;
  round: number;
  batchPages: number;
  /** null: unlimited. */
  bucket: TokenBucket | null;
  now(): number;
  sleep(ms: number): Promise<void>;
  /** Checked before each batch: a reason to stop (the bitmap was stopped, the VM destroyed, the caller cancelled) or null. */
  abortReason(): string | null;
}

export interface SendResult {
  pages: number;
  zeroPages: number;
  bytes: number;
  elapsedMs: number;
  batches: number;
}

/** Why a send stopped: the stream failed (`stream`) or the sender gave up (`aborted`); the taken pages are back in the bitmap. */
export class SendFailed extends Error {
  constructor(
    readonly kind: "stream" | "aborted",
    message: string,
    readonly pagesTaken: number,
  ) {
    super(message);
  }
}

/**
 * ram_save_iterate over the whole bitmap: every set page in pfn order, in
 * batches of `batchPages` (zero pages in their own batches: pfns only, zero
 * set). A page's bit is cleared when its bytes are read into a batch (QEMU's
 * migration_bitmap_clear_dirty before ram_save_page), so a page dirtied again
 * while its batch is on the wire is set again by the next sync and resent.
 * The receiver confirms nothing before its final answer, so when the stream
 * fails every page taken by this call is set again: a retry resends them.
 */
export async function sendDirtyPages(bitmap: MigrationBitmap, mem: GuestPages, sink: PageSink, o: SendOptions): Promise<SendResult> {
  const taken = new PageSet(bitmap.pages);
  const res: SendResult = { pages: 0, zeroPages: 0, bytes: 0, elapsedMs: 0, batches: 0 };
  const start = o.now();
  const batchBytes = o.batchPages * GUEST_PAGE_SIZE;
  let data = Buffer.allocUnsafe(batchBytes);
  let dataPfns: number[] = [];
  let zeroPfns: number[] = [];
  // Holes (never written, or punched) go as zero pages without being read: reading one
  // through the mapping would allocate it on tmpfs.
  mem.forgetHoles();

  const giveBack = (): void => {
    bitmap.orWords(taken.words);
  };
  const flush = async (zero: boolean): Promise<void> => {
    const pfns = zero ? zeroPfns : dataPfns;
    if (pfns.length === 0) return;
    const payload = zero ? EMPTY : data.subarray(0, pfns.length * GUEST_PAGE_SIZE);
    if (zero) zeroPfns = [];
    else {
      dataPfns = [];
      // The stream keeps the batch until it is serialized: the next one gets its own buffer.
      data = Buffer.allocUnsafe(batchBytes);
    }
    if (o.bucket) {
      // pfns are 8-byte varints at most on the wire; the data is the rest.
      const wait = o.bucket.take(payload.length + pfns.length * 8, o.now());
      if (wait > 0) await o.sleep(wait);
    }
    const failed = sink.failure();
    if (failed) throw new SendFailed("stream", failed.message, taken.size);
    const reason = o.abortReason();
    if (reason !== null) throw new SendFailed("aborted", reason, taken.size);
    res.batches++;
    if (!sink.write({ vm: o.vm, round: o.round, pfns, data: payload, zero })) {
      await sink.waitDrain();
      const f = sink.failure();
      if (f) throw new SendFailed("stream", f.message, taken.size);
    }
    res.bytes += payload.length;
  };

  try {
    for (let pfn = bitmap.nextDirty(0); pfn >= 0; pfn = bitmap.nextDirty(pfn + 1)) {
      // Reading guest memory after DestroyVm would touch a detached buffer: check first.
      const reason = o.abortReason();
      if (reason !== null) throw new SendFailed("aborted", reason, taken.size);
      bitmap.clear(pfn);
      taken.add(pfn);
      res.pages++;
      if (mem.isZero(pfn)) {
        res.zeroPages++;
        zeroPfns.push(pfn);
        if (zeroPfns.length === o.batchPages) await flush(true);
      } else {
        mem.copyPage(pfn, data, dataPfns.length * GUEST_PAGE_SIZE);
        dataPfns.push(pfn);
        if (dataPfns.length === o.batchPages) await flush(false);
      }
    }
    await flush(false);
    await flush(true);
    try {
      await sink.finish();
    } catch (e) {
      throw new SendFailed("stream", (e as Error).message, taken.size);
    }
  } catch (e) {
    giveBack();
    sink.cancel();
    throw e;
  }
  res.elapsedMs = o.now() - start;
  return res;
}

const EMPTY = Buffer.alloc(0);

/** A checksum run never crosses a multiple of this many pages, so both sides split alike. */
export const CHECKSUM_RUN_PAGES = 4096;

export interface MemoryChecksum {
  digest: string;
  pages: number;
  zeroPages: number;
}

/**
 * The switchover's memory check: crc32c (native, SSE4.2 where present) chained over
 * every run of consecutive pages not excluded, each run as (first pfn, page count:
 * 8 bytes LE each) then its bytes, runs split at multiples of CHECKSUM_RUN_PAGES.
 * Both sidecars compute it over the same exclusion; equal digests mean the destination
 * holds what the source holds. Yields to the event loop between runs (every
 * `yieldEvery` pages at most), and stops if `alive` says the VM went away.
 */
export async function checksumPages(
  mem: GuestPages,
  exclude: Uint8Array,
  opts: { yieldEvery?: number; pause?: () => Promise<void>; alive?: () => string | null } = {},
): Promise<MemoryChecksum> {
  const yieldEvery = opts.yieldEvery ?? CHECKSUM_RUN_PAGES;
  const pause = opts.pause ?? (() => new Promise<void>((r) => setImmediate(r)));
  const excluded = (pfn: number) => exclude.length > 0 && ((exclude[pfn >>> 3]! >>> (pfn & 7)) & 1) === 1;
  mem.forgetHoles();
  const hdr = Buffer.alloc(16);
  let crc = 0;
  let pages = 0;
  let zeroPages = 0;
  let sinceYield = 0;
  let pfn = 0;
  while (pfn < mem.pages) {
    if (excluded(pfn)) {
      pfn++;
      continue;
    }
    const limit = Math.min(mem.pages, (Math.floor(pfn / CHECKSUM_RUN_PAGES) + 1) * CHECKSUM_RUN_PAGES);
    let end = pfn + 1;
    while (end < limit && !excluded(end)) end++;
    hdr.writeUInt32LE(pfn >>> 0, 0);
    hdr.writeUInt32LE(Math.floor(pfn / 0x1_0000_0000), 4);
    hdr.writeUInt32LE((end - pfn) >>> 0, 8);
    hdr.writeUInt32LE(0, 12);
    crc = crc32c(hdr, 0, 16, crc);
    crc = mem.crcPages(pfn, end - pfn, crc);
    zeroPages += mem.countZero(pfn, end - pfn);
    pages += end - pfn;
    sinceYield += end - pfn;
    pfn = end;
    if (sinceYield >= yieldEvery && pfn < mem.pages) {
      sinceYield = 0;
      await pause();
      const why = opts.alive?.() ?? null;
      if (why !== null) throw new GrpcError(Status.ABORTED, why);
    }
  }
  return { digest: `crc32c:${crc.toString(16).padStart(8, "0")}`, pages, zeroPages };
}
