// Driver and device together in one process, through the loopback transport.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { BuddyAllocator, PAGE_SIZE } from "./buddy";
import { BalloonDevice, type BalloonQueue } from "./device";
import { BalloonDriver } from "./driver";
import { LoopbackTransport } from "./loopback";
import {
  BalloonConfigSpace,
  type BalloonMode,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  VIRTIO_BALLOON_F_MUST_TELL_HOST,
  VIRTIO_BALLOON_F_STATS_VQ,
  featureBit,
  featuresForMode,
} from "./wire";

const MODES: BalloonMode[] = ["pfn", "bitmap", "reporting"];

interface Vm {
  mem: Uint8Array;
  alloc: BuddyAllocator;
  dev: BalloonDevice;
  drv: BalloonDriver;
  config: BalloonConfigSpace;
  log: { queue: BalloonQueue; freePages: number; deflatedBefore: number }[];
}

function vm(mode: BalloonMode, pages: number, extra = featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST), reservedPages = 16): Vm {
  const mem = new Uint8Array(pages * PAGE_SIZE);
  const alloc = new BuddyAllocator(pages, { reservedPages });
  const config = new BalloonConfigSpace(new Uint8Array(BalloonConfigSpace.SIZE));
  const features = featuresForMode(mode, extra);
  // Releasing a page loses its contents, as a punched hole reads back zeros.
  const dev = new BalloonDevice({ guestPages: pages, features, config, release: (off, len) => mem.fill(0, off, off + len) });
  const log: Vm["log"] = [];
  const transport = new LoopbackTransport(dev, (queue) => void log.push({ queue, freePages: alloc.freePages, deflatedBefore: dev.counters.deflatedPages }));
  const drv = new BalloonDriver({ allocator: alloc, transport, features, config });
  return { mem, alloc, dev, drv, config, log };
}

function assertSameBalloon(v: Vm): void {
  assert.equal(v.dev.ballooned.count, v.drv.numPages);
  for (let p = 0; p < v.alloc.totalPages; p++) assert.equal(v.dev.ballooned.test(p), v.drv.holds(p), `pfn ${p}`);
}

for (const mode of MODES) {
  test(`${mode}: inflate to the config target and deflate back; host bitmap matches the guest's balloon`, async () => {
    const v = vm(mode, 8192);
    v.dev.setTarget(5000);
    await v.drv.update();
    assert.equal(v.drv.numPages, 5000);
    assert.equal(v.config.actual, 5000);
    assert.equal(v.alloc.freePages, 8192 - 16 - 5000);
    assert.equal(v.dev.counters.releasedBytes, 5000 * PAGE_SIZE);
    assertSameBalloon(v);
    v.dev.setTarget(1234);
    await v.drv.update();
    assert.equal(v.config.actual, 1234);
    assertSameBalloon(v);
    v.dev.setTarget(0);
    await v.drv.update();
    assert.equal(v.dev.ballooned.count, 0);
    assert.equal(v.alloc.freePages, 8192 - 16);
  });

  test(`${mode}: pages in use are never ballooned and keep their data`, async () => {
    const v = vm(mode, 4096);
    const used: number[] = [];
    for (let i = 0; i < 300; i++) {
      const order = i % 3;
      const pfn = v.alloc.alloc(order);
      for (let p = pfn; p < pfn + (1 << order); p++) {
        used.push(p);
        v.mem.fill((p % 251) + 1, p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      }
    }
    // Ask for more than is free: the driver stops when the allocator is empty.
    await v.drv.setTarget(4096);
    assert.equal(v.alloc.freePages, 0);
    assert.equal(v.drv.numPages, 4096 - 16 - used.length);
    for (const p of used) {
      assert.ok(!v.dev.ballooned.test(p), `in-use pfn ${p} ballooned`);
      assert.equal(v.mem[p * PAGE_SIZE], (p % 251) + 1);
      assert.equal(v.mem[(p + 1) * PAGE_SIZE - 1], (p % 251) + 1);
    }
    assertSameBalloon(v);
  });

  test(`${mode}: MUST_TELL_HOST: the host hears of a deflate before the pages are reused`, async () => {
    const v = vm(mode, 4096);
    await v.drv.setTarget(3000);
    const freeBefore = v.alloc.freePages;
    v.log.length = 0;
    await v.drv.setTarget(1000);
    const deflates = v.log.filter((e) => e.queue === "deflate");
    assert.ok(deflates.length > 0);
    // No page is back in the free lists before the host has been told about it.
    const deflatedAtStart = deflates[0]!.deflatedBefore;
    for (const e of deflates) assert.ok(e.freePages <= freeBefore + (e.deflatedBefore - deflatedAtStart), `${e.freePages} free, host told of ${e.deflatedBefore - deflatedAtStart}`);
    assert.equal(v.alloc.freePages, freeBefore + 2000);
  });
}

test("without MUST_TELL_HOST the guest may reuse pages before telling", async () => {
  const v = vm("bitmap", 4096, 0);
  await v.drv.setTarget(3000);
  const freeBefore = v.alloc.freePages;
  v.log.length = 0;
  await v.drv.setTarget(1000);
  assert.equal(v.log.filter((e) => e.queue === "deflate")[0]!.freePages, freeBefore + 2000);
});

test("deflate on OOM: a guest allocation that fails takes pages back from the balloon", async () => {
  const v = vm("pfn", 4096, featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST) + featureBit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM));
  await v.drv.setTarget(4096);
  assert.equal(v.alloc.freePages, 0);
  const before = v.drv.numPages;
  const pfn = await v.drv.allocPages(0);
  assert.ok(pfn >= 0);
  assert.equal(v.drv.numPages, before - 256, "OOM_VBALLOON_DEFAULT_PAGES given back");
  assert.equal(v.dev.ballooned.count, before - 256, "and the host was told");
  assert.ok(!v.dev.ballooned.test(pfn));
  assert.equal(v.alloc.freePages, 255);
});

test("no deflate on OOM unless negotiated", async () => {
  const v = vm("bitmap", 2048);
  await v.drv.setTarget(2048);
  assert.equal(await v.drv.allocPages(0), -1);
  assert.equal(v.drv.numPages, 2048 - 16);
});

test("stats queue: the device sees the guest's free/total/available and fault counters", async () => {
  const pages = 4096;
  const alloc = new BuddyAllocator(pages);
  const features = featuresForMode("bitmap", featureBit(VIRTIO_BALLOON_F_STATS_VQ));
  const dev = new BalloonDevice({ guestPages: pages, features, release: () => {} });
  const drv = new BalloonDriver({
    allocator: alloc,
    transport: new LoopbackTransport(dev),
    features,
    vmEvents: () => ({ swapIn: 1, swapOut: 2, majorFaults: 33, minorFaults: 4444, diskCaches: 8192 }),
  });
  await drv.setTarget(1000);
  await drv.sendStats();
  const s = dev.guestStats!;
  assert.equal(s.freeMemory, (pages - 1000) * PAGE_SIZE);
  assert.equal(s.totalMemory, (pages - 1000) * PAGE_SIZE);
  assert.equal(s.availableMemory, (pages - 1000) * PAGE_SIZE + 8192);
  assert.equal(s.majorFaults, 33);
  assert.equal(s.minorFaults, 4444);
});

test("free page reporting: free blocks are released on the host and stay the guest's", async () => {
  const v = vm("reporting", 8192);
  const held = v.alloc.alloc(0);
  v.mem.fill(7, held * PAGE_SIZE, (held + 1) * PAGE_SIZE);
  const free = v.alloc.freePages;
  const reported = await v.drv.reportFreePages(9);
  assert.ok(reported > 0);
  assert.equal(v.dev.counters.reportedPages, reported);
  assert.equal(v.dev.ballooned.count, 0, "reported pages are not ballooned");
  assert.equal(v.alloc.freePages, free, "all reported blocks went back to the free lists");
  assert.equal(v.mem[held * PAGE_SIZE], 7);
});

test("random inflate/deflate sequences keep guest and host in agreement (all modes)", async () => {
  await fc.assert(
    fc.asyncProperty(fc.constantFrom(...MODES), fc.array(fc.integer({ min: 0, max: 2048 }), { minLength: 1, maxLength: 6 }), async (mode, targets) => {
      const v = vm(mode, 2048, featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST), 5);
      for (const t of targets) {
        await v.drv.setTarget(t);
        assert.equal(v.drv.numPages, Math.min(t, 2048 - 5));
        assertSameBalloon(v);
        assert.equal(v.alloc.freePages + v.drv.numPages, 2048 - 5);
      }
    }),
    { numRuns: 40 },
  );
});
