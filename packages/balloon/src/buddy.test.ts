import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { BuddyAllocator, BuddyError, MAX_ORDER } from "./buddy";

test("fresh allocator: all pages free in MAX_ORDER-1 blocks plus the unaligned tail", () => {
  const a = new BuddyAllocator(4096 + 3, { reservedPages: 1 });
  assert.equal(a.freePages, 4096 + 2);
  // [1, 4099): 1,2,4,...,512 then blocks of 1024 from 1024, then tail 4096(2), 4098(1)
  assert.equal(a.freeCount(MAX_ORDER - 1), 3);
  assert.equal(a.stats().totalPages, 4099);
});

test("random alloc/free sequences never hand out a page twice; counts consistent; full free restores MAX_ORDER blocks", () => {
  const pages = 4096;
  fc.assert(
    fc.property(
      fc.array(fc.record({ alloc: fc.boolean(), order: fc.integer({ min: 0, max: MAX_ORDER - 1 }), pick: fc.nat() }), { maxLength: 300 }),
      (ops) => {
        const a = new BuddyAllocator(pages);
        const owner = new Int32Array(pages).fill(-1);
        const live: { pfn: number; order: number }[] = [];
        let used = 0;
        for (const op of ops) {
          if (op.alloc || live.length === 0) {
            const pfn = a.alloc(op.order);
            if (pfn < 0) {
              // Only fails if no free block of that order or larger exists.
              for (let o = op.order; o < MAX_ORDER; o++) assert.equal(a.freeCount(o), 0);
              continue;
            }
            assert.equal(pfn % (1 << op.order), 0, "naturally aligned");
            for (let p = pfn; p < pfn + (1 << op.order); p++) {
              assert.equal(owner[p], -1, `page ${p} handed out twice`);
              owner[p] = pfn;
            }
            live.push({ pfn, order: op.order });
            used += 1 << op.order;
          } else {
            const [blk] = live.splice(op.pick % live.length, 1);
            a.free(blk!.pfn, blk!.order);
            for (let p = blk!.pfn; p < blk!.pfn + (1 << blk!.order); p++) owner[p] = -1;
            used -= 1 << blk!.order;
          }
          assert.equal(a.freePages, pages - used);
        }
        for (const b of live) a.free(b.pfn, b.order);
        assert.equal(a.freePages, pages);
        assert.equal(a.freeCount(MAX_ORDER - 1), pages / 1024, "coalescing restores every MAX_ORDER block");
        for (let o = 0; o < MAX_ORDER - 1; o++) assert.equal(a.freeCount(o), 0);
      },
    ),
    { numRuns: 150 },
  );
});

test("double free and wrong-order free are refused", () => {
  const a = new BuddyAllocator(1024);
  const p = a.alloc(2);
  assert.throws(() => a.free(p, 1), BuddyError);
  a.free(p, 2);
  assert.throws(() => a.free(p, 2), BuddyError);
  assert.throws(() => a.free(5000, 0), BuddyError);
});

test("metadata lives in a caller buffer and can be re-attached", () => {
  const bytes = BuddyAllocator.metadataBytes(2048);
  const sab = new SharedArrayBuffer(bytes + 64);
  const a = new BuddyAllocator(2048, { metadata: { buffer: sab, byteOffset: 64 } });
  const p = a.alloc(3);
  const b = new BuddyAllocator(2048, { metadata: { buffer: sab, byteOffset: 64 }, attach: true });
  assert.equal(b.freePages, 2048 - 8);
  assert.equal(b.allocatedOrder(p), 3);
  b.free(p, 3);
  assert.equal(a.freePages, 2048);
});

test("split, take and iterate free blocks", () => {
  const a = new BuddyAllocator(2048);
  const p = a.alloc(4);
  a.splitAllocated(p, 4);
  a.free(p + 8, 3);
  a.free(p, 3);
  assert.equal(a.freePages, 2048);
  const seen: number[] = [];
  a.forEachFreeBlock(MAX_ORDER - 1, (pfn) => void seen.push(pfn));
  assert.deepEqual(seen.sort((x, y) => x - y), [0, 1024]);
  assert.ok(a.takeFreeBlock(1024, MAX_ORDER - 1));
  assert.ok(!a.takeFreeBlock(1024, MAX_ORDER - 1));
  assert.equal(a.freePages, 1024);
  a.free(1024, MAX_ORDER - 1);
  assert.equal(a.freePages, 2048);
});
