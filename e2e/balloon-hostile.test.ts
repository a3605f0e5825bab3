// e2e: a hostile guest against the real balloon-host. This process is the
// guest: it maps the VM's memory file, crafts bad balloon buffers in guest
// memory and pushes them through the real virtqueues (DriverQueue, or raw ring
// writes for broken descriptor chains) to the real balloon-host process. Every
// bad request must be refused and reported (config refused[] counter, GetStats,
// NATS balloon-refused event) and must change nothing: the memory file's
// allocated bytes, the ballooned bitmap and the guest's data stay as they were,
// even for the valid entries of a refused request; the device keeps serving.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import {
  PAGE_SIZE,
  VIRTIO_BALLOON_F_PAGE_BITMAP,
  VIRTIO_BALLOON_F_REPORTING,
  type BalloonQueue,
  encodePfnArray,
  featureBit,
  writeBmapHead,
  writeReportEntry,
  writeRespHdr,
} from "@virtmesh/balloon";
import { Doorbell } from "@virtmesh/shm";
import { DriverQueue } from "@virtmesh/virtqueue";
import { GuestBalloonConfig, BALLOON_QUEUE_INDEX } from "@virtmesh/svc-guest-driver/balloon";
import { BalloonStack, call, touchRam, waitFor, type Guest } from "./balloon-harness";

const MIB = 1 << 20;
const stack = new BalloonStack("bt2");
const doorbells: Doorbell[] = [];

interface RawGuest {
  g: Guest;
  config: GuestBalloonConfig;
  queues: Map<BalloonQueue, { q: DriverQueue; kick: Doorbell }>;
  bufAddr: number;
  victim: number[];
}

before(async () => {
  await stack.start();
});

after(async () => {
  for (const d of doorbells) d.close();
  await stack.stop();
});

async function rawGuest(vm: string, driverFeatures: number, names: BalloonQueue[]): Promise<RawGuest> {
  const g = await stack.createGuest(vm, 16 * MIB);
  const queues = new Map<BalloonQueue, { q: DriverQueue; kick: Doorbell }>();
  for (const name of names) {
    const r = g.layout.queues.find((x) => x.device === "balloon" && x.index === BALLOON_QUEUE_INDEX[name])!;
    const q = new DriverQueue(g.memory, { size: r.size, descAddr: r.descAddr, availAddr: r.availAddr, usedAddr: r.usedAddr });
    const kick = Doorbell.open(r.kickPath);
    doorbells.push(kick);
    queues.set(name, { q, kick });
  }
  const cfg = g.layout.queues.find((x) => x.device === "balloon-config")!;
  const att = await call(stack.balloon, stack.balloon.attachVm, { vm, driverFeatures });
  assert.equal(att.features, driverFeatures);
  assert.equal(att.configAddr, cfg.descAddr);
  touchRam(g);
  // Guest data the hostile requests name alongside bad entries.
  const victim = [256, 257, 300, 301, 320];
  for (const pfn of victim) g.memory.bytes.fill(pfn & 0xff, pfn * PAGE_SIZE, (pfn + 1) * PAGE_SIZE);
  return { g, config: new GuestBalloonConfig(g.memory.buffer, cfg.descAddr), queues, bufAddr: (g.reservedPages + 8) * PAGE_SIZE, victim };
}

/** Puts guest memory [bufAddr, +len) on a queue, kicks, waits until the device used it; true if it was refused. */
async function push(r: RawGuest, queue: BalloonQueue, len: number): Promise<boolean> {
  const { q, kick } = r.queues.get(queue)!;
  const before = r.config.refused(queue);
  const head = q.add([{ addr: r.bufAddr, len }], []);
  assert.ok(head >= 0);
  if (q.kickPrepare()) kick.ring();
  const used = await waitFor(`${queue} buffer used`, () => q.popUsed() ?? undefined);
  assert.equal(used.id, head);
  assert.equal(used.len, 0);
  return r.config.refused(queue) !== before;
}

const buf = (r: RawGuest, len: number) => r.g.memory.bytes.subarray(r.bufAddr, r.bufAddr + len);

/** Runs one hostile request and checks it was refused with `kind` and touched nothing. */
async function refused(r: RawGuest, queue: BalloonQueue, len: number, kind: RegExp): Promise<void> {
  const vm = r.g.vm;
  const allocBefore = await stack.allocatedBytes(vm);
  const bpBefore = await stack.ballooned(vm);
  const stBefore = await stack.stats(vm);
  const nEvents = stack.events.length;
  assert.equal(await push(r, queue, len), true, `the ${queue} request was not refused`);
  const st = await stack.stats(vm);
  assert.equal(st.refusedRequests, stBefore.refusedRequests + 1);
  const ev = await waitFor(`balloon-refused event for ${vm}`, () =>
    stack.events.slice(nEvents).find((e) => e.subject === `virtmesh.vm.${vm}.balloon-refused`),
  );
  assert.equal(ev.body.queue, queue);
  assert.match(String(ev.body.kind), kind);
  assert.equal(ev.body.host, "bt2");
  assert.equal(await stack.allocatedBytes(vm), allocBefore, "nothing was released");
  const bp = await stack.ballooned(vm);
  assert.equal(bp.ballooned, bpBefore.ballooned, "the ballooned bitmap did not change");
  assert.deepEqual(bp.bitmap, bpBefore.bitmap);
  for (const pfn of r.victim) {
    const page = r.g.memory.bytes.subarray(pfn * PAGE_SIZE, (pfn + 1) * PAGE_SIZE);
    assert.ok(page.every((b) => b === (pfn & 0xff)), `page ${pfn} lost its data`);
  }
}

let bm: RawGuest;
let pf: RawGuest;

test("page-bitmap mode: each bad entry refuses the whole request, nothing else is touched", async () => {
  bm = await rawGuest("evil-bmap", featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP) + featureBit(VIRTIO_BALLOON_F_REPORTING), ["inflate", "deflate", "reporting"]);
  const pages = bm.g.ramPages;
  let b = buf(bm, 64);

  // PFN beyond guest memory, after a valid head (which must not be applied either).
  writeBmapHead(b, 8, 256, 12, 0);
  writeBmapHead(b, 16, pages, 12, 0);
  writeRespHdr(b, 16);
  await refused(bm, "inflate", 24, /^pfn-beyond-memory$/);
  // ... and on the deflate queue.
  await refused(bm, "deflate", 24, /^pfn-beyond-memory$/);
  // A bitmap word whose bits run past the end of guest memory.
  writeBmapHead(b, 8, Math.floor(pages / 64) * 64, 12, 8);
  b.fill(0xff, 16, 24);
  writeRespHdr(b, 16);
  if (pages % 64 !== 0) await refused(bm, "inflate", 24, /^pfn-beyond-memory$/);

  // bmap_len past the buffer: a head claiming 16 bitmap bytes with 8 left.
  writeBmapHead(b, 8, 256, 12, 16);
  b.fill(0x0f, 16, 24);
  writeRespHdr(b, 16);
  await refused(bm, "inflate", 24, /^bmap-len-past-buffer$/);
  // resp_hdr.data_len past the buffer handed over.
  writeBmapHead(b, 8, 256, 12, 0);
  writeRespHdr(b, 4096);
  await refused(bm, "inflate", 16, /^bmap-len-past-buffer$/);

  // Bad page_shift: a bitmap head must use 12; a run head at least 12.
  writeBmapHead(b, 8, 256, 13, 8);
  b.fill(0x03, 16, 24);
  writeRespHdr(b, 16);
  await refused(bm, "inflate", 24, /^bad-page-shift$/);
  writeBmapHead(b, 8, 256, 11, 0);
  writeRespHdr(b, 8);
  await refused(bm, "inflate", 16, /^bad-page-shift$/);

  // Overlapping ranges: a 64-page run and a bitmap head naming one of its pages.
  writeBmapHead(b, 8, 256, 18, 0);
  writeBmapHead(b, 16, 256, 12, 8);
  b.fill(0, 24, 32);
  b[24] = 0x02;
  writeRespHdr(b, 24);
  await refused(bm, "inflate", 32, /^overlap$/);

  // Free page reporting ranges: overlap, order too big, misaligned, past memory, reserved bits.
  b = buf(bm, 64);
  writeReportEntry(b, 0, 256, 1);
  writeReportEntry(b, 1, 257, 0);
  await refused(bm, "reporting", 32, /^overlap$/);
  writeReportEntry(b, 0, 0, 11);
  await refused(bm, "reporting", 16, /^bad-order$/);
  writeReportEntry(b, 0, 257, 1);
  await refused(bm, "reporting", 16, /^misaligned-run$/);
  writeReportEntry(b, 0, 256, 0);
  writeReportEntry(b, 1, pages, 0);
  await refused(bm, "reporting", 32, /^pfn-beyond-memory$/);
  writeReportEntry(b, 0, 256, 0);
  b[12] = 1;
  await refused(bm, "reporting", 16, /^reserved-nonzero$/);

  // A stats buffer on a queue that was not negotiated never reaches the device:
  // the guest has no such queue. The config page reflects every refusal.
  assert.equal(bm.config.refused("inflate"), pages % 64 !== 0 ? 7 : 6);
  assert.equal(bm.config.refused("deflate"), 1);
  assert.equal(bm.config.refused("reporting"), 5);
});

test("page-bitmap mode: the device keeps serving the same guest after refusals", async () => {
  const vm = bm.g.vm;
  const allocBefore = await stack.allocatedBytes(vm);
  const b = buf(bm, 32);
  // 64 pages at 512 (a run) and pages 600+0..7 (a bitmap word).
  writeBmapHead(b, 8, 512, 18, 0);
  writeBmapHead(b, 16, 576, 12, 8);
  b.fill(0, 24, 32);
  b[27] = 0xff; // bits 24..31 -> PFNs 600..607
  writeRespHdr(b, 24);
  assert.equal(await push(bm, "inflate", 32), false);
  const bp = await stack.ballooned(vm);
  assert.equal(bp.ballooned, 72);
  assert.equal(allocBefore - (await stack.allocatedBytes(vm)), 72 * PAGE_SIZE);
  // Deflate them again.
  assert.equal(await push(bm, "deflate", 32), false);
  assert.equal((await stack.ballooned(vm)).ballooned, 0);
});

test("PFN-array mode: beyond memory, duplicates and odd lengths are refused; broken descriptor chains are discarded", async () => {
  pf = await rawGuest("evil-pfn", 0, ["inflate"]);
  const pages = pf.g.ramPages;
  const b = buf(pf, 1024);
  encodePfnArray(b, [300, 301, pages], 0, 3);
  await refused(pf, "inflate", 12, /^pfn-beyond-memory$/);
  encodePfnArray(b, [300, 0xffffffff], 0, 2);
  await refused(pf, "inflate", 8, /^pfn-beyond-memory$/);
  encodePfnArray(b, [300, 301, 300], 0, 3);
  await refused(pf, "inflate", 12, /^overlap$/);
  await refused(pf, "inflate", 6, /^bad-length$/);

  // The deflate queue, driven with raw ring writes (no DriverQueue): chains the walker refuses.
  const r = pf.g.layout.queues.find((x) => x.device === "balloon" && x.index === BALLOON_QUEUE_INDEX.deflate)!;
  const kick = Doorbell.open(r.kickPath);
  doorbells.push(kick);
  const mem = pf.g.memory;
  const u16 = (addr: number) => new Uint16Array(mem.buffer, mem.bytes.byteOffset + addr, 1);
  const writeDesc = (i: number, addr: number, len: number, flags: number, next: number) => {
    const d = r.descAddr + 16 * i;
    mem.vcpu.writeU32(d, addr % 0x1_0000_0000);
    mem.vcpu.writeU32(d + 4, Math.floor(addr / 0x1_0000_0000));
    mem.vcpu.writeU32(d + 8, len);
    mem.vcpu.writeU16(d + 12, flags);
    mem.vcpu.writeU16(d + 14, next);
  };
  let availIdx = 0;
  const rawPush = async (head: number, kind: RegExp, needsReset: boolean, idxStep = 1) => {
    const nEvents = stack.events.length;
    const allocBefore = await stack.allocatedBytes(pf.g.vm);
    const usedBefore = Atomics.load(u16(r.usedAddr + 2), 0);
    mem.vcpu.writeU16(r.availAddr + 4 + 2 * (availIdx % r.size), head);
    availIdx = (availIdx + idxStep) & 0xffff;
    Atomics.store(u16(r.availAddr + 2), 0, availIdx);
    kick.ring();
    const ev = await waitFor("balloon-refused event", () => stack.events.slice(nEvents).find((e) => e.subject === `virtmesh.vm.${pf.g.vm}.balloon-refused`));
    assert.equal(ev.body.queue, "deflate");
    assert.match(String(ev.body.kind), kind);
    assert.equal(ev.body.needsReset, needsReset);
    if (!needsReset) {
      // Discarded with len 0 (virtio 1.2 §2.7.8): the head comes back, the queue keeps serving.
      await waitFor("used entry", () => (Atomics.load(u16(r.usedAddr + 2), 0) !== usedBefore ? true : undefined));
      assert.equal(mem.vcpu.readU32(r.usedAddr + 4 + 8 * (usedBefore % r.size)), head);
      assert.equal(mem.vcpu.readU32(r.usedAddr + 8 + 8 * (usedBefore % r.size)), 0);
    }
    assert.equal(await stack.allocatedBytes(pf.g.vm), allocBefore);
  };
  writeDesc(0, pf.g.layout.memoryBytes + PAGE_SIZE, 8, 0, 0);
  await rawPush(0, /^ADDRESS_OUT_OF_RANGE$/, false);
  writeDesc(1, pf.bufAddr, 8, 1 /* NEXT */, 1);
  await rawPush(1, /^DESCRIPTOR_LOOP$/, false);
  writeDesc(2, pf.bufAddr, 8, 0, 0);
  // avail->idx moved by more than the queue size: the ring itself is corrupt, the queue needs a reset.
  await rawPush(2, /^AVAIL_IDX_OUT_OF_RANGE$/, true, r.size + 5);

  // The other queues of the same VM, and other VMs, are still served.
  const allocBefore = await stack.allocatedBytes(pf.g.vm);
  encodePfnArray(b, [300, 301], 0, 2);
  assert.equal(await push(pf, "inflate", 8), false);
  assert.equal((await stack.ballooned(pf.g.vm)).ballooned, 2);
  assert.equal(allocBefore - (await stack.allocatedBytes(pf.g.vm)), 2 * PAGE_SIZE);
  const st = await stack.stats(pf.g.vm);
  assert.equal(st.refusedRequests, 7);
  const bmb = buf(bm, 16);
  writeBmapHead(bmb, 8, 1024, 12 + 4, 0);
  writeRespHdr(bmb, 8);
  assert.equal(await push(bm, "inflate", 16), false);
  assert.equal((await stack.ballooned(bm.g.vm)).ballooned, 16);
});

test("AttachVm again (guest reboot) replaces the attachment with a fresh device", async () => {
  // Re-zero the rings (a rebooted guest's driver does), then attach again.
  // The deflate ring still holds the corrupt avail->idx from the previous test.
  for (const index of [0, 1]) {
    const r = pf.g.layout.queues.find((x) => x.device === "balloon" && x.index === index)!;
    const q = new DriverQueue(pf.g.memory, { size: r.size, descAddr: r.descAddr, availAddr: r.availAddr, usedAddr: r.usedAddr });
    if (index === 0) pf.queues.set("inflate", { q, kick: pf.queues.get("inflate")!.kick });
  }
  const att = await call(stack.balloon, stack.balloon.attachVm, { vm: pf.g.vm, driverFeatures: featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP) });
  assert.equal(att.features, featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP));
  const st = await stack.stats(pf.g.vm);
  assert.equal(st.refusedRequests, 0);
  assert.equal(st.targetPages, 0);
  const b = buf(pf, 16);
  writeBmapHead(b, 8, 2048, 12 + 3, 0);
  writeRespHdr(b, 8);
  assert.equal(await push(pf, "inflate", 16), false);
  assert.equal((await stack.ballooned(pf.g.vm)).ballooned, 8);
});
