// Property tests: the container against a per-page model of the seed's rules,
// and hostile DIRTY_PAGES requests that must be answered, never thrown.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  IommuContainer,
  VFIO_DMA_MAP_FLAG_READ,
  VFIO_DMA_MAP_FLAG_WRITE,
  testBit,
  type DirtyReport,
  type DirtyPagesRequest,
} from "./index";

const PG = 4096;
const SLOTS = 4;
const SLOT_PAGES = 16;
const STRIDE = 24; // pages between slot starts: 8-page holes between mappings
const RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

type Op =
  | { t: "map"; slot: number }
  | { t: "unmap"; slot: number }
  | { t: "pin"; slot: number; page: number }
  | { t: "unpin"; slot: number; page: number }
  | { t: "write"; slot: number; page: number; offset: number; len: number }
  | { t: "start" }
  | { t: "stop" }
  | { t: "get"; slot: number; first: number; n: number; report: DirtyReport };

const slot = fc.integer({ min: 0, max: SLOTS - 1 });
// Mostly a few hot pages, so pins, unpins, writes and reads meet often.
const pg = fc.oneof({ weight: 3, arbitrary: fc.integer({ min: 0, max: 3 }) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: SLOT_PAGES - 1 }) });
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 2, arbitrary: fc.record({ t: fc.constant("map" as const), slot }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("unmap" as const), slot }) },
  { weight: 5, arbitrary: fc.record({ t: fc.constant("pin" as const), slot, page: pg }) },
  { weight: 5, arbitrary: fc.record({ t: fc.constant("unpin" as const), slot, page: pg }) },
  {
    weight: 4,
    arbitrary: fc.record({
      t: fc.constant("write" as const),
      slot,
      page: pg,
      offset: fc.integer({ min: 0, max: PG - 1 }),
      len: fc.integer({ min: 1, max: 3 * PG }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("start" as const) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("stop" as const) }) },
  {
    weight: 4,
    arbitrary: fc
      .record({
        t: fc.constant("get" as const),
        slot,
        first: pg,
        n: fc.integer({ min: 1, max: SLOT_PAGES }),
        report: fc.constantFrom<DirtyReport>("all", "pinned", "unpinned"),
      })
      .map((g) => ({ ...g, n: Math.min(g.n, SLOT_PAGES - g.first) })),
  },
);

/** The seed's rules per page, with none of the container's data structures. */
class Model {
  mapped = new Set<number>();
  pins = new Map<number, number>(); // iova page -> pin count
  written = new Set<number>(); // iova pages dirtied since the last consuming read
  tracking = false;

  static pfn(slotNo: number, page: number): number {
    return slotNo * STRIDE + page;
  }
  isMapped(pfn: number): boolean {
    const s = Math.floor(pfn / STRIDE);
    return s < SLOTS && pfn % STRIDE < SLOT_PAGES && this.mapped.has(s);
  }
  dirty(pfn: number, report: DirtyReport): boolean {
    const pinned = (this.pins.get(pfn) ?? 0) > 0;
    return (report !== "unpinned" && pinned) || (report !== "pinned" && this.written.has(pfn));
  }
}

function run(ops: Op[]): void {
  const c = new IommuContainer();
  const m = new Model();
  for (const [i, op] of ops.entries()) {
    const at = `op ${i} ${JSON.stringify(op)}`;
    switch (op.t) {
      case "map": {
        const r = c.mapDma({ iova: Model.pfn(op.slot, 0) * PG, vaddr: op.slot * SLOT_PAGES * PG, size: SLOT_PAGES * PG, flags: RW });
        if (m.mapped.has(op.slot)) assert.ok(!r.ok && r.code === "ALREADY_EXISTS", at);
        else assert.ok(r.ok, at);
        m.mapped.add(op.slot);
        break;
      }
      case "unmap": {
        const r = c.unmapDma({ iova: Model.pfn(op.slot, 0) * PG, size: SLOT_PAGES * PG });
        assert.ok(r.ok, at);
        assert.equal(r.unmappedBytes, m.mapped.has(op.slot) ? SLOT_PAGES * PG : 0, at);
        const expected: number[] = [];
        for (let p = 0; p < SLOT_PAGES; p++) {
          const pfn = Model.pfn(op.slot, p);
          if (m.tracking && m.mapped.has(op.slot) && m.dirty(pfn, "all")) expected.push(pfn);
          m.pins.delete(pfn);
          m.written.delete(pfn);
        }
        const got: number[] = [];
        for (const d of r.dirtyRanges) {
          for (let a = d.iova; a < d.iova + d.size; a += PG) got.push(a / PG);
          assert.equal(d.gpa - d.iova, op.slot * SLOT_PAGES * PG - Model.pfn(op.slot, 0) * PG, at);
        }
        assert.deepEqual(got, expected, at);
        m.mapped.delete(op.slot);
        break;
      }
      case "pin": {
        const pfn = Model.pfn(op.slot, op.page);
        const r = c.pinPages([pfn * PG]);
        if (!m.mapped.has(op.slot)) {
          assert.ok(!r.ok && r.code === "NOT_FOUND", at);
          break;
        }
        assert.ok(r.ok, at);
        assert.deepEqual(r.guestPfns, [op.slot * SLOT_PAGES + op.page], at);
        m.pins.set(pfn, (m.pins.get(pfn) ?? 0) + 1);
        break;
      }
      case "unpin": {
        const pfn = Model.pfn(op.slot, op.page);
        const r = c.unpinPages([pfn * PG]);
        if (!m.mapped.has(op.slot)) {
          assert.ok(!r.ok && r.code === "NOT_FOUND", at);
          break;
        }
        assert.ok(r.ok, at);
        const n = m.pins.get(pfn) ?? 0;
        assert.equal(r.unpinned, n > 0 ? 1 : 0, at);
        if (n > 0) {
          if (n === 1) {
            m.pins.delete(pfn);
            if (m.tracking) m.written.add(pfn);
          } else m.pins.set(pfn, n - 1);
        }
        break;
      }
      case "write": {
        const start = Model.pfn(op.slot, op.page) * PG + op.offset;
        const r = c.markDirty(start, op.len);
        const first = Math.floor(start / PG);
        const last = Math.floor((start + op.len - 1) / PG);
        let allMapped = true;
        for (let p = first; p <= last; p++) allMapped &&= m.isMapped(p);
        if (!allMapped) {
          assert.ok(!r.ok && r.code === "NOT_FOUND", at);
          break;
        }
        assert.ok(r.ok, at);
        assert.equal(r.pages, m.tracking ? last - first + 1 : 0, at);
        if (m.tracking) for (let p = first; p <= last; p++) m.written.add(p);
        break;
      }
      case "start":
        assert.ok(c.startDirtyTracking().ok, at);
        m.tracking = true;
        break;
      case "stop":
        assert.ok(c.stopDirtyTracking().ok, at);
        m.tracking = false;
        m.written.clear();
        break;
      case "get": {
        const first = Model.pfn(op.slot, op.first);
        const r = c.getBitmap({ iova: first * PG, size: op.n * PG, report: op.report });
        if (!m.tracking) {
          assert.ok(!r.ok && r.code === "FAILED_PRECONDITION", at);
          break;
        }
        if (!m.mapped.has(op.slot)) {
          assert.ok(!r.ok && r.code === "NOT_FOUND", at);
          break;
        }
        assert.ok(r.ok, at);
        const bm = r.bitmap as Uint8Array;
        assert.equal(bm.length, Math.ceil(op.n / 64) * 8, at);
        let count = 0;
        for (let b = 0; b < bm.length * 8; b++) {
          const want: boolean = b < op.n && m.dirty(first + b, op.report);
          assert.equal(testBit(bm, b), want, `${at}: bit ${b}`);
          if (want) count++;
        }
        assert.equal(r.dirty, count, at);
        if (op.report !== "pinned") for (let b = 0; b < op.n; b++) m.written.delete(first + b);
        break;
      }
    }
    let pinned = 0;
    for (const n of m.pins.values()) if (n > 0) pinned++;
    assert.equal(c.info().pinnedPages, pinned, `${at}: pinned page count`);
    assert.equal(c.dirtyTracking, m.tracking, at);
  }
}

describe("IommuContainer against a per-page model", () => {
  it("bitmaps match the model under random map/unmap/pin/unpin/markDirty/start/stop/getBitmap", () => {
    const prefix: Op[] = [{ t: "map", slot: 0 }, { t: "map", slot: 1 }, { t: "start" }];
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 1, maxLength: 120, size: "max" }), (ops) => run([...prefix, ...ops])),
      { numRuns: 300 },
    );
  });
});

describe("hostile DIRTY_PAGES requests", () => {
  it("every request gets a result with a message, never an exception", () => {
    const u64 = fc.oneof(
      fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
      fc.constantFrom<number | bigint>(0, 1, 4096, 8, 48, 0x10_0000, 2 ** 53 - 1, (1n << 64n) - 4096n, -1, 0.5, Number.NaN, 2 ** 60),
      fc.integer({ min: 0, max: 1 << 24 }),
    );
    const req = fc.record({
      argsz: fc.oneof(fc.integer({ min: -2, max: 100 }), fc.constant(2 ** 32)),
      flags: fc.oneof(fc.integer({ min: 0, max: 16 }), fc.constant(0xffff_ffff)),
      iova: u64,
      size: u64,
      pgsize: u64,
      bitmapSize: u64,
    });
    fc.assert(
      fc.property(req, (r) => {
        const c = new IommuContainer({ maxBitmapBytes: 1 << 16 });
        c.mapDma({ iova: 0x10_0000, vaddr: 0, size: 64 * PG, flags: RW });
        c.startDirtyTracking();
        const res = c.dirtyPages(r as DirtyPagesRequest);
        if (res.ok) {
          assert.ok(["START", "STOP", "GET_BITMAP"].includes(res.op));
          if (res.op === "GET_BITMAP") assert.ok(res.bitmap !== undefined && res.bitmap.length <= 1 << 16);
        } else {
          assert.ok(res.message.length > 20 && res.message.startsWith("DIRTY_PAGES: "), res.message);
        }
      }),
      { numRuns: 2000 },
    );
  });

  it("every valid GET_BITMAP succeeds, whatever bitmap_size at or above the need (the seed's L374 failed them all)", () => {
    const c = new IommuContainer();
    c.mapDma({ iova: 0x10_0000, vaddr: 0, size: 200 * PG, flags: RW });
    c.startDirtyTracking();
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 199 }), fc.integer({ min: 1, max: 200 }), fc.integer({ min: 0, max: 100 }), (first, n, extra) => {
        n = Math.min(n, 200 - first);
        const need = Math.ceil(n / 64) * 8;
        const ok = c.dirtyPages({ argsz: 48, flags: 4, iova: 0x10_0000 + first * PG, size: n * PG, pgsize: PG, bitmapSize: need + extra });
        assert.ok(ok.ok && ok.bitmap?.length === need, ok.ok ? "" : ok.message);
        const short = c.dirtyPages({ argsz: 48, flags: 4, iova: 0x10_0000 + first * PG, size: n * PG, pgsize: PG, bitmapSize: need - 1 - (extra % need) });
        assert.ok(!short.ok && short.code === "INVALID_ARGUMENT");
      }),
      { numRuns: 500 },
    );
  });
});
