import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { PageRangeList } from "./ranges";
import {
  BMAP_HDR_SIZE,
  MAX_REQUEST_RANGES,
  PAGE_BITMAP_BUFFER_SIZE,
  RESP_HDR_SIZE,
  decodePageBitmap,
  decodePfnArray,
  decodeReportRanges,
  decodeStats,
  emptyGuestStats,
  encodePfnArray,
  encodeStats,
  fillPageBitmapBuffer,
  writeReportEntry,
} from "./wire";

function rangesToPages(r: PageRangeList): number[] {
  const out: number[] = [];
  for (let i = 0; i < r.length; i++) for (let p = r.starts[i]!; p < r.starts[i]! + r.counts[i]!; p++) out.push(p);
  return out;
}

test("PFN array round trip", () => {
  fc.assert(
    fc.property(fc.uniqueArray(fc.integer({ min: 0, max: 99_999 }), { minLength: 1, maxLength: 256 }), (pfns) => {
      const buf = new Uint8Array(1024);
      const len = encodePfnArray(buf, pfns, 0, pfns.length);
      const out = new PageRangeList(MAX_REQUEST_RANGES);
      assert.equal(decodePfnArray(buf, len, 100_000, out), null);
      assert.deepEqual(rangesToPages(out), [...pfns].sort((a, b) => a - b));
    }),
  );
});

/** Encodes a page set through the guest's bitmap path into buffers and decodes each with the host validator. */
function bitmapRoundTrip(pages: number, pfns: Iterable<number>): number[] {
  const bits = new Uint32Array(Math.ceil(pages / 64) * 2);
  let min = Infinity;
  let max = -1;
  for (const p of pfns) {
    bits[p >>> 5] = bits[p >>> 5]! | (1 << (p & 31));
    min = Math.min(min, p >>> 6);
    max = Math.max(max, p >>> 6);
  }
  const buf = new Uint8Array(PAGE_BITMAP_BUFFER_SIZE);
  const lenOut = new Uint32Array(1);
  const out = new PageRangeList(MAX_REQUEST_RANGES);
  const got: number[] = [];
  let w = min;
  while (w <= max) {
    w = fillPageBitmapBuffer(buf, bits, w, max + 1, lenOut);
    if (lenOut[0]! === 0) continue;
    assert.equal(decodePageBitmap(buf, lenOut[0]!, pages, out), null);
    got.push(...rangesToPages(out));
  }
  assert.ok(bits.every((x) => x === 0), "request bitmap consumed");
  return got.sort((a, b) => a - b);
}

test("page bitmap round trip (random sparse and dense sets)", () => {
  fc.assert(
    fc.property(fc.uniqueArray(fc.integer({ min: 0, max: 20_000 }), { maxLength: 2000 }), (pfns) => {
      assert.deepEqual(bitmapRoundTrip(20_001, pfns), [...pfns].sort((a, b) => a - b));
    }),
    { numRuns: 60 },
  );
  fc.assert(
    fc.property(fc.array(fc.tuple(fc.integer({ min: 0, max: 30_000 }), fc.integer({ min: 1, max: 3000 })), { maxLength: 8 }), (runs) => {
      const set = new Set<number>();
      for (const [s, n] of runs) for (let p = s; p < Math.min(s + n, 32_768); p++) set.add(p);
      assert.deepEqual(bitmapRoundTrip(32_768, set), [...set].sort((a, b) => a - b));
    }),
    { numRuns: 60 },
  );
});

test("page bitmap: a large contiguous set becomes few aligned run heads", () => {
  const pages = 1 << 20;
  const buf = new Uint8Array(PAGE_BITMAP_BUFFER_SIZE);
  const bits = new Uint32Array(pages / 32);
  // pages [64, 1<<20): aligned decomposition 64,128,256,... => 14 heads
  bits.fill(0xffffffff, 2, bits.length);
  const lenOut = new Uint32Array(1);
  const w = fillPageBitmapBuffer(buf, bits, 0, pages / 64, lenOut);
  assert.equal(w, pages / 64);
  assert.equal((lenOut[0]! - RESP_HDR_SIZE) / BMAP_HDR_SIZE, 14);
  const out = new PageRangeList(MAX_REQUEST_RANGES);
  assert.equal(decodePageBitmap(buf, lenOut[0]!, pages, out), null);
  assert.equal(out.length, 1);
  assert.equal(out.starts[0], 64);
  assert.equal(out.counts[0], pages - 64);
});

test("page bitmap: buffer fills up and resumes without losing pages", () => {
  // Every other page set: each 64-page word needs head + word = 16 bytes, so 10k words need several buffers.
  const pages = 64 * 10_000;
  const pfns: number[] = [];
  for (let p = 0; p < pages; p += 2) pfns.push(p);
  assert.deepEqual(bitmapRoundTrip(pages, pfns), pfns);
});

test("report ranges round trip", () => {
  const buf = new Uint8Array(512);
  writeReportEntry(buf, 0, 1024, 10);
  writeReportEntry(buf, 1, 512, 9);
  writeReportEntry(buf, 2, 7, 0);
  const out = new PageRangeList(64);
  assert.equal(decodeReportRanges(buf, 48, 4096, out), null);
  assert.deepEqual([out.length, out.starts[0], out.counts[0], out.starts[1], out.counts[1]], [2, 7, 1, 512, 1536]);
});

test("stats round trip; unknown tags ignored", () => {
  const s = { ...emptyGuestStats(), majorFaults: 12, freeMemory: 5 * 2 ** 32 + 7, totalMemory: 8 * 2 ** 30, availableMemory: 2 ** 30 };
  const buf = new Uint8Array(100);
  const len = encodeStats(buf, s);
  buf[len] = 0x39; // tag 0x39 unknown
  const got = emptyGuestStats();
  assert.equal(decodeStats(buf, len + 10, got), null);
  assert.deepEqual(got, s);
  assert.equal(decodeStats(buf, 9, got)?.kind, "bad-length");
});
