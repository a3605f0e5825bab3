// Wire formats of the balloon queues. Guest-side encoders write into, and
// host-side decoders read from, caller-provided buffers (virtqueue data buffers
// in guest memory). Decoders validate every entry before anything is applied:
// one bad entry refuses the whole request.
//
// All multi-byte fields are little-endian (virtio 1.x, section 1.4 "le32/le64").
// Byte-wise access keeps the code independent of buffer alignment and avoids a
// view allocation per request.

import { MAX_ORDER, PAGE_SHIFT } from "./buddy";
import { PageRangeList } from "./ranges";

// Feature bits (include/uapi/linux/virtio_balloon.h; PAGE_BITMAP is bit 3 in the
// seed's series, "[PATCH kernel v4 3/7] define new feature bit and head struct").
export const VIRTIO_BALLOON_F_MUST_TELL_HOST = 0;
export const VIRTIO_BALLOON_F_STATS_VQ = 1;
export const VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2;
export const VIRTIO_BALLOON_F_PAGE_BITMAP = 3;
export const VIRTIO_BALLOON_F_REPORTING = 5;

export function featureBit(bit: number): number {
  return 2 ** bit;
}
export function hasFeature(features: number, bit: number): boolean {
  return Math.floor(features / 2 ** bit) % 2 === 1;
}

/** How inflate/deflate buffers are encoded, from the negotiated features. */
export type BalloonMode = "pfn" | "bitmap" | "reporting";

/**
 * PAGE_BITMAP wins (the seed's tell_host() tests it first); otherwise, with
 * REPORTING negotiated, virtmesh carries inflate/deflate as (pfn, order) ranges,
 * the free page reporting format; otherwise the legacy PFN arrays.
 */
export function balloonModeFor(features: number): BalloonMode {
  if (hasFeature(features, VIRTIO_BALLOON_F_PAGE_BITMAP)) return "bitmap";
  if (hasFeature(features, VIRTIO_BALLOON_F_REPORTING)) return "reporting";
  return "pfn";
}

export function featuresForMode(mode: BalloonMode, extra = 0): number {
  const m = mode === "bitmap" ? featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP) : mode === "reporting" ? featureBit(VIRTIO_BALLOON_F_REPORTING) : 0;
  return m + extra;
}

// Legacy PFN arrays: le32 PFNs in 4 KiB units (VIRTIO_BALLOON_PFN_SHIFT), at most
// VIRTIO_BALLOON_ARRAY_PFNS_MAX per buffer (drivers/virtio/virtio_balloon.c).
export const VIRTIO_BALLOON_PFN_SHIFT = 12;
export const VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256;
export const PFN_ARRAY_BUFFER_SIZE = VIRTIO_BALLOON_ARRAY_PFNS_MAX * 4;

// Page bitmaps, from the seed: the driver sends struct virtio_balloon_resp_hdr
// (sg[0]) then resp_data (sg[1], at most BALLOON_BMAP_SIZE bytes) of
// struct virtio_balloon_bmap_hdr entries:
//   struct virtio_balloon_resp_hdr { __le64 cmd:8; __le64 flag:8; __le64 id:16; __le64 data_len:32; };
//   struct virtio_balloon_bmap_hdr { struct { __le64 start_pfn:52; __le64 page_shift:6; __le64 bmap_len:6; } head; __le64 bmap[0]; };
// The head is ONE le64: the seed's do_set_resp_bitmap() advances resp_pos (in
// unsigned longs) by 2 for a head plus one bitmap word and by 1 for a bare run
// head. bmap_len is in bytes (the seed writes sizeof(unsigned long) or 0); a head
// with bmap_len 0 names the run of 2^(page_shift-PAGE_SHIFT) pages at start_pfn.
// virtmesh sends the header and data as one buffer, header first.
export const BALLOON_BMAP_SIZE = 8 * 4096; // seed: BALLOON_BMAP_SIZE (8 * PAGE_SIZE)
export const RESP_HDR_SIZE = 8;
export const BMAP_HDR_SIZE = 8;
export const PAGE_BITMAP_BUFFER_SIZE = RESP_HDR_SIZE + BALLOON_BMAP_SIZE;
/** Largest run a head may name: page_shift is 6 bits, and 2^40 pages is 4 EiB. */
export const MAX_RUN_ORDER = 40;

// Free page reporting ranges (virtmesh layout, 16 bytes):
//   struct virtmesh_balloon_report { __le64 pfn; __le32 order; __le32 reserved; };
// At most PAGE_REPORTING_CAPACITY per buffer, as mm/page_reporting.h.
export const REPORT_ENTRY_SIZE = 16;
export const PAGE_REPORTING_CAPACITY = 32;
export const REPORT_BUFFER_SIZE = REPORT_ENTRY_SIZE * PAGE_REPORTING_CAPACITY;

/** Largest number of ranges one request can decode into (all bits of a full bitmap buffer alternate). */
export const MAX_REQUEST_RANGES = (BALLOON_BMAP_SIZE / 8) * 32;

export type BalloonRequestError =
  | { kind: "bad-length"; message: string }
  | { kind: "pfn-beyond-memory"; pfn: number; pages: number; guestPages: number; message: string }
  | { kind: "bmap-len-past-buffer"; offset: number; bmapLen: number; end: number; message: string }
  | { kind: "bad-page-shift"; offset: number; pageShift: number; message: string }
  | { kind: "overlap"; pfn: number; message: string }
  | { kind: "misaligned-run"; pfn: number; order: number; message: string }
  | { kind: "bad-order"; pfn: number; order: number; message: string }
  | { kind: "reserved-nonzero"; offset: number; message: string }
  | { kind: "queue-not-negotiated"; queue: string; message: string };

export type BalloonRequestErrorKind = BalloonRequestError["kind"];

// ---- byte helpers -------------------------------------------------------------

function rd32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
function wr32(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff;
  b[o + 1] = (v >>> 8) & 0xff;
  b[o + 2] = (v >>> 16) & 0xff;
  b[o + 3] = (v >>> 24) & 0xff;
}
/** le64 as a number; exact below 2^53, which every accepted field is. */
function rd64(b: Uint8Array, o: number): number {
  return rd32(b, o) + rd32(b, o + 4) * 0x1_0000_0000;
}
function wr64(b: Uint8Array, o: number, v: number): void {
  wr32(b, o, v >>> 0);
  wr32(b, o + 4, Math.floor(v / 0x1_0000_0000) >>> 0);
}
function checkLen(buf: Uint8Array, len: number): BalloonRequestError | null {
  if (!Number.isInteger(len) || len < 0 || len > buf.length) return { kind: "bad-length", message: `buffer length ${len} outside 0..${buf.length}` };
  return null;
}

// ---- PFN arrays ---------------------------------------------------------------

/** Writes count PFNs from pfns[from..] as le32; returns bytes written. buf must hold count*4 bytes. */
export function encodePfnArray(buf: Uint8Array, pfns: ArrayLike<number>, from: number, count: number): number {
  if (count > VIRTIO_BALLOON_ARRAY_PFNS_MAX) throw new RangeError(`at most ${VIRTIO_BALLOON_ARRAY_PFNS_MAX} PFNs per buffer`);
  for (let i = 0; i < count; i++) wr32(buf, i * 4, pfns[from + i]!);
  return count * 4;
}

/**
 * Host side of VIRTIO_BALLOON_F (legacy) inflate/deflate: le32 PFNs, as QEMU's
 * virtio_balloon_handle_output(). Refuses: length not a multiple of 4, a PFN at
 * or beyond guest memory, a PFN named twice.
 */
export function decodePfnArray(buf: Uint8Array, len: number, guestPages: number, out: PageRangeList): BalloonRequestError | null {
  out.clear();
  const bad = checkLen(buf, len);
  if (bad) return bad;
  if (len % 4 !== 0) return { kind: "bad-length", message: `PFN array length ${len} is not a multiple of 4` };
  if (len / 4 > out.capacity) return { kind: "bad-length", message: `PFN array of ${len / 4} entries exceeds ${out.capacity}` };
  for (let o = 0; o < len; o += 4) {
    const pfn = rd32(buf, o);
    if (pfn >= guestPages) return beyond(pfn, 1, guestPages);
    out.push(pfn, 1);
  }
  const dup = out.normalize();
  if (dup >= 0) return { kind: "overlap", pfn: dup, message: `PFN ${dup} appears more than once in one request` };
  return null;
}

// ---- page bitmaps -------------------------------------------------------------

/**
 * Fills one page-bitmap buffer from the guest's request bitmap `bits` (bit i of
 * u32 word w = pfn w*32+i), scanning 64-page words [fromWord, toWord) and zeroing
 * what it consumes. Full words become run heads, partial words a head plus one
 * bitmap word, as the seed's do_set_resp_bitmap(); unlike the seed, runs are
 * split into NATURALLY ALIGNED power-of-two blocks (the seed only aligns them to
 * 64 pages), so each run is a buddy block the host can release whole.
 * Returns the word to resume from (toWord when done) and sets `lenOut[0]` to the
 * byte length of the buffer (resp_hdr included), 0 if nothing was written.
 */
export function fillPageBitmapBuffer(
  buf: Uint8Array,
  bits: Uint32Array,
  fromWord: number,
  toWord: number,
  lenOut: Uint32Array,
): number {
  const limit = Math.min(buf.length, PAGE_BITMAP_BUFFER_SIZE);
  let pos = RESP_HDR_SIZE;
  let w = fromWord;
  while (w < toWord) {
    const lo = bits[2 * w]!;
    const hi = bits[2 * w + 1]!;
    if (lo === 0 && hi === 0) {
      w++;
      continue;
    }
    if (lo === 0xffffffff && hi === 0xffffffff) {
      let end = w + 1;
      while (end < toWord && bits[2 * end] === 0xffffffff && bits[2 * end + 1] === 0xffffffff) end++;
      // Emit aligned blocks from w*64 while room remains.
      let pfn = w * 64;
      const endPfn = end * 64;
      while (pfn < endPfn) {
        if (pos + BMAP_HDR_SIZE > limit) {
          w = pfn / 64;
          return finishBitmap(buf, pos, w, lenOut);
        }
        let order = 6;
        while (order < MAX_RUN_ORDER && pfn % 2 ** (order + 1) === 0 && pfn + 2 ** (order + 1) <= endPfn) order++;
        writeBmapHead(buf, pos, pfn, PAGE_SHIFT + order, 0);
        pos += BMAP_HDR_SIZE;
        const stop = pfn + 2 ** order;
        for (let k = pfn / 32; k < stop / 32; k++) bits[k] = 0;
        pfn = stop;
      }
      w = end;
      continue;
    }
    if (pos + BMAP_HDR_SIZE + 8 > limit) return finishBitmap(buf, pos, w, lenOut);
    writeBmapHead(buf, pos, w * 64, PAGE_SHIFT, 8);
    wr32(buf, pos + 8, lo);
    wr32(buf, pos + 12, hi);
    pos += BMAP_HDR_SIZE + 8;
    bits[2 * w] = 0;
    bits[2 * w + 1] = 0;
    w++;
  }
  return finishBitmap(buf, pos, toWord, lenOut);
}

function finishBitmap(buf: Uint8Array, pos: number, resume: number, lenOut: Uint32Array): number {
  const dataLen = pos - RESP_HDR_SIZE;
  writeRespHdr(buf, dataLen);
  lenOut[0] = dataLen === 0 ? 0 : pos;
  return resume;
}

/** struct virtio_balloon_resp_hdr with cmd = flag = id = 0. */
export function writeRespHdr(buf: Uint8Array, dataLen: number): void {
  wr32(buf, 0, 0);
  wr32(buf, 4, dataLen);
}

/** One struct virtio_balloon_bmap_hdr head: start_pfn bits 0..51, page_shift 52..57, bmap_len 58..63. */
export function writeBmapHead(buf: Uint8Array, off: number, startPfn: number, pageShift: number, bmapLen: number): void {
  const hiPfn = Math.floor(startPfn / 0x1_0000_0000);
  wr32(buf, off, startPfn >>> 0);
  wr32(buf, off + 4, ((hiPfn & 0xfffff) | ((pageShift & 0x3f) << 20) | ((bmapLen & 0x3f) << 26)) >>> 0);
}

/**
 * Host side of the seed's page bitmap format. Refuses the request when:
 * data_len runs past the buffer or is not whole le64 words; a head's bmap_len
 * runs past data_len or is not whole words (bmap-len-past-buffer); a bitmap head
 * has page_shift != PAGE_SHIFT, or a run head has page_shift < PAGE_SHIFT or
 * above PAGE_SHIFT+MAX_RUN_ORDER (bad-page-shift); a run's start_pfn is not
 * aligned to its size (misaligned-run); any page lies at or beyond guest memory;
 * any page is named twice (overlap).
 */
export function decodePageBitmap(buf: Uint8Array, len: number, guestPages: number, out: PageRangeList): BalloonRequestError | null {
  out.clear();
  const bad = checkLen(buf, len);
  if (bad) return bad;
  if (len < RESP_HDR_SIZE) return { kind: "bad-length", message: `page bitmap buffer of ${len} bytes is shorter than virtio_balloon_resp_hdr` };
  const dataLen = rd32(buf, 4);
  const end = RESP_HDR_SIZE + dataLen;
  if (end > len) return { kind: "bmap-len-past-buffer", offset: 0, bmapLen: dataLen, end: len, message: `resp_hdr.data_len ${dataLen} runs past the ${len}-byte buffer` };
  if (dataLen % 8 !== 0) return { kind: "bad-length", message: `resp_hdr.data_len ${dataLen} is not a multiple of 8` };
  let off = RESP_HDR_SIZE;
  while (off < end) {
    const lo = rd32(buf, off);
    const hi = rd32(buf, off + 4);
    const startPfn = lo + (hi & 0xfffff) * 0x1_0000_0000;
    const pageShift = (hi >>> 20) & 0x3f;
    const bmapLen = hi >>> 26;
    const head = off;
    off += BMAP_HDR_SIZE;
    if (bmapLen === 0) {
      const order = pageShift - PAGE_SHIFT;
      if (order < 0 || order > MAX_RUN_ORDER) {
        return { kind: "bad-page-shift", offset: head, pageShift, message: `run head at ${head}: page_shift ${pageShift} outside ${PAGE_SHIFT}..${PAGE_SHIFT + MAX_RUN_ORDER}` };
      }
      const size = 2 ** order;
      if (startPfn % size !== 0) return { kind: "misaligned-run", pfn: startPfn, order, message: `run of 2^${order} pages at PFN ${startPfn} is not aligned to its size` };
      if (startPfn + size > guestPages) return beyond(startPfn, size, guestPages);
      if (!out.push(startPfn, size)) return tooMany(out);
      continue;
    }
    if (pageShift !== PAGE_SHIFT) {
      return { kind: "bad-page-shift", offset: head, pageShift, message: `bitmap head at ${head}: page_shift ${pageShift}, only ${PAGE_SHIFT} (4 KiB pages) is defined for bitmaps` };
    }
    if (bmapLen % 8 !== 0 || off + bmapLen > end) {
      return { kind: "bmap-len-past-buffer", offset: head, bmapLen, end, message: `bitmap head at ${head}: bmap_len ${bmapLen} ${bmapLen % 8 !== 0 ? "is not whole le64 words" : `runs past data end ${end}`}` };
    }
    for (let b = 0; b < bmapLen; b += 4) {
      const word = rd32(buf, off + b);
      if (word === 0) continue;
      const base = startPfn + b * 8;
      const e = pushBitRuns(word, base, guestPages, out);
      if (e) return e;
    }
    off += bmapLen;
  }
  const dup = out.normalize();
  if (dup >= 0) return { kind: "overlap", pfn: dup, message: `PFN ${dup} is named by more than one entry of the request` };
  return null;
}

function pushBitRuns(word: number, base: number, guestPages: number, out: PageRangeList): BalloonRequestError | null {
  let i = 0;
  while (i < 32) {
    const rest = word >>> i;
    if (rest === 0) break;
    i += 31 - Math.clz32(rest & -rest);
    let j = i + 1;
    while (j < 32 && ((word >>> j) & 1) === 1) j++;
    const start = base + i;
    if (start + (j - i) > guestPages) return beyond(Math.max(start, guestPages), j - i, guestPages);
    if (!out.push(start, j - i)) return tooMany(out);
    i = j;
  }
  return null;
}

// ---- (pfn, order) ranges: free page reporting and the "reporting" balloon mode --

export function writeReportEntry(buf: Uint8Array, index: number, pfn: number, order: number): void {
  const o = index * REPORT_ENTRY_SIZE;
  wr64(buf, o, pfn);
  wr32(buf, o + 8, order);
  wr32(buf, o + 12, 0);
}

/**
 * Host side of the (pfn, order) range format. Refuses: length not whole
 * entries; reserved field non-zero; order >= MAX_ORDER (bad-order); pfn not
 * aligned to 2^order (misaligned-run; the guest's buddy allocator only has
 * aligned blocks); a range reaching beyond guest memory; a page named twice.
 */
export function decodeReportRanges(buf: Uint8Array, len: number, guestPages: number, out: PageRangeList): BalloonRequestError | null {
  out.clear();
  const bad = checkLen(buf, len);
  if (bad) return bad;
  if (len % REPORT_ENTRY_SIZE !== 0) return { kind: "bad-length", message: `report length ${len} is not a multiple of ${REPORT_ENTRY_SIZE}` };
  for (let o = 0; o < len; o += REPORT_ENTRY_SIZE) {
    const pfn = rd64(buf, o);
    const order = rd32(buf, o + 8);
    if (rd32(buf, o + 12) !== 0) return { kind: "reserved-nonzero", offset: o + 12, message: `report entry at ${o}: reserved field is not zero` };
    if (order >= MAX_ORDER) return { kind: "bad-order", pfn, order, message: `report entry at ${o}: order ${order} >= MAX_ORDER ${MAX_ORDER}` };
    const size = 2 ** order;
    if (pfn % size !== 0) return { kind: "misaligned-run", pfn, order, message: `report entry at ${o}: PFN ${pfn} is not aligned to 2^${order} pages` };
    if (pfn + size > guestPages) return beyond(pfn, size, guestPages);
    if (!out.push(pfn, size)) return tooMany(out);
  }
  const dup = out.normalize();
  if (dup >= 0) return { kind: "overlap", pfn: dup, message: `PFN ${dup} is reported by more than one entry` };
  return null;
}

function beyond(pfn: number, pages: number, guestPages: number): BalloonRequestError {
  return { kind: "pfn-beyond-memory", pfn, pages, guestPages, message: `PFN ${pfn} (+${pages} pages) lies beyond guest memory of ${guestPages} pages` };
}
function tooMany(out: PageRangeList): BalloonRequestError {
  return { kind: "bad-length", message: `request decodes into more than ${out.capacity} ranges` };
}

// ---- stats queue (virtio 1.x 5.5.6.3, struct virtio_balloon_stat { le16 tag; le64 val; } packed) --

export const VIRTIO_BALLOON_S_SWAP_IN = 0;
export const VIRTIO_BALLOON_S_SWAP_OUT = 1;
export const VIRTIO_BALLOON_S_MAJFLT = 2;
export const VIRTIO_BALLOON_S_MINFLT = 3;
export const VIRTIO_BALLOON_S_MEMFREE = 4;
export const VIRTIO_BALLOON_S_MEMTOT = 5;
export const VIRTIO_BALLOON_S_AVAIL = 6;
export const VIRTIO_BALLOON_S_CACHES = 7;
export const STAT_ENTRY_SIZE = 10;
export const STATS_BUFFER_SIZE = 8 * STAT_ENTRY_SIZE;

export interface BalloonGuestStats {
  swapIn: number;
  swapOut: number;
  majorFaults: number;
  minorFaults: number;
  /** bytes */
  freeMemory: number;
  /** bytes */
  totalMemory: number;
  /** bytes */
  availableMemory: number;
  /** bytes */
  diskCaches: number;
}

const STAT_KEYS: (keyof BalloonGuestStats)[] = ["swapIn", "swapOut", "majorFaults", "minorFaults", "freeMemory", "totalMemory", "availableMemory", "diskCaches"];

export function emptyGuestStats(): BalloonGuestStats {
  return { swapIn: 0, swapOut: 0, majorFaults: 0, minorFaults: 0, freeMemory: 0, totalMemory: 0, availableMemory: 0, diskCaches: 0 };
}

export function encodeStats(buf: Uint8Array, stats: BalloonGuestStats): number {
  for (let tag = 0; tag < STAT_KEYS.length; tag++) {
    const o = tag * STAT_ENTRY_SIZE;
    buf[o] = tag;
    buf[o + 1] = 0;
    wr64(buf, o + 2, stats[STAT_KEYS[tag]!]);
  }
  return STAT_KEYS.length * STAT_ENTRY_SIZE;
}

/** Device side of the stats buffer. Unknown tags are ignored (5.5.6.3: the device ignores tags it does not know). */
export function decodeStats(buf: Uint8Array, len: number, into: BalloonGuestStats): BalloonRequestError | null {
  const bad = checkLen(buf, len);
  if (bad) return bad;
  if (len % STAT_ENTRY_SIZE !== 0) return { kind: "bad-length", message: `stats length ${len} is not a multiple of ${STAT_ENTRY_SIZE}` };
  for (let o = 0; o < len; o += STAT_ENTRY_SIZE) {
    const tag = buf[o]! | (buf[o + 1]! << 8);
    const key = STAT_KEYS[tag];
    if (key !== undefined) into[key] = rd64(buf, o + 2);
  }
  return null;
}

// ---- device configuration (virtio 1.x 5.5.4, struct virtio_balloon_config) -----

/** le32 num_pages (target, device-written), le32 actual (driver-written), over config space bytes. */
export class BalloonConfigSpace {
  static readonly SIZE = 16;
  constructor(private readonly bytes: Uint8Array) {
    if (bytes.length < BalloonConfigSpace.SIZE) throw new RangeError(`config space needs ${BalloonConfigSpace.SIZE} bytes`);
  }
  get numPages(): number {
    return rd32(this.bytes, 0);
  }
  set numPages(v: number) {
    wr32(this.bytes, 0, v);
  }
  get actual(): number {
    return rd32(this.bytes, 4);
  }
  set actual(v: number) {
    wr32(this.bytes, 4, v);
  }
}
