import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { bitmapBytes, bitmapOr, clearBit, maskTail, newBitmap, popcount, setBit, setPfns, testBit } from "./bitmap";

test("length: whole 64-bit words for N pages", () => {
  assert.equal(bitmapBytes(0), 0);
  assert.equal(bitmapBytes(1), 8);
  assert.equal(bitmapBytes(64), 8);
  assert.equal(bitmapBytes(65), 16);
  assert.equal(bitmapBytes(65536), 8192);
  assert.throws(() => bitmapBytes(-1), RangeError);
});

test("bit pfn is bit pfn%64 of little-endian word pfn/64", () => {
  const b = newBitmap(128);
  setBit(b, 70);
  const words = new BigUint64Array(b.buffer);
  assert.equal(words[1], 1n << 6n);
  assert.ok(testBit(b, 70));
  clearBit(b, 70);
  assert.equal(popcount(b), 0);
});

test("or, popcount and set pfns agree with a set model", () => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 300 }), fc.array(fc.nat(400)), fc.array(fc.nat(400)), (pages, xs, ys) => {
      const a = newBitmap(400);
      const b = newBitmap(200); // a shorter peer bitmap
      for (const x of xs) setBit(a, x);
      for (const y of ys) if (y < 200 * 8) setBit(b, y % 200);
      const want = new Set([...xs, ...ys.map((y) => y % 200)].filter((p) => p < pages));
      const u = bitmapOr(pages, a, b, new Uint8Array());
      assert.equal(u.length, bitmapBytes(pages));
      assert.equal(popcount(u), want.size);
      assert.deepEqual([...setPfns(u, pages)], [...want].sort((p, q) => p - q));
      assert.equal(popcount(a, pages), new Set(xs.filter((p) => p < pages)).size);
    }),
  );
});

test("maskTail clears the padding past the last page", () => {
  const b = newBitmap(70).fill(0xff);
  maskTail(b, 70);
  assert.equal(popcount(b), 70);
  assert.ok(!testBit(b, 70));
});
