// Hostile guest: every malformed buffer is refused as a whole, with a typed
// error, and nothing is released or marked ballooned.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { BalloonDevice, type BalloonQueue } from "./device";
import { type BalloonRequestErrorKind, featuresForMode, writeBmapHead, writeReportEntry, writeRespHdr, type BalloonMode } from "./wire";

const GUEST_PAGES = 4096;

function device(mode: BalloonMode) {
  const released: [number, number][] = [];
  const dev = new BalloonDevice({ guestPages: GUEST_PAGES, features: featuresForMode(mode), release: (o, l) => void released.push([o, l]) });
  return { dev, released };
}

function expectRefused(mode: BalloonMode, queue: BalloonQueue, buf: Uint8Array, len: number, kind: BalloonRequestErrorKind): void {
  const { dev, released } = device(mode);
  const err = dev.handle(queue, buf, len);
  assert.ok(err, `expected ${kind}, request was accepted`);
  assert.equal(err.kind, kind, err.message);
  assert.equal(released.length, 0, "nothing released");
  assert.equal(dev.ballooned.count, 0, "nothing ballooned");
  assert.equal(dev.counters.refusedRequests, 1);
  assert.equal(dev.counters.inflatedPages + dev.counters.reportedPages, 0);
  assert.deepEqual(dev.lastError, err);
}

function pfnBuf(pfns: number[]): Uint8Array {
  const b = new Uint8Array(pfns.length * 4);
  new DataView(b.buffer).setUint32(0, 0, true);
  pfns.forEach((p, i) => new DataView(b.buffer).setUint32(i * 4, p >>> 0, true));
  return b;
}

/** Builds a bitmap request: entries are [startPfn, pageShift, bmapLen, ...words64 as [lo, hi]]. */
function bmapBuf(entries: { start: number; shift: number; bmapLen: number; words?: [number, number][] }[], dataLenOverride?: number): Uint8Array {
  let size = 8;
  for (const e of entries) size += 8 + (e.words?.length ?? 0) * 8;
  const b = new Uint8Array(size);
  writeRespHdr(b, dataLenOverride ?? size - 8);
  let off = 8;
  const dv = new DataView(b.buffer);
  for (const e of entries) {
    writeBmapHead(b, off, e.start, e.shift, e.bmapLen);
    off += 8;
    for (const [lo, hi] of e.words ?? []) {
      dv.setUint32(off, lo >>> 0, true);
      dv.setUint32(off + 4, hi >>> 0, true);
      off += 8;
    }
  }
  return b;
}

function reportBuf(entries: [number, number][]): Uint8Array {
  const b = new Uint8Array(entries.length * 16);
  entries.forEach(([pfn, order], i) => writeReportEntry(b, i, pfn, order));
  return b;
}

test("PFN array: PFN beyond guest memory", () => {
  expectRefused("pfn", "inflate", pfnBuf([1, 2, GUEST_PAGES]), 12, "pfn-beyond-memory");
  expectRefused("pfn", "inflate", pfnBuf([0xffffffff]), 4, "pfn-beyond-memory");
});
test("PFN array: duplicate PFN in one request", () => {
  expectRefused("pfn", "inflate", pfnBuf([5, 6, 7, 6]), 16, "overlap");
});
test("PFN array: length not whole PFNs, or longer than the buffer", () => {
  expectRefused("pfn", "inflate", pfnBuf([5, 6]), 7, "bad-length");
  expectRefused("pfn", "deflate", pfnBuf([5, 6]), 12, "bad-length");
});

test("bitmap: resp_hdr.data_len past the buffer", () => {
  const b = bmapBuf([{ start: 0, shift: 18, bmapLen: 0 }], 64);
  expectRefused("bitmap", "inflate", b, b.length, "bmap-len-past-buffer");
});
test("bitmap: bmap_len past the buffer", () => {
  // Head claims 16 bytes of bitmap, only one word follows.
  const b = bmapBuf([{ start: 64, shift: 12, bmapLen: 16, words: [[1, 0]] }]);
  expectRefused("bitmap", "inflate", b, b.length, "bmap-len-past-buffer");
  // bmap_len not whole le64 words
  const c = bmapBuf([{ start: 64, shift: 12, bmapLen: 4, words: [[1, 0]] }]);
  expectRefused("bitmap", "inflate", c, c.length, "bmap-len-past-buffer");
});
test("bitmap: bad page_shift", () => {
  for (const shift of [11, 0, 12 + 41, 63]) {
    const b = bmapBuf([{ start: 0, shift, bmapLen: 0 }]);
    expectRefused("bitmap", "inflate", b, b.length, "bad-page-shift");
  }
  const w = bmapBuf([{ start: 0, shift: 13, bmapLen: 8, words: [[1, 0]] }]);
  expectRefused("bitmap", "inflate", w, w.length, "bad-page-shift");
});
test("bitmap: misaligned power-of-two run", () => {
  const b = bmapBuf([{ start: 64, shift: 12 + 7, bmapLen: 0 }]);
  expectRefused("bitmap", "inflate", b, b.length, "misaligned-run");
});
test("bitmap: run or bitmap bit beyond guest memory", () => {
  const b = bmapBuf([{ start: GUEST_PAGES - 2048, shift: 12 + 12, bmapLen: 0 }]);
  expectRefused("bitmap", "inflate", b, b.length, "misaligned-run");
  const r = bmapBuf([{ start: 0, shift: 12 + 13, bmapLen: 0 }]);
  expectRefused("bitmap", "inflate", r, r.length, "pfn-beyond-memory");
  const c = bmapBuf([{ start: GUEST_PAGES, shift: 12, bmapLen: 0 }]);
  expectRefused("bitmap", "inflate", c, c.length, "pfn-beyond-memory");
  const d = bmapBuf([{ start: GUEST_PAGES - 64, shift: 12, bmapLen: 16, words: [[1, 0], [1, 0]] }]);
  expectRefused("bitmap", "inflate", d, d.length, "pfn-beyond-memory");
  const e = bmapBuf([{ start: 2 ** 52 - 64, shift: 12, bmapLen: 8, words: [[0, 0x80000000]] }]);
  expectRefused("bitmap", "inflate", e, e.length, "pfn-beyond-memory");
});
test("bitmap: overlapping ranges within one request, valid entries before them not applied", () => {
  const b = bmapBuf([
    { start: 1024, shift: 12 + 10, bmapLen: 0 },
    { start: 0, shift: 12 + 6, bmapLen: 0 },
    { start: 1536, shift: 12, bmapLen: 8, words: [[0, 1]] },
  ]);
  expectRefused("bitmap", "inflate", b, b.length, "overlap");
  const c = bmapBuf([
    { start: 128, shift: 12, bmapLen: 8, words: [[0b110, 0]] },
    { start: 128, shift: 12, bmapLen: 8, words: [[0b100, 0]] },
  ]);
  expectRefused("bitmap", "deflate", c, c.length, "overlap");
});

test("reporting: misaligned, bad order, beyond memory, overlap, reserved, length", () => {
  expectRefused("reporting", "reporting", reportBuf([[512 + 256, 9]]), 16, "misaligned-run");
  expectRefused("reporting", "reporting", reportBuf([[0, 11]]), 16, "bad-order");
  expectRefused("reporting", "reporting", reportBuf([[GUEST_PAGES, 0]]), 16, "pfn-beyond-memory");
  expectRefused("reporting", "inflate", reportBuf([[1024, 10], [1536, 9]]), 32, "overlap");
  const r = reportBuf([[0, 0]]);
  r[12] = 1;
  expectRefused("reporting", "reporting", r, 16, "reserved-nonzero");
  expectRefused("reporting", "reporting", reportBuf([[0, 0]]), 15, "bad-length");
});

test("buffers on a queue the features did not provide are refused", () => {
  expectRefused("bitmap", "reporting", reportBuf([[0, 0]]), 16, "queue-not-negotiated");
  expectRefused("pfn", "stats", new Uint8Array(10), 10, "queue-not-negotiated");
});

test("fuzz: random buffers never touch memory outside the guest and refused ones touch nothing", () => {
  fc.assert(
    fc.property(fc.constantFrom<BalloonMode>("pfn", "bitmap", "reporting"), fc.uint8Array({ maxLength: 256 }), (mode, bytes) => {
      const { dev, released } = device(mode);
      for (const q of ["inflate", "deflate", "reporting", "stats"] as const) {
        const before = released.length;
        const err = dev.handle(q, bytes, bytes.length);
        if (err) assert.equal(released.length, before);
      }
      for (const [o, l] of released) assert.ok(o >= 0 && l > 0 && o + l <= GUEST_PAGES * 4096);
    }),
    { numRuns: 500 },
  );
});

test("a refused request leaves earlier state intact and the device keeps serving", () => {
  const { dev, released } = device("bitmap");
  const ok = bmapBuf([{ start: 0, shift: 12 + 10, bmapLen: 0 }]);
  assert.equal(dev.handleInflate(ok, ok.length), null);
  assert.equal(dev.ballooned.count, 1024);
  const bad = bmapBuf([{ start: 2048, shift: 12 + 10, bmapLen: 0 }, { start: 2048, shift: 12, bmapLen: 8, words: [[1, 0]] }]);
  assert.equal(dev.handleInflate(bad, bad.length)?.kind, "overlap");
  assert.equal(dev.ballooned.count, 1024);
  assert.equal(released.length, 1);
  const ok2 = bmapBuf([{ start: 2048, shift: 12 + 10, bmapLen: 0 }]);
  assert.equal(dev.handleInflate(ok2, ok2.length), null);
  assert.equal(dev.ballooned.count, 2048);
});
