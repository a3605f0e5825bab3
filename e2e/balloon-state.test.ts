// e2e: the balloon device's migration state and its persistence, against real
// nats-server, shm-sidecar and balloon-host processes (two hosts, bs1 and bs2),
// with the guest balloon driver (services/guest-driver/src/balloon) in this
// process over the VM's real virtqueues.
//  - inflate, SaveState (the device stops taking buffers), DetachVm, LoadState on
//    the same host: target, actual and bitmap preserved, the queues resume at the
//    saved indexes (the driver's next buffers and its held stats buffer work),
//    deflate and inflate work after the load; refused states change nothing;
//  - LoadState on a second host whose memory received every page (no skip of the
//    ballooned ones): the ballooned pages are punched out there too;
//  - balloon-host SIGKILLed: the restarted one knows the ballooned pages and target.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { status as Status, type ServiceError } from "@grpc/grpc-js";
import { PAGE_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_PAGE_BITMAP, VIRTIO_BALLOON_F_STATS_VQ, featureBit } from "@virtmesh/balloon";
import { balloon } from "@virtmesh/proto";
import { mapFile, type SharedMapping } from "@virtmesh/shm";
import { balloonQueueSpecs, startGuestBalloon, type GuestBalloon } from "@virtmesh/svc-guest-driver/balloon";
import { BalloonStack, assertNear, call, touchRam, waitFor, type Guest } from "./balloon-harness";

const MIB = 1 << 20;
const MEM = 16 * MIB;
const VM = "vm-mig";
const FEATURES = featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST) + featureBit(VIRTIO_BALLOON_F_STATS_VQ) + featureBit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) + featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP);
const src = new BalloonStack("bs1");
const dst = new BalloonStack("bs2");
let g: Guest;
let gb: GuestBalloon | undefined;
let saved: Buffer;
let savedBitmap: Uint8Array;
const mappings: SharedMapping[] = [];

before(async () => {
  await Promise.all([src.start(), dst.start()]);
});

after(async () => {
  await gb?.stop();
  for (const m of mappings) m.unmap();
  await Promise.allSettled([src.stop(), dst.stop()]);
});

async function rejects(p: Promise<unknown>, code: Status, re: RegExp): Promise<void> {
  await assert.rejects(p, (e: ServiceError) => {
    assert.equal(e.code, code, `${Status[e.code]}: ${e.details}`);
    assert.match(e.details, re);
    return true;
  });
}
const actual = async (s: BalloonStack, pages: number) => ((await s.stats(VM)).actualPages === pages ? true : undefined);

test("inflate, SaveState: the device stops taking buffers and returns its state", async () => {
  g = await src.createGuest(VM, MEM);
  gb = await startGuestBalloon({ client: src.balloon, vm: VM, memory: g.memory, allocator: g.allocator, layout: g.layout, features: FEATURES, log: () => undefined });
  touchRam(g);
  await call(src.balloon, src.balloon.setTarget, { vm: VM, targetBytes: 8 * MIB });
  await waitFor("inflate to 2048 pages", () => actual(src, 2048), 20_000);
  await gb.settled();
  savedBitmap = new Uint8Array((await src.ballooned(VM)).bitmap);
  const st = await call(src.balloon, src.balloon.saveState, { vm: VM });
  saved = Buffer.from(st.state);
  assert.ok(saved.length > 16 + Math.ceil(g.ramPages / 8));
  await rejects(call(src.balloon, src.balloon.setTarget, { vm: VM, targetBytes: 0 }), Status.FAILED_PRECONDITION, /saved for a migration/);
  // A second SaveState is the same state (nothing moved).
  assert.deepEqual(Buffer.from((await call(src.balloon, src.balloon.saveState, { vm: VM })).state), saved);
});

test("LoadState on a second host: bad version and checksum refused; the ballooned pages are released there too", async () => {
  // The destination's VM: the same queues, so the same layout.
  const layout = await call(dst.sidecar, dst.sidecar.createVm, { incoming: false, vm: VM, memoryBytes: MEM, queues: balloonQueueSpecs(64) });
  assert.deepEqual(
    layout.queues.map((q) => [q.device, q.index, q.descAddr, q.usedAddr]),
    g.layout.queues.map((q) => [q.device, q.index, q.descAddr, q.usedAddr]),
  );
  const bad = Buffer.from(saved);
  bad[4] = 99;
  await rejects(call(dst.balloon, dst.balloon.loadState, { vm: VM, state: bad }), Status.INVALID_ARGUMENT, /version 99 is not supported/);
  const flipped = Buffer.from(saved);
  flipped[saved.length - 10] = flipped[saved.length - 10]! ^ 0x40;
  await rejects(call(dst.balloon, dst.balloon.loadState, { vm: VM, state: flipped }), Status.INVALID_ARGUMENT, /checksum mismatch/);
  await rejects(call(dst.balloon, dst.balloon.loadState, { vm: VM, state: Buffer.alloc(3) }), Status.INVALID_ARGUMENT, /shorter than/);
  await rejects(dst.stats(VM), Status.NOT_FOUND, /no balloon attached/);

  // A migration that sent every page (skip_ballooned off): all of guest memory arrives, ballooned pages included.
  const m = mapFile(layout.memoryPath, layout.memoryBytes);
  mappings.push(m);
  // (Reading a ballooned page of the source would fault it back in there: those are written as garbage instead.)
  const to = new Uint8Array(m.buffer);
  for (let p = 0; p < MEM / PAGE_SIZE; p++) {
    if (p < g.ramPages && (savedBitmap[p >>> 3]! >>> (p & 7)) & 1) to.fill(0xa5, p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
    else to.set(g.memory.bytes.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE), p * PAGE_SIZE);
  }
  const full = await dst.allocatedBytes(VM);
  const res = await call(dst.balloon, dst.balloon.loadState, { vm: VM, state: saved });
  assert.equal(res.features, FEATURES);
  assert.equal(res.mode, balloon.BalloonMode.BALLOON_MODE_BITMAP);
  const st = await dst.stats(VM);
  assert.equal(st.targetPages, 2048);
  assert.equal(st.actualPages, 2048);
  const bp = await dst.ballooned(VM);
  assert.equal(bp.ballooned, 2048);
  assert.deepEqual(new Uint8Array(bp.bitmap), savedBitmap);
  assert.equal(full - (await dst.allocatedBytes(VM)), 2048 * PAGE_SIZE, "every ballooned page was punched out on the destination");
  let first = 0;
  while (!((savedBitmap[first >>> 3]! >>> (first & 7)) & 1)) first++;
  assert.equal(new Uint8Array(m.buffer)[first * PAGE_SIZE], 0, "a ballooned page reads as a hole");
  // The destination's device serves: a new target reaches its config page.
  await call(dst.balloon, dst.balloon.setTarget, { vm: VM, targetBytes: 4 * MIB });
  assert.equal((await dst.stats(VM)).targetPages, 1024);
  // Aborted migration on the destination: DetachVm drops it.
  assert.equal((await call(dst.balloon, dst.balloon.detachVm, { vm: VM })).vm, VM);
  await rejects(call(dst.balloon, dst.balloon.detachVm, { vm: VM }), Status.NOT_FOUND, /no balloon attached/);
});

test("DetachVm, then LoadState on the same host: target, actual and bitmap preserved; deflate and inflate work after the load", async () => {
  const before = await src.allocatedBytes(VM);
  assert.equal((await call(src.balloon, src.balloon.detachVm, { vm: VM })).vm, VM);
  await rejects(src.stats(VM), Status.NOT_FOUND, /no balloon attached/);
  await rejects(call(src.balloon, src.balloon.detachVm, { vm: VM }), Status.NOT_FOUND, /no balloon attached/);
  const res = await call(src.balloon, src.balloon.loadState, { vm: VM, state: saved });
  assert.equal(res.features, FEATURES);
  assert.equal(res.guestPages, g.ramPages);
  const st = await src.stats(VM);
  assert.equal(st.targetPages, 2048);
  assert.equal(st.actualPages, 2048);
  assert.deepEqual(new Uint8Array((await src.ballooned(VM)).bitmap), savedBitmap);
  assertNear(await src.allocatedBytes(VM), before, 16 * PAGE_SIZE, "allocated bytes across SaveState/LoadState");

  // Deflate: the driver's next buffers are popped at the saved indexes.
  await call(src.balloon, src.balloon.setTarget, { vm: VM, targetBytes: 0 });
  await waitFor("deflate to 0 after the load", () => actual(src, 0), 20_000);
  assert.equal(gb!.numPages, 0);
  assert.equal((await src.ballooned(VM)).ballooned, 0);
  // The stats buffer the saved device held was given back and refilled: fresh figures.
  await waitFor("fresh guest stats", async () => ((await src.stats(VM)).freeMemory === g.allocator.freePages * PAGE_SIZE ? true : undefined), 10_000);
  await call(src.balloon, src.balloon.setTarget, { vm: VM, targetBytes: 4 * MIB });
  await waitFor("inflate after the load", () => actual(src, 1024), 20_000);
  assert.equal((await src.ballooned(VM)).ballooned, 1024);
  assert.equal((await src.stats(VM)).refusedRequests, 0);
});

test("balloon-host SIGKILLed: the restarted one recovers the ballooned pages and the target from its state file", async () => {
  await gb!.settled();
  const bitmap = new Uint8Array((await src.ballooned(VM)).bitmap);
  await src.restartBalloonHost();
  const st = await waitFor("resumed", () => src.stats(VM).catch(() => undefined), 20_000);
  assert.equal(st.targetPages, 1024);
  assert.equal(st.actualPages, 1024);
  const bp = await src.ballooned(VM);
  assert.equal(bp.ballooned, 1024, "the bitmap survived the restart");
  assert.deepEqual(new Uint8Array(bp.bitmap), bitmap);
  await call(src.balloon, src.balloon.setTarget, { vm: VM, targetBytes: 0 });
  await waitFor("deflate after the restart", () => actual(src, 0), 20_000);
  assert.equal((await src.ballooned(VM)).ballooned, 0);
});
