import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { status as Status } from "@grpc/grpc-js";
import { BuddyAllocator, PAGE_SIZE } from "@virtmesh/balloon";
import { GrpcError } from "@virtmesh/runtime";
import { grpcStatusCode, IommuContainer, VFIO_IOMMU_DIRTY_PAGES_FLAG_START, type IommuResult } from "@virtmesh/vfio";
import { checkDmaRequest, DEFAULT_WRITE_RATE, DMA_IOVA_BASE, DmaDevice, encodeDmaState, parseDmaState, type DmaIommu } from "./dma-device";
import { EnvelopeError } from "./migrate";

const MEM_PAGES = 4096; // 16 MiB guest
const MEM_BYTES = MEM_PAGES * PAGE_SIZE;

/** The shm-sidecar's handlers in miniature: the container, its refusals as gRPC statuses. */
function iommuOf(c: IommuContainer): DmaIommu & { calls: string[] } {
  const calls: string[] = [];
  const ok = <T extends object>(r: IommuResult<T>): T => {
    if (!r.ok) throw new GrpcError(grpcStatusCode(r), r.message);
    return r;
  };
  return {
    calls,
    dmaMap: async (r) => (calls.push("map"), ok(c.mapDma(r))),
    dmaUnmap: async (r) => (calls.push("unmap"), ok(c.unmapDma(r))),
    pinPages: async (r) => (calls.push(`pin ${r.iovas.length}`), ok(c.pinPages(r.iovas))),
    unpinPages: async (r) => (calls.push(`unpin ${r.iovas.length}`), ok(c.unpinPages(r.iovas))),
  };
}

function guest() {
  const mem = new Uint8Array(MEM_BYTES);
  const allocator = new BuddyAllocator(MEM_PAGES, { reservedPages: 16 });
  const container = new IommuContainer({ guestMemoryBytes: MEM_BYTES });
  return { mem, allocator, container, iommu: iommuOf(container) };
}

test("attach maps the region at the IOVA base, pins every page (in batches of 512) and detach gives it all back", async () => {
  const g = guest();
  const free = g.allocator.freePages;
  const d = await DmaDevice.attach({ vm: "vm1", iommu: g.iommu, mem: g.mem, allocator: g.allocator, regionBytes: 600 * PAGE_SIZE, writeRateBytesPerS: DEFAULT_WRITE_RATE });
  assert.deepEqual(g.iommu.calls, ["map", "pin 512", "pin 88"]);
  assert.equal(g.allocator.freePages, free - 600);
  const info = g.container.info();
  assert.equal(info.mappings, 1);
  assert.equal(info.pinnedPages, 600);
  const [m] = g.container.mappings();
  assert.deepEqual({ iova: m!.iova, vaddr: m!.vaddr, size: m!.size, flags: m!.flags }, { iova: DMA_IOVA_BASE, vaddr: d.guestAddr, size: 600 * PAGE_SIZE, flags: 3 });
  const s = d.status();
  assert.deepEqual(s, { attached: true, iova: DMA_IOVA_BASE, guestAddr: d.guestAddr, regionBytes: 600 * PAGE_SIZE, pinnedPages: 600, dmaWrites: 0 });
  await d.detach(g.allocator);
  assert.equal(g.allocator.freePages, free);
  assert.equal(g.container.info().mappings, 0);
  assert.equal(g.container.info().pinnedPages, 0);
});

test("the device's writes reach guest memory but no dirty log: only the pinned-page report sees them (seed 004)", async () => {
  const g = guest();
  const d = await DmaDevice.attach({ vm: "vm1", iommu: g.iommu, mem: g.mem, allocator: g.allocator, regionBytes: 8 * PAGE_SIZE, writeRateBytesPerS: DEFAULT_WRITE_RATE });
  const dirty = g.container.dirtyPages({ argsz: 8, flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_START });
  assert.ok(dirty.ok);
  d.dmaWrite(11);
  assert.equal(d.dmaWrites, 11);
  const view = new DataView(g.mem.buffer);
  assert.equal(view.getUint32(d.guestAddr, true), 9, "page 0 holds write 9 (writes 1 and 9 went there)");
  assert.equal(view.getUint32(d.guestAddr + 2 * PAGE_SIZE, true), 11);
  assert.equal(view.getUint32(d.guestAddr + 3 * PAGE_SIZE, true), 4);
  assert.equal(view.getUint32(d.guestAddr + 7 * PAGE_SIZE, true), 8);
  assert.deepEqual(d.verify(), { pagesChecked: 8, mismatches: 0, firstMismatch: "" });
  // Nothing marked: the unpinned/DMA-written report is empty, the seed's GET_BITMAP has every pinned page.
  const unpinned = g.container.getBitmap({ iova: DMA_IOVA_BASE, size: 8 * PAGE_SIZE, report: "unpinned" });
  assert.ok(unpinned.ok);
  assert.equal(unpinned.dirty, 0);
  const all = g.container.getBitmap({ iova: DMA_IOVA_BASE, size: 8 * PAGE_SIZE, report: "all" });
  assert.ok(all.ok);
  assert.equal(all.dirty, 8);
  // A page changed behind the device's back is caught.
  view.setUint32(d.guestAddr + 2 * PAGE_SIZE, 0, true);
  const bad = d.verify();
  assert.equal(bad.mismatches, 1);
  assert.match(bad.firstMismatch, /page 2 .* holds 0, the device's last write there was 11/);
  await d.detach(g.allocator);
});

test("the timer writes while started and not after pause", async () => {
  const g = guest();
  const d = await DmaDevice.attach({ vm: "vm1", iommu: g.iommu, mem: g.mem, allocator: g.allocator, regionBytes: 4 * PAGE_SIZE, writeRateBytesPerS: 64 * 1024 * 1024 });
  try {
    d.start();
    assert.equal(d.running, true);
    const deadline = Date.now() + 20_000;
    while (d.dmaWrites === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.ok(d.dmaWrites > 0, "the device wrote");
    d.pause();
    const n = d.dmaWrites;
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(d.dmaWrites, n, "a paused device writes nothing");
    assert.equal(d.verify().mismatches, 0);
  } finally {
    await d.detach(g.allocator);
  }
});

test("save on one host, load on another: the same region mapped and pinned there, the counter goes on", async () => {
  const src = guest();
  const d = await DmaDevice.attach({ vm: "vm1", iommu: src.iommu, mem: src.mem, allocator: src.allocator, regionBytes: 16 * PAGE_SIZE, writeRateBytesPerS: 2 * DEFAULT_WRITE_RATE });
  d.dmaWrite(37);
  const saved = encodeDmaState(d.save());
  // Guest memory travels with the migration; the destination's container starts empty.
  const dst = { mem: new Uint8Array(src.mem), container: new IommuContainer({ guestMemoryBytes: MEM_BYTES }) };
  const dstIommu = iommuOf(dst.container);
  const e = await DmaDevice.load("vm1", dstIommu, dst.mem, saved);
  assert.deepEqual(e.status(), d.status());
  assert.equal(e.writeRateBytesPerS, 2 * DEFAULT_WRITE_RATE);
  assert.equal(e.running, false, "paused until Resume");
  assert.equal(dst.container.info().pinnedPages, 16);
  assert.equal(dst.container.mappings()[0]!.vaddr, d.guestAddr);
  assert.equal(e.verify().mismatches, 0);
  e.dmaWrite(5);
  assert.equal(e.dmaWrites, 42);
  assert.equal(e.verify().mismatches, 0);
  // The source lets go of its pins and mapping, keeping the pages (the VM's memory leaves with it).
  const free = src.allocator.freePages;
  await d.release();
  assert.equal(src.container.info().mappings, 0);
  assert.equal(src.allocator.freePages, free);
  await e.release();
  assert.equal(dst.container.info().pinnedPages, 0);
});

test("a load that cannot pin leaves no mapping behind", async () => {
  const src = guest();
  const d = await DmaDevice.attach({ vm: "vm1", iommu: src.iommu, mem: src.mem, allocator: src.allocator, regionBytes: 4 * PAGE_SIZE, writeRateBytesPerS: DEFAULT_WRITE_RATE });
  const saved = encodeDmaState(d.save());
  const c = new IommuContainer({ guestMemoryBytes: MEM_BYTES });
  const broken: DmaIommu = { ...iommuOf(c), pinPages: async () => Promise.reject(Object.assign(new Error("x"), { code: Status.UNAVAILABLE, details: "sidecar gone" })) };
  await assert.rejects(DmaDevice.load("vm1", broken, new Uint8Array(MEM_BYTES), saved), (e: GrpcError) => e.code === Status.UNAVAILABLE && /PinPages: sidecar gone/.test(e.message));
  assert.equal(c.info().mappings, 0);
  await d.release();
});

test("attach refusals: a mapping already at the IOVA (ALREADY_EXISTS), no contiguous room (RESOURCE_EXHAUSTED); nothing kept", async () => {
  const g = guest();
  const free = g.allocator.freePages;
  assert.ok(g.container.mapDma({ iova: DMA_IOVA_BASE, vaddr: 0, size: PAGE_SIZE, flags: 3 }).ok);
  await assert.rejects(
    DmaDevice.attach({ vm: "vm1", iommu: g.iommu, mem: g.mem, allocator: g.allocator, regionBytes: 4 * PAGE_SIZE, writeRateBytesPerS: DEFAULT_WRITE_RATE }),
    (e: GrpcError) => e.code === Status.ALREADY_EXISTS && /^DmaMap/.test(e.message),
  );
  assert.equal(g.allocator.freePages, free);
  await assert.rejects(
    DmaDevice.attach({ vm: "vm1", iommu: g.iommu, mem: g.mem, allocator: g.allocator, regionBytes: MEM_BYTES, writeRateBytesPerS: DEFAULT_WRITE_RATE }),
    (e: GrpcError) => e.code === Status.RESOURCE_EXHAUSTED,
  );
  assert.equal(g.allocator.freePages, free);
});

test("SetDmaDevice arguments: multiple of 4096, inside guest RAM, a sane rate", () => {
  assert.equal(checkDmaRequest({ regionBytes: 4096, writeRateBytesPerS: 0 }, MEM_BYTES), DEFAULT_WRITE_RATE);
  assert.equal(checkDmaRequest({ regionBytes: 8192, writeRateBytesPerS: 5000 }, MEM_BYTES), 5000);
  const code = (f: () => unknown) => {
    try {
      f();
    } catch (e) {
      return (e as GrpcError).code;
    }
    return Status.OK;
  };
  assert.equal(code(() => checkDmaRequest({ regionBytes: 4095, writeRateBytesPerS: 0 }, MEM_BYTES)), Status.INVALID_ARGUMENT);
  assert.equal(code(() => checkDmaRequest({ regionBytes: 2 * MEM_BYTES, writeRateBytesPerS: 0 }, MEM_BYTES)), Status.OUT_OF_RANGE);
  assert.equal(code(() => checkDmaRequest({ regionBytes: 4096, writeRateBytesPerS: 2 ** 40 }, MEM_BYTES)), Status.INVALID_ARGUMENT);
});

test("a saved state the destination cannot use is refused as an envelope error", () => {
  const good = { version: 1, iova: DMA_IOVA_BASE, guestAddr: 64 * PAGE_SIZE, regionBytes: 4 * PAGE_SIZE, writeRateBytesPerS: 1, pinnedPages: 4, dmaWrites: 0, region: { pfn: 64, pages: 4, blocks: [[64, 2]] } };
  const enc = (v: unknown) => new Uint8Array(Buffer.from(JSON.stringify(v)));
  assert.equal(parseDmaState(enc(good), MEM_BYTES).guestAddr, 64 * PAGE_SIZE);
  assert.throws(() => parseDmaState(enc({ ...good, version: 2 }), MEM_BYTES), EnvelopeError);
  assert.throws(() => parseDmaState(enc({ ...good, guestAddr: 65 * PAGE_SIZE }), MEM_BYTES), EnvelopeError);
  assert.throws(() => parseDmaState(enc(good), 66 * PAGE_SIZE), EnvelopeError, "region past guest memory");
  assert.throws(() => parseDmaState(new Uint8Array([0x7b]), MEM_BYTES), EnvelopeError);
});

test("property: after any bursts of writes each page holds the device's last write there", async () => {
  // A container that accepts everything (PinPages answers the region's own pfns).
  const stub = (pfn: number): DmaIommu => ({
    dmaMap: async () => ({}),
    dmaUnmap: async () => ({ unmappedBytes: 0 }),
    pinPages: async (r) => ({ guestPfns: r.iovas.map((_, i) => pfn + i) }),
    unpinPages: async (r) => ({ unpinned: r.iovas.length }),
  });
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 1, max: 40 }), fc.array(fc.integer({ min: 0, max: 100 }), { maxLength: 8 }), async (pages, bursts) => {
      const mem = new Uint8Array(64 * PAGE_SIZE);
      const state = { version: 1, iova: 0, guestAddr: 8 * PAGE_SIZE, regionBytes: pages * PAGE_SIZE, writeRateBytesPerS: 1, pinnedPages: pages, dmaWrites: 0, region: { pfn: 8, pages, blocks: [] } };
      const d = await DmaDevice.load("vm1", stub(8), mem, encodeDmaState(state));
      const view = new DataView(mem.buffer);
      const last = new Array<number>(pages).fill(0);
      let k = 0;
      for (const b of bursts) {
        d.dmaWrite(b);
        for (let i = 0; i < b; i++) last[k++ % pages] = k;
        assert.equal(d.verify().mismatches, 0);
      }
      for (let i = 0; i < pages; i++) assert.equal(view.getUint32(d.guestAddr + i * PAGE_SIZE, true), last[i]);
      assert.equal(view.getUint32(0, true) + view.getUint32(d.guestAddr + pages * PAGE_SIZE, true), 0, "nothing outside the region");
      await d.release();
    }),
  );
});
