// DMA map/unmap, translation and pin/unpin checks of the type1 container.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  IommuContainer,
  VFIO_DMA_MAP_FLAG_READ as R,
  VFIO_DMA_MAP_FLAG_WRITE as W,
  VFIO_PIN_PAGES_MAX_ENTRIES,
  grpcStatusCode,
  type IommuErrorCode,
} from "./index";
import type { sidecar } from "@virtmesh/proto";

// Compile-time only: the generated gRPC requests go to the container as they are.
export function _sidecarRequestsFit(
  c: IommuContainer,
  m: sidecar.DmaMapRequest,
  u: sidecar.DmaUnmapRequest,
  p: sidecar.PinPagesRequest,
  d: sidecar.DirtyPagesRequest,
): unknown[] {
  return [c.mapDma(m), c.unmapDma(u), c.pinPages(p.iovas), c.unpinPages(p.iovas), c.dirtyPages(d)];
}

const PG = 4096;
const RW = R | W;

function fails(r: { ok: boolean; code?: string; message?: string }, code: IommuErrorCode, ...words: string[]): void {
  assert.equal(r.ok, false, `expected ${code}`);
  const e = r as { code: string; message: string };
  assert.equal(e.code, code, e.message);
  for (const w of words) assert.ok(e.message.includes(w), `message has "${w}": ${e.message}`);
}

describe("DMA_MAP checks (vfio_dma_do_map)", () => {
  it("maps and reports the mapping", () => {
    const c = new IommuContainer();
    const m = c.mapDma({ iova: 0x1000, vaddr: 0x8000, size: 2 * PG, flags: RW });
    assert.ok(m.ok);
    assert.deepEqual(m.mapping, { iova: 0x1000, vaddr: 0x8000, size: 2 * PG, flags: RW, pinnedPages: 0 });
    assert.deepEqual(c.mappings(), [m.mapping]);
    const info = c.info();
    assert.equal(info.iovaPgsizes, 0x40201000);
    assert.equal(info.pageSize, PG);
    assert.deepEqual(info.iovaRanges, [{ start: 0, end: 2 ** 48 - 1 }]);
    assert.equal(info.mappings, 1);
    assert.equal(info.dmaAvail, 65534);
  });

  it("flags outside READ|WRITE, or neither, are INVALID_ARGUMENT", () => {
    const c = new IommuContainer();
    fails(c.mapDma({ iova: 0, vaddr: 0, size: PG, flags: 4 }), "INVALID_ARGUMENT", "flags", "0x4");
    fails(c.mapDma({ iova: 0, vaddr: 0, size: PG, flags: 0 }), "INVALID_ARGUMENT", "flags", "neither");
    assert.ok(c.mapDma({ iova: 0, vaddr: 0, size: PG, flags: R }).ok);
  });

  it("size zero and iova, vaddr or size off the minimum page are INVALID_ARGUMENT", () => {
    const c = new IommuContainer();
    fails(c.mapDma({ iova: 0, vaddr: 0, size: 0, flags: RW }), "INVALID_ARGUMENT", "size", "0");
    fails(c.mapDma({ iova: 0x800, vaddr: 0, size: PG, flags: RW }), "INVALID_ARGUMENT", "iova", "0x800", "4096");
    fails(c.mapDma({ iova: 0, vaddr: 0x10, size: PG, flags: RW }), "INVALID_ARGUMENT", "vaddr", "0x10");
    fails(c.mapDma({ iova: 0, vaddr: 0, size: PG + 1, flags: RW }), "INVALID_ARGUMENT", "size", "0x1001");
    assert.equal(c.info().mappings, 0);
  });

  it("ranges wrapping 2^64 are INVALID_ARGUMENT; past the aperture or guest memory OUT_OF_RANGE", () => {
    const c = new IommuContainer({ guestMemoryBytes: 1 << 30 });
    const top = 1n << 64n;
    fails(c.mapDma({ iova: top - 4096n, vaddr: 0, size: 8192n, flags: RW }), "INVALID_ARGUMENT", "iova", "wraps");
    fails(c.mapDma({ iova: 0, vaddr: top - 4096n, size: 8192n, flags: RW }), "INVALID_ARGUMENT", "vaddr", "wraps");
    const edge = c.mapDma({ iova: top - 4096n, vaddr: 0, size: 4096n, flags: RW });
    fails(edge, "OUT_OF_RANGE", "aperture");
    assert.equal(grpcStatusCode(edge), 11);
    fails(c.mapDma({ iova: 2 ** 48 - PG, vaddr: 0, size: 2 * PG, flags: RW }), "OUT_OF_RANGE", "0x1000000001000");
    assert.ok(c.mapDma({ iova: 2 ** 48 - PG, vaddr: 0, size: PG, flags: RW }).ok, "the last page of the aperture");
    fails(c.mapDma({ iova: 0, vaddr: (1 << 30) - PG, size: 2 * PG, flags: RW }), "OUT_OF_RANGE", "guest memory", "1073741824");
    assert.ok(c.mapDma({ iova: 0, vaddr: (1 << 30) - PG, size: PG, flags: RW }).ok);
  });

  it("an overlapping mapping is ALREADY_EXISTS; adjacent ones are fine", () => {
    const c = new IommuContainer();
    assert.ok(c.mapDma({ iova: 4 * PG, vaddr: 0, size: 4 * PG, flags: RW }).ok);
    for (const [iova, size] of [[4 * PG, PG], [7 * PG, 2 * PG], [3 * PG, 2 * PG], [0, 16 * PG], [5 * PG, PG]]) {
      const r = c.mapDma({ iova: iova as number, vaddr: 0, size: size as number, flags: RW });
      fails(r, "ALREADY_EXISTS", "overlaps", "[0x4000, 0x8000)");
      assert.equal(grpcStatusCode(r), 6);
    }
    assert.ok(c.mapDma({ iova: 0, vaddr: 0, size: 4 * PG, flags: RW }).ok);
    assert.ok(c.mapDma({ iova: 8 * PG, vaddr: 0, size: PG, flags: RW }).ok);
    assert.deepEqual(c.mappings().map((m) => m.iova), [0, 4 * PG, 8 * PG]);
  });

  it("more mappings than dma_entry_limit is RESOURCE_EXHAUSTED", () => {
    const c = new IommuContainer({ dmaEntryLimit: 2 });
    assert.ok(c.mapDma({ iova: 0, vaddr: 0, size: PG, flags: RW }).ok);
    assert.ok(c.mapDma({ iova: PG, vaddr: 0, size: PG, flags: RW }).ok);
    fails(c.mapDma({ iova: 2 * PG, vaddr: 0, size: PG, flags: RW }), "RESOURCE_EXHAUSTED", "dma_entry_limit");
    assert.ok(c.unmapDma({ iova: 0, size: PG }).ok);
    assert.ok(c.mapDma({ iova: 2 * PG, vaddr: 0, size: PG, flags: RW }).ok);
  });

  it("rejects bad construction options", () => {
    assert.throws(() => new IommuContainer({ iovaPgsizes: 0 }), RangeError);
    assert.throws(() => new IommuContainer({ iovaPgsizes: 0x800 }), /minimum page 2\^11/);
    assert.throws(() => new IommuContainer({ iovaBits: 54 }), RangeError);
    assert.throws(() => new IommuContainer({ maxBitmapBytes: 1 }), RangeError);
    const c = new IommuContainer({ iovaPgsizes: 0x20_0000n, iovaBits: 40 });
    assert.equal(c.pageSize, 0x20_0000);
    fails(c.mapDma({ iova: 0, vaddr: 0, size: PG, flags: RW }), "INVALID_ARGUMENT", "2097152");
  });
});

describe("DMA_UNMAP checks (vfio_dma_do_unmap, type1 v2)", () => {
  function three(): IommuContainer {
    const c = new IommuContainer();
    for (let i = 0; i < 3; i++) assert.ok(c.mapDma({ iova: i * 4 * PG, vaddr: i * 4 * PG, size: 4 * PG, flags: RW }).ok);
    return c;
  }

  it("iova or size off the page, size zero and wraps are INVALID_ARGUMENT", () => {
    const c = three();
    fails(c.unmapDma({ iova: 1, size: PG }), "INVALID_ARGUMENT", "iova", "0x1");
    fails(c.unmapDma({ iova: 0, size: 0 }), "INVALID_ARGUMENT", "size", "0");
    fails(c.unmapDma({ iova: 0, size: 100 }), "INVALID_ARGUMENT", "size", "0x64");
    fails(c.unmapDma({ iova: (1n << 64n) - 4096n, size: 8192n }), "INVALID_ARGUMENT", "wraps");
    assert.equal(c.info().mappings, 3);
  });

  it("a range that splits a mapping at either end is INVALID_ARGUMENT and unmaps nothing", () => {
    const c = three();
    fails(c.unmapDma({ iova: PG, size: 3 * PG }), "INVALID_ARGUMENT", "split", "[0x0, 0x4000)");
    fails(c.unmapDma({ iova: 0, size: 6 * PG }), "INVALID_ARGUMENT", "split", "[0x4000, 0x8000)");
    assert.equal(c.info().mappings, 3);
  });

  it("unmaps every whole mapping in the range; an empty range unmaps 0 bytes", () => {
    const c = three();
    const u = c.unmapDma({ iova: 4 * PG, size: 8 * PG });
    assert.ok(u.ok);
    assert.equal(u.unmappedBytes, 8 * PG);
    assert.deepEqual(c.mappings().map((m) => m.iova), [0]);
    const none = c.unmapDma({ iova: 100 * PG, size: PG });
    assert.ok(none.ok && none.unmappedBytes === 0);
    const huge = c.unmapDma({ iova: 0, size: (1n << 64n) - 4096n });
    assert.ok(huge.ok && huge.unmappedBytes === 4 * PG);
    assert.equal(c.info().mappings, 0);
  });

  it("pinned pages are unpinned on unmap (the vendor driver's answer to the unmap notifier)", () => {
    const c = three();
    assert.ok(c.pinPages([PG, 2 * PG, 5 * PG]).ok);
    const u = c.unmapDma({ iova: 0, size: 4 * PG });
    assert.ok(u.ok && u.forcedUnpins === 2);
    assert.equal(c.info().pinnedPages, 1);
    fails(c.pinPages([PG]), "NOT_FOUND", "0x1000");
  });
});

describe("translation", () => {
  it("translates iova to guest-physical address and checks permission", () => {
    const c = new IommuContainer();
    assert.ok(c.mapDma({ iova: 0x10_0000, vaddr: 0x7000_0000, size: 2 * PG, flags: R }).ok);
    const t = c.translate(0x10_1234);
    assert.ok(t.ok && t.gpa === 0x7000_1234 && t.flags === R);
    fails(c.translate(0x10_2000), "NOT_FOUND", "0x102000");
    fails(c.translate(1n << 60n), "NOT_FOUND", "0x1000000000000000");
    fails(c.translate(0x10_0000, W), "PERMISSION_DENIED", "READ", "WRITE");
  });
});

describe("PIN_PAGES / UNPIN_PAGES (vfio_iommu_type1_pin_pages / _unpin_pages)", () => {
  function one(flags = RW): IommuContainer {
    const c = new IommuContainer();
    assert.ok(c.mapDma({ iova: 0x10_0000, vaddr: 0x20_0000, size: 16 * PG, flags }).ok);
    return c;
  }

  it("returns guest page frame numbers and counts references", () => {
    const c = one();
    const p = c.pinPages([0x10_0000, 0x10_3000, 0x10_3000]);
    assert.ok(p.ok);
    assert.deepEqual(p.guestPfns, [0x200, 0x203, 0x203]);
    assert.equal(c.info().pinnedPages, 2);
    assert.equal(c.mappings()[0]?.pinnedPages, 2);
    const u = c.unpinPages([0x10_3000]);
    assert.ok(u.ok && u.unpinned === 1);
    assert.equal(c.info().pinnedPages, 2, "one reference left");
    assert.ok(c.unpinPages([0x10_3000]).ok);
    assert.equal(c.info().pinnedPages, 1);
  });

  it("an empty list or more than VFIO_PIN_PAGES_MAX_ENTRIES is INVALID_ARGUMENT", () => {
    const c = one();
    fails(c.pinPages([]), "INVALID_ARGUMENT", "empty");
    fails(c.unpinPages([]), "INVALID_ARGUMENT", "empty");
    const many = Array.from({ length: VFIO_PIN_PAGES_MAX_ENTRIES + 1 }, () => 0x10_0000);
    const r = c.pinPages(many);
    fails(r, "INVALID_ARGUMENT", "513", "512");
    assert.ok(!r.ok && r.errno === "E2BIG");
    assert.ok(c.pinPages(many.slice(1)).ok, "512 is allowed");
  });

  it("a misaligned, unmapped or non-integer iova fails and pins nothing (pin_unwind)", () => {
    const c = one();
    fails(c.pinPages([0x10_0000, 0x10_0001]), "INVALID_ARGUMENT", "iovas[1]", "0x100001");
    fails(c.pinPages([0x10_0000, 0x11_0000]), "NOT_FOUND", "iovas[1]", "0x110000");
    fails(c.pinPages([0x10_0000, -1]), "INVALID_ARGUMENT", "iovas[1]", "-1");
    fails(c.pinPages([(1n << 64n) - 4096n]), "NOT_FOUND", "0xfffffffffffff000");
    assert.equal(c.info().pinnedPages, 0);
    fails(c.unpinPages([0x11_0000]), "NOT_FOUND", "iovas[0]");
  });

  it("pinning for WRITE through a read-only mapping is PERMISSION_DENIED; READ is fine", () => {
    const c = one(R);
    fails(c.pinPages([0x10_0000]), "PERMISSION_DENIED", "WRITE");
    assert.ok(c.pinPages([0x10_0000], R).ok);
    fails(c.pinPages([0x10_0000], 0), "INVALID_ARGUMENT", "prot");
  });

  it("unpinning a page that is not pinned is counted, not an error (vfio_unpin_page_external)", () => {
    const c = one();
    const u = c.unpinPages([0x10_0000, 0x10_1000]);
    assert.ok(u.ok && u.unpinned === 0 && u.notPinned === 2);
  });
});
