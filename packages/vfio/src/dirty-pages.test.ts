// VFIO_IOMMU_DIRTY_PAGES: one test per argument check of the seed's
// vfio_iommu_type1_ioctl branch (seed 004), with the valid boundary next to
// each invalid one, then the pinned / unpinned reporting rules.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  IommuContainer,
  VFIO_DIRTY_BITMAP_GET_SZ,
  VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP as GET,
  VFIO_IOMMU_DIRTY_PAGES_FLAG_START as START,
  VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP as STOP,
  VFIO_DMA_MAP_FLAG_READ,
  VFIO_DMA_MAP_FLAG_WRITE,
  grpcStatusCode,
  testBit,
  type DirtyPagesRequest,
  type DirtyPagesResult,
  type IommuContainerOptions,
  type IommuErrorCode,
  type U64,
} from "./index";

const PG = 4096;
const BASE = 0x10_0000; // iova of the test mapping
const GPA = 0x40_0000; // guest-physical address behind it
const NPAGES = 64;
const RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

function page(n: number): number {
  return BASE + n * PG;
}

function setup(opts: IommuContainerOptions = {}, track = true): IommuContainer {
  const c = new IommuContainer(opts);
  const m = c.mapDma({ iova: BASE, vaddr: GPA, size: NPAGES * PG, flags: RW });
  assert.ok(m.ok, m.ok ? "" : m.message);
  if (track) assert.ok(c.startDirtyTracking().ok);
  return c;
}

function get(over: Partial<DirtyPagesRequest> = {}): DirtyPagesRequest {
  return { argsz: VFIO_DIRTY_BITMAP_GET_SZ, flags: GET, iova: BASE, size: NPAGES * PG, pgsize: PG, bitmapSize: 8, ...over };
}

/** Asserts a failure with `code` whose message names `field` and shows `value`. */
function assertFails(r: DirtyPagesResult | { ok: boolean; code?: string; message?: string }, code: IommuErrorCode, field: string, value: string): void {
  assert.equal(r.ok, false, `expected ${code}, got ok`);
  if (r.ok) return;
  const e = r as { code: string; message: string };
  assert.equal(e.code, code, e.message);
  assert.ok(e.message.includes(field), `message names ${field}: ${e.message}`);
  assert.ok(e.message.includes(value), `message shows ${value}: ${e.message}`);
}

function bits(r: DirtyPagesResult): number[] {
  assert.ok(r.ok, r.ok ? "" : r.message);
  const out: number[] = [];
  const bm = r.bitmap as Uint8Array;
  for (let n = 0; n < bm.length * 8; n++) if (testBit(bm, n)) out.push(n);
  assert.equal(out.length, r.dirty);
  return out;
}

function read(c: IommuContainer, report?: "all" | "pinned" | "unpinned", first = 0, n = NPAGES): number[] {
  return bits(c.getBitmap({ iova: page(first), size: n * PG, report }));
}

describe("DIRTY_PAGES argument checks (seed 004 vfio_iommu_type1_ioctl)", () => {
  it("argsz below the 8-byte header is INVALID_ARGUMENT; exactly 8 is enough for START and STOP (seed L337)", () => {
    const c = setup({}, false);
    assertFails(c.dirtyPages({ argsz: 7, flags: START }), "INVALID_ARGUMENT", "argsz", "7");
    assertFails(c.dirtyPages({ argsz: 0, flags: STOP }), "INVALID_ARGUMENT", "argsz", "0");
    assert.equal(c.dirtyTracking, false);
    assert.deepEqual(c.dirtyPages({ argsz: 8, flags: START }), { ok: true, op: "START", dirty: 0 });
    assert.equal(c.dirtyTracking, true);
    assert.deepEqual(c.dirtyPages({ argsz: 8, flags: STOP }), { ok: true, op: "STOP", dirty: 0 });
    assert.equal(c.dirtyTracking, false);
  });

  it("argsz or flags that are not uint32 are INVALID_ARGUMENT", () => {
    const c = setup();
    assertFails(c.dirtyPages({ argsz: -1, flags: START }), "INVALID_ARGUMENT", "argsz", "-1");
    assertFails(c.dirtyPages({ argsz: 8.5, flags: START }), "INVALID_ARGUMENT", "argsz", "8.5");
    assertFails(c.dirtyPages({ argsz: 2 ** 32, flags: START }), "INVALID_ARGUMENT", "argsz", "4294967296");
    assertFails(c.dirtyPages({ argsz: 8, flags: -1 }), "INVALID_ARGUMENT", "flags", "-1");
  });

  it("unknown flag bits are INVALID_ARGUMENT and change nothing (seed L337 flags & ~mask)", () => {
    const c = setup({}, false);
    assertFails(c.dirtyPages({ argsz: 8, flags: 0x8 }), "INVALID_ARGUMENT", "flags", "0x8");
    assertFails(c.dirtyPages({ argsz: 8, flags: START | 0x10 }), "INVALID_ARGUMENT", "flags", "0x11");
    assertFails(c.dirtyPages({ argsz: 8, flags: 0x8000_0000 }), "INVALID_ARGUMENT", "flags", "0x80000000");
    assert.equal(c.dirtyTracking, false);
  });

  it("no operation is INVALID_ARGUMENT (the seed falls through to -ENOTTY, L482)", () => {
    const c = setup();
    assertFails(c.dirtyPages({ argsz: 8, flags: 0 }), "INVALID_ARGUMENT", "flags", "no operation");
  });

  it("more than one operation is INVALID_ARGUMENT (the seed's else-if chain L340-L352 would silently run one)", () => {
    for (const flags of [START | STOP, START | GET, STOP | GET, START | STOP | GET]) {
      const c = setup({}, false);
      assertFails(c.dirtyPages(get({ flags })), "INVALID_ARGUMENT", "flags", "more than one operation");
      assert.equal(c.dirtyTracking, false, `flags ${flags} must not start tracking`);
    }
    const c = setup();
    assertFails(c.dirtyPages(get({ flags: STOP | GET })), "INVALID_ARGUMENT", "flags", "0x6");
    assert.equal(c.dirtyTracking, true, "STOP|GET must not stop tracking");
  });

  it("GET_BITMAP with argsz below 48 is INVALID_ARGUMENT; 48 succeeds (seed L331-L337 minsz)", () => {
    const c = setup();
    assertFails(c.dirtyPages(get({ argsz: 8 })), "INVALID_ARGUMENT", "argsz", "8");
    assertFails(c.dirtyPages(get({ argsz: 47 })), "INVALID_ARGUMENT", "argsz", "47");
    assert.ok(c.dirtyPages(get({ argsz: 48 })).ok);
    assert.ok(c.dirtyPages(get({ argsz: 4096 })).ok);
  });

  it("pgsize other than the IOMMU minimum page is INVALID_ARGUMENT (seed L358-L363, tightened as upstream)", () => {
    const c = setup(); // iova_pgsizes 4K|2M|1G
    for (const pgsize of [0, 1, 3, 2048, 8192, 2 * 1024 * 1024]) {
      assertFails(c.dirtyPages(get({ pgsize })), "INVALID_ARGUMENT", "pgsize", String(pgsize));
    }
    assert.ok(c.dirtyPages(get({ pgsize: 4096 })).ok);
    const big = setup({ iovaPgsizes: 0x10000 | 0x20_0000 }); // 64 KiB minimum
    assertFails(big.dirtyPages(get({ pgsize: 4096, size: 0x10000 })), "INVALID_ARGUMENT", "pgsize", "65536");
    assert.ok(big.dirtyPages(get({ pgsize: 0x10000, size: 0x10000 })).ok);
  });

  it("iova not aligned to the IOMMU page is INVALID_ARGUMENT (seed L365)", () => {
    const c = setup();
    assertFails(c.dirtyPages(get({ iova: BASE + 1, size: PG })), "INVALID_ARGUMENT", "iova", "0x100001");
    assertFails(c.dirtyPages(get({ iova: BASE + 2048, size: PG })), "INVALID_ARGUMENT", "iova", "0x100800");
    assert.ok(c.dirtyPages(get({ iova: page(1), size: PG })).ok);
  });

  it("size zero is INVALID_ARGUMENT (seed L367)", () => {
    const c = setup();
    assertFails(c.dirtyPages(get({ size: 0 })), "INVALID_ARGUMENT", "size", "0");
    assert.ok(c.dirtyPages(get({ size: PG })).ok, "one page is the smallest valid size");
  });

  it("iova + size overflowing 64 bits is INVALID_ARGUMENT; ending exactly below 2^64 passes the check (seed L369)", () => {
    const c = setup();
    const top = 1n << 64n;
    assertFails(c.dirtyPages(get({ iova: top - 4096n, size: 4096n })), "INVALID_ARGUMENT", "overflows 64 bits", "0xfffffffffffff000");
    assertFails(c.dirtyPages(get({ iova: top - 4096n, size: top - 4096n })), "INVALID_ARGUMENT", "overflows 64 bits", "size");
    // One page short of the wrap is a legal range: it fails only later, because nothing is mapped there.
    const r = c.dirtyPages(get({ iova: top - 8192n, size: 4096n }));
    assertFails(r, "NOT_FOUND", "iova", "not mapped");
  });

  it("size not a multiple of pgsize is INVALID_ARGUMENT (the seed's size >> pgshift would drop the partial page's bit)", () => {
    const c = setup();
    assertFails(c.dirtyPages(get({ size: PG + 1 })), "INVALID_ARGUMENT", "size", "0x1001");
    assertFails(c.dirtyPages(get({ size: 100 })), "INVALID_ARGUMENT", "size", "0x64");
  });

  it("bitmap_size zero is INVALID_ARGUMENT (seed L303)", () => {
    const c = setup();
    assertFails(c.dirtyPages(get({ bitmapSize: 0 })), "INVALID_ARGUMENT", "bitmap_size", "0");
  });

  it("bitmap_size below ALIGN(npages, 64) / 8 is INVALID_ARGUMENT; every valid size succeeds (seed L308; L374 returned garbage for them)", () => {
    const c = setup();
    // 64 pages -> 8 bytes; 1 page -> 8 bytes (one 64-bit word); 65 pages -> 16 bytes.
    for (let b = 1; b < 8; b++) {
      assertFails(c.dirtyPages(get({ bitmapSize: b })), "INVALID_ARGUMENT", "bitmap_size", `${b} is too small`);
      assertFails(c.dirtyPages(get({ size: PG, bitmapSize: b })), "INVALID_ARGUMENT", "bitmap_size", "need 8 bytes");
    }
    for (const b of [8, 9, 16, 4096, 2 ** 53 - 1]) {
      const r = c.dirtyPages(get({ bitmapSize: b }));
      assert.ok(r.ok, `bitmap_size ${b}: ${r.ok ? "" : r.message}`);
      assert.equal(r.bitmap?.length, 8);
    }
    assert.ok(c.dirtyPages(get({ bitmapSize: (1n << 64n) - 1n })).ok);
    const wide = new IommuContainer();
    assert.ok(wide.mapDma({ iova: BASE, vaddr: GPA, size: 65 * PG, flags: RW }).ok);
    assert.ok(wide.startDirtyTracking().ok);
    assertFails(wide.dirtyPages(get({ size: 65 * PG, bitmapSize: 15 })), "INVALID_ARGUMENT", "bitmap_size", "need 16 bytes");
    const ok = wide.dirtyPages(get({ size: 65 * PG, bitmapSize: 16 }));
    assert.ok(ok.ok);
    assert.equal(ok.bitmap?.length, 16);
  });

  it("64-bit fields that are not unsigned integers are INVALID_ARGUMENT", () => {
    const c = setup();
    assertFails(c.dirtyPages(get({ iova: -4096 })), "INVALID_ARGUMENT", "iova", "-4096");
    assertFails(c.dirtyPages(get({ size: 1.5 })), "INVALID_ARGUMENT", "size", "1.5");
    assertFails(c.dirtyPages(get({ pgsize: Number.NaN })), "INVALID_ARGUMENT", "pgsize", "NaN");
    assertFails(c.dirtyPages(get({ bitmapSize: 2 ** 64 })), "INVALID_ARGUMENT", "bitmap_size", "bigint");
    assertFails(c.dirtyPages(get({ iova: 1n << 64n })), "INVALID_ARGUMENT", "iova", "18446744073709551616");
  });

  it("an unknown report mode is INVALID_ARGUMENT", () => {
    const c = setup();
    const bad = { ...get(), report: "dirty" } as unknown as DirtyPagesRequest;
    assertFails(c.dirtyPages(bad), "INVALID_ARGUMENT", "report", "dirty");
  });

  it("a bitmap larger than maxBitmapBytes is RESOURCE_EXHAUSTED (the seed's kmalloc -ENOMEM, L377)", () => {
    const c = setup({ maxBitmapBytes: 8 });
    assert.ok(c.mapDma({ iova: page(NPAGES), vaddr: GPA + NPAGES * PG, size: PG, flags: RW }).ok);
    assert.ok(c.dirtyPages(get()).ok, "8 bytes is at the limit");
    assertFails(c.dirtyPages(get({ size: (NPAGES + 1) * PG, bitmapSize: 16 })), "RESOURCE_EXHAUSTED", "size", "16-byte bitmap");
  });

  it("GET_BITMAP without tracking is FAILED_PRECONDITION (gRPC 9)", () => {
    const c = setup({}, false);
    const r = c.dirtyPages(get());
    assertFails(r, "FAILED_PRECONDITION", "GET_BITMAP", "START");
    assert.equal(grpcStatusCode(r), 9);
    c.startDirtyTracking();
    c.stopDirtyTracking();
    assertFails(c.dirtyPages(get()), "FAILED_PRECONDITION", "GET_BITMAP", "START");
  });

  it("a range not fully mapped is NOT_FOUND, naming the first unmapped iova (the seed's walk would stop short)", () => {
    const c = setup();
    assertFails(c.dirtyPages(get({ size: (NPAGES + 1) * PG, bitmapSize: 16 })), "NOT_FOUND", "iova", "0x140000");
    assertFails(c.dirtyPages(get({ iova: BASE - PG, size: 2 * PG })), "NOT_FOUND", "iova", "0xff000");
    assertFails(c.dirtyPages(get({ iova: 1n << 48n, size: PG })), "NOT_FOUND", "iova", "0x1000000000000");
    // Two adjacent mappings form one range.
    assert.ok(c.mapDma({ iova: page(NPAGES), vaddr: 0, size: PG, flags: RW }).ok);
    assert.ok(c.dirtyPages(get({ size: (NPAGES + 1) * PG, bitmapSize: 16 })).ok);
  });

  it("errors map to gRPC status numbers", () => {
    assert.equal(grpcStatusCode("INVALID_ARGUMENT"), 3);
    assert.equal(grpcStatusCode("NOT_FOUND"), 5);
    assert.equal(grpcStatusCode("ALREADY_EXISTS"), 6);
    assert.equal(grpcStatusCode("PERMISSION_DENIED"), 7);
    assert.equal(grpcStatusCode("RESOURCE_EXHAUSTED"), 8);
    assert.equal(grpcStatusCode("FAILED_PRECONDITION"), 9);
    assert.equal(grpcStatusCode("OUT_OF_RANGE"), 11);
    const c = setup();
    assert.equal(grpcStatusCode(c.dirtyPages(get())), 0);
    const bad = c.dirtyPages(get({ pgsize: 1 }));
    assert.equal(grpcStatusCode(bad), 3);
    assert.ok(!bad.ok && bad.errno === "EINVAL");
  });
});

describe("DIRTY_PAGES reporting rules", () => {
  it("an untouched range reads clean; the bitmap is one bit per page, little-endian, rounded to 64-bit words", () => {
    const c = setup();
    assert.deepEqual(read(c), []);
    assert.ok(c.pinPages([page(0), page(9), page(63)]).ok);
    const r = c.getBitmap({ iova: BASE, size: NPAGES * PG });
    assert.ok(r.ok);
    assert.deepEqual([...(r.bitmap as Uint8Array)], [0x01, 0x02, 0, 0, 0, 0, 0, 0x80]);
    assert.equal(r.dirty, 3);
  });

  it("pinned pages are dirty on every read, however many", () => {
    const c = setup();
    assert.ok(c.pinPages([page(3), page(4)]).ok);
    for (let round = 0; round < 5; round++) assert.deepEqual(read(c), [3, 4], `round ${round}`);
  });

  it("pages pinned before START are dirty once tracking starts", () => {
    const c = setup({}, false);
    assert.ok(c.pinPages([page(7)]).ok);
    c.startDirtyTracking();
    assert.deepEqual(read(c), [7]);
  });

  it("a page unpinned while tracking is reported by the next read, then gone", () => {
    const c = setup();
    assert.ok(c.pinPages([page(5), page(6)]).ok);
    const u = c.unpinPages([page(5)]);
    assert.ok(u.ok && u.unpinned === 1 && u.notPinned === 0);
    assert.equal(c.info().unpinnedTracked, 1);
    assert.deepEqual(read(c), [5, 6]);
    assert.deepEqual(read(c), [6]);
    assert.equal(c.info().unpinnedTracked, 0);
  });

  it("a page unpinned before START is not dirty (seed L143-L147)", () => {
    const c = setup({}, false);
    assert.ok(c.pinPages([page(5)]).ok);
    assert.ok(c.unpinPages([page(5)]).ok);
    c.startDirtyTracking();
    assert.deepEqual(read(c), []);
  });

  it("only the last unpin releases a page pinned twice (vfio_pfn.ref_count)", () => {
    const c = setup();
    assert.ok(c.pinPages([page(2), page(2)]).ok);
    assert.equal(c.info().pinnedPages, 1);
    assert.ok(c.unpinPages([page(2)]).ok);
    assert.deepEqual(read(c), [2]);
    assert.deepEqual(read(c), [2], "still pinned once");
    assert.ok(c.unpinPages([page(2)]).ok);
    assert.deepEqual(read(c), [2], "unpinned while tracking");
    assert.deepEqual(read(c), []);
  });

  it("unpinning an entry already unpinned while tracking is a no-op (seed L167)", () => {
    const c = setup();
    assert.ok(c.pinPages([page(1)]).ok);
    assert.ok(c.unpinPages([page(1)]).ok);
    const again = c.unpinPages([page(1), page(2)]);
    assert.ok(again.ok);
    assert.equal(again.unpinned, 0);
    assert.equal(again.notPinned, 2);
    assert.deepEqual(read(c), [1]);
  });

  it("re-pinning a page unpinned while tracking pins it anew (the thread's fix, seed L115-L127)", () => {
    const c = setup();
    assert.ok(c.pinPages([page(8)]).ok);
    assert.ok(c.unpinPages([page(8)]).ok);
    const p = c.pinPages([page(8)]);
    assert.ok(p.ok);
    assert.deepEqual(p.guestPfns, [GPA / PG + 8]);
    assert.equal(c.info().pinnedPages, 1);
    assert.equal(c.info().unpinnedTracked, 0);
    assert.deepEqual(read(c, "unpinned"), [8], "the write while it was unpinned is still owed to an 'unpinned' read");
    assert.deepEqual(read(c, "unpinned"), []);
    assert.deepEqual(read(c), [8]);
    assert.deepEqual(read(c), [8], "pinned again, so dirty on every read");
    assert.ok(c.unpinPages([page(8)]).ok, "one unpin releases it: ref_count restarted at 1");
    assert.deepEqual(read(c), [8]);
    assert.deepEqual(read(c), []);
  });

  it("STOP forgets pages unpinned while tracking and DMA-written pages; pinned pages stay pinned", () => {
    const c = setup();
    assert.ok(c.pinPages([page(1), page(2)]).ok);
    assert.ok(c.unpinPages([page(1)]).ok);
    assert.ok(c.markDirty(page(10), PG).ok);
    assert.ok(c.stopDirtyTracking().ok);
    assert.equal(c.info().unpinnedTracked, 0);
    assert.equal(c.info().pinnedPages, 1);
    c.startDirtyTracking();
    assert.deepEqual(read(c), [2]);
  });

  it("GET_BITMAP leaves tracking on (the thread rejected the seed's L386)", () => {
    const c = setup();
    read(c);
    assert.equal(c.dirtyTracking, true);
    assert.ok(c.pinPages([page(0)]).ok);
    assert.ok(c.unpinPages([page(0)]).ok);
    assert.deepEqual(read(c), [0], "an unpin after a read is still tracked");
  });

  it("a read of part of a mapping consumes only that part (the seed empties the whole vfio_dma, L295)", () => {
    const c = setup();
    assert.ok(c.pinPages([page(1), page(40)]).ok);
    assert.ok(c.unpinPages([page(1), page(40)]).ok);
    assert.deepEqual(read(c, "all", 0, 32), [1]);
    assert.deepEqual(read(c, "all", 32, 32), [8], "page 40 survived the first read");
    assert.deepEqual(read(c), []);
  });

  it("markDirty: DMA writes are reported once, on every page the write touches", () => {
    const c = setup();
    const m = c.markDirty(page(3) + 100, PG); // straddles pages 3 and 4
    assert.ok(m.ok && m.pages === 2);
    assert.ok(c.markDirty(BigInt(page(20)), 1n).ok);
    assert.deepEqual(read(c), [3, 4, 20]);
    assert.deepEqual(read(c), []);
  });

  it("markDirty is not logged while tracking is off, but is still checked", () => {
    const c = setup({}, false);
    const m = c.markDirty(page(3), PG);
    assert.ok(m.ok && m.pages === 0);
    c.startDirtyTracking();
    assert.deepEqual(read(c), []);
    assertFails(c.markDirty(page(NPAGES - 1), 2 * PG), "NOT_FOUND", "iova", "0x140000");
    assertFails(c.markDirty(page(0), 0), "INVALID_ARGUMENT", "len", "0");
    assertFails(c.markDirty(-1, PG), "INVALID_ARGUMENT", "iova", "-1");
    assert.deepEqual(read(c), [], "a faulting write marks nothing");
  });

  it("markDirty through a read-only mapping is PERMISSION_DENIED", () => {
    const c = new IommuContainer();
    assert.ok(c.mapDma({ iova: 0, vaddr: 0, size: PG, flags: VFIO_DMA_MAP_FLAG_READ }).ok);
    c.startDirtyTracking();
    assertFails(c.markDirty(0, 8), "PERMISSION_DENIED", "iova", "WRITE");
    assert.equal(grpcStatusCode("PERMISSION_DENIED"), 7);
  });

  it('report "pinned" gives pinned pages only and consumes nothing', () => {
    const c = setup();
    assert.ok(c.pinPages([page(1), page(2)]).ok);
    assert.ok(c.unpinPages([page(2)]).ok);
    assert.ok(c.markDirty(page(9), 1).ok);
    assert.deepEqual(read(c, "pinned"), [1]);
    assert.deepEqual(read(c, "pinned"), [1]);
    assert.deepEqual(read(c, "all"), [1, 2, 9], "nothing was consumed by the pinned reads");
  });

  it('report "unpinned" gives DMA-written and unpinned pages only, once', () => {
    const c = setup();
    assert.ok(c.pinPages([page(1), page(2)]).ok);
    assert.ok(c.unpinPages([page(2)]).ok);
    assert.ok(c.markDirty(page(9), 1).ok);
    assert.ok(c.markDirty(page(1), 1).ok, "a write to a pinned page is also a DMA write");
    assert.deepEqual(read(c, "unpinned"), [1, 2, 9]);
    assert.deepEqual(read(c, "unpinned"), []);
    assert.deepEqual(read(c, "all"), [1]);
  });

  it("pinned pages reported only at stop-and-copy: pre-copy rounds read 'unpinned', the final read 'all'", () => {
    const c = setup();
    assert.ok(c.pinPages([page(30)]).ok);
    assert.ok(c.markDirty(page(31), 1).ok);
    assert.deepEqual(read(c, "unpinned"), [31], "pre-copy round 1 leaves the pinned page out");
    assert.ok(c.markDirty(page(32), 1).ok);
    assert.deepEqual(read(c, "unpinned"), [32], "pre-copy round 2");
    assert.deepEqual(read(c, "all"), [30], "stop-and-copy sends the pinned page");
  });

  it("iommu_mapped containers report every mapped page dirty on every read (seed L222)", () => {
    const c = setup({ iommuMapped: true });
    const all = Array.from({ length: NPAGES }, (_, i) => i);
    assert.deepEqual(read(c), all);
    assert.deepEqual(read(c), all);
    assert.deepEqual(read(c, "unpinned"), []);
  });

  it("unmapping while tracking hands back the dirty pages of the range with their guest-physical address", () => {
    const c = setup();
    assert.ok(c.pinPages([page(0), page(1)]).ok);
    assert.ok(c.unpinPages([page(1)]).ok);
    assert.ok(c.markDirty(page(5), 2 * PG).ok);
    const u = c.unmapDma({ iova: BASE, size: NPAGES * PG });
    assert.ok(u.ok);
    assert.equal(u.unmappedBytes, NPAGES * PG);
    assert.equal(u.forcedUnpins, 1);
    assert.deepEqual(u.dirtyRanges, [
      { iova: page(0), gpa: GPA, size: 2 * PG },
      { iova: page(5), gpa: GPA + 5 * PG, size: 2 * PG },
    ]);
    assert.deepEqual(c.info(), { ...c.info(), pinnedPages: 0, unpinnedTracked: 0, mappings: 0 });
  });

  it("unmapping while not tracking reports nothing", () => {
    const c = setup({}, false);
    assert.ok(c.pinPages([page(0)]).ok);
    const u = c.unmapDma({ iova: BASE, size: NPAGES * PG });
    assert.ok(u.ok);
    assert.deepEqual(u.dirtyRanges, []);
    assert.equal(u.forcedUnpins, 1);
  });
});

// Guard for the U64 type: numbers and bigints are interchangeable.
void ((x: U64): U64 => x);
