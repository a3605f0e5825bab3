import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { BuddyAllocator, MAX_ORDER } from "@virtmesh/balloon";
import { allocWorkingSet, freePageHint, freeWorkingSet } from "./working-set";

const bit = (bm: Uint8Array, p: number) => (bm[p >> 3]! >> (p & 7)) & 1;

test("a working set is one contiguous run of allocated pages, freed back whole", () => {
  const a = new BuddyAllocator(8192, { reservedPages: 3 });
  const before = a.freePages;
  const ws = allocWorkingSet(a, 3000)!;
  assert.ok(ws);
  assert.equal(ws.pfn, 3, "lowest free run first");
  assert.equal(a.freePages, before - 3000);
  const hint = freePageHint(a, 8192);
  for (let p = ws.pfn; p < ws.pfn + 3000; p++) assert.equal(bit(hint.bitmap, p), 0, `page ${p} is in the working set`);
  assert.equal(bit(hint.bitmap, ws.pfn + 3000), 1);
  freeWorkingSet(a, ws);
  assert.equal(a.freePages, before);
  assert.equal(a.freeCount(MAX_ORDER - 1), new BuddyAllocator(8192, { reservedPages: 3 }).freeCount(MAX_ORDER - 1), "buddies merged back");
});

test("a working set that does not fit is refused and changes nothing", () => {
  const a = new BuddyAllocator(4096, { reservedPages: 16 });
  const hole = a.alloc(0); // pfn 16: splits the first block; the rest still leaves no 4090-page run
  assert.ok(hole >= 0);
  const free = a.freePages;
  assert.equal(allocWorkingSet(a, 4090), null);
  assert.equal(a.freePages, free);
});

test("free page hint: one bit per guest page, LE 64-bit words, pages past the allocator never free", () => {
  const a = new BuddyAllocator(1000, { reservedPages: 10 });
  const h = freePageHint(a, 1100);
  assert.equal(h.pages, 1100);
  assert.equal(h.bitmap.length, Math.ceil(1100 / 64) * 8);
  assert.equal(h.free, 990);
  const words = new BigUint64Array(h.bitmap.buffer);
  assert.equal(words[0]! & 0x3ffn, 0n, "reserved pages 0..9 are not free");
  assert.equal((words[0]! >> 10n) & 1n, 1n);
  for (let p = 1000; p < 1100; p++) assert.equal(bit(h.bitmap, p), 0);
});

test("property: allocations and frees keep the allocator consistent and the run contiguous", () => {
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 8 }), fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 20 }), (sizes, noise) => {
      const a = new BuddyAllocator(4096, { reservedPages: 5 });
      const held: number[] = [];
      for (const o of noise) {
        const p = a.alloc(o);
        if (p >= 0) held.push(p, o);
      }
      const free0 = a.freePages;
      const sets = [];
      for (const n of sizes) {
        const ws = allocWorkingSet(a, n);
        if (!ws) continue;
        const hint = freePageHint(a, 4096);
        for (let p = ws.pfn; p < ws.pfn + n; p++) assert.equal(bit(hint.bitmap, p), 0);
        assert.equal(ws.blocks.reduce((s, [, o]) => s + 2 ** o, 0), n);
        sets.push(ws);
      }
      for (const ws of sets.reverse()) freeWorkingSet(a, ws);
      assert.equal(a.freePages, free0);
    }),
    { numRuns: 100 },
  );
});
