// e2e: the guest balloon driver (services/guest-driver/src/balloon) in this
// process, over the VM's real virtqueues in MAP_SHARED guest memory, against the
// real balloon-host and shm-sidecar processes and a real nats-server. For each
// mode (PFN arrays, page bitmaps, (pfn, order) ranges): SetTarget -> the guest
// inflates to it, the memory file's allocated bytes fall, the host's bitmap and
// the NATS event say which pages; the workload's pages keep their data; SetTarget
// 0 -> the guest deflates and reuses the pages, allocated bytes rise again.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Registry } from "@virtmesh/nats";
import { status as Status, type ServiceError } from "@grpc/grpc-js";
import {
  PAGE_SIZE,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  VIRTIO_BALLOON_F_MUST_TELL_HOST,
  VIRTIO_BALLOON_F_PAGE_BITMAP,
  VIRTIO_BALLOON_F_REPORTING,
  VIRTIO_BALLOON_F_STATS_VQ,
  featureBit,
} from "@virtmesh/balloon";
import { balloon } from "@virtmesh/proto";
// The config page is the device's ABI, one module for both sides.
import * as hostCfg from "@virtmesh/balloon";
import * as guestCfg from "@virtmesh/balloon";
import { startGuestBalloon, type GuestBalloon } from "@virtmesh/svc-guest-driver/balloon";
import { run } from "./helpers";
import { BalloonStack, assertNear, bit, call, popcountBytes, touchRam, waitFor, type Guest } from "./balloon-harness";

const MIB = 1 << 20;
const MEM = 16 * MIB;
const stack = new BalloonStack("bt1");
const guests: GuestBalloon[] = [];

const BASE = featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST) + featureBit(VIRTIO_BALLOON_F_STATS_VQ) + featureBit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
const MODES = [
  { name: "pfn", vm: "vm-pfn", features: BASE, mode: balloon.BalloonMode.BALLOON_MODE_PFN },
  { name: "bitmap", vm: "vm-bitmap", features: BASE + featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP) + featureBit(VIRTIO_BALLOON_F_REPORTING), mode: balloon.BalloonMode.BALLOON_MODE_BITMAP },
  { name: "reporting", vm: "vm-report", features: BASE + featureBit(VIRTIO_BALLOON_F_REPORTING), mode: balloon.BalloonMode.BALLOON_MODE_REPORTING },
] as const;

before(async () => {
  await stack.start();
});

after(async () => {
  for (const g of guests) await g.stop();
  await stack.stop();
});

test("host and guest agree on the config page and queue layout", () => {
  assert.equal(hostCfg.BALLOON_DEVICE, guestCfg.BALLOON_DEVICE);
  assert.equal(hostCfg.BALLOON_CONFIG_DEVICE, guestCfg.BALLOON_CONFIG_DEVICE);
  assert.deepEqual(hostCfg.BALLOON_QUEUE_INDEX, guestCfg.BALLOON_QUEUE_INDEX);
  for (const k of ["CFG_NUM_PAGES", "CFG_ACTUAL", "CFG_GENERATION", "CFG_REFUSED", "CFG_ATTACHED", "CFG_FEATURES", "CONFIG_WORDS"] as const) assert.equal(hostCfg[k], guestCfg[k], k);
});

/** Workload: pages the guest uses, each filled with a pattern derived from its PFN. */
async function runWorkload(gb: GuestBalloon, pages: number): Promise<number[]> {
  const pfns: number[] = [];
  for (let i = 0; i < pages; i++) {
    const pfn = await gb.allocPages(0);
    assert.ok(pfn >= 0);
    pfns.push(pfn);
  }
  return pfns;
}
function fill(g: Guest, pfns: number[]): void {
  for (const pfn of pfns) g.memory.bytes.fill((pfn * 7 + 3) & 0xff, pfn * PAGE_SIZE, (pfn + 1) * PAGE_SIZE);
}
function check(g: Guest, pfns: number[]): void {
  for (const pfn of pfns) {
    const page = g.memory.bytes.subarray(pfn * PAGE_SIZE, (pfn + 1) * PAGE_SIZE);
    const want = (pfn * 7 + 3) & 0xff;
    assert.ok(page.every((b) => b === want), `workload page ${pfn} lost its data`);
  }
}

for (const m of MODES) {
  test(`${m.name} mode: inflate to the target releases memory, deflate gives it back, workload data survives`, async () => {
    const g = await stack.createGuest(m.vm, MEM);
    const gb = await startGuestBalloon({ client: stack.balloon, vm: m.vm, memory: g.memory, allocator: g.allocator, layout: g.layout, features: m.features, log: () => undefined });
    guests.push(gb);
    assert.equal(gb.features, m.features, "the device offers every feature the test asks for");

    const work = await runWorkload(gb, 300);
    fill(g, work);
    touchRam(g);
    const full = await stack.allocatedBytes(m.vm);
    assert.ok(full >= (g.ramPages - g.reservedPages) * PAGE_SIZE, `guest RAM resident: ${full}`);

    // Inflate: 12 MiB of the 16 MiB guest.
    const targetBytes = 12 * MIB;
    const set = await call(stack.balloon, stack.balloon.setTarget, { vm: m.vm, targetBytes });
    const target = targetBytes / PAGE_SIZE;
    assert.equal(set.targetPages, target);
    await waitFor("inflate to the target", async () => ((await stack.stats(m.vm)).actualPages === target ? true : undefined), 15_000);
    assert.equal(gb.numPages, target);

    const st = await stack.stats(m.vm);
    assert.equal(st.vm, m.vm);
    assert.equal(st.mode, m.mode);
    assert.equal(st.targetPages, target);
    assert.equal(st.refusedRequests, 0);
    // Really released: the memory file shrank by the balloon (give or take the
    // pages a stats/ring write touched meanwhile).
    const inflated = await stack.allocatedBytes(m.vm);
    assertNear(full - inflated, target * PAGE_SIZE, 64 * PAGE_SIZE, "bytes released by inflating");
    assert.equal(st.allocatedBytes, inflated);

    // Guest stats came through the stats queue.
    assert.equal(st.totalMemory, g.ramPages * PAGE_SIZE, "DEFLATE_ON_OOM: ballooned pages stay in totalram");
    assert.equal(st.freeMemory, g.allocator.freePages * PAGE_SIZE);

    // The host's bitmap: exactly the balloon's pages, none of the workload's.
    const bp = await stack.ballooned(m.vm);
    assert.equal(bp.pages, g.ramPages);
    assert.equal(bp.ballooned, target);
    assert.equal(popcountBytes(bp.bitmap), target);
    for (const pfn of work) assert.ok(!bit(bp.bitmap, pfn), `workload page ${pfn} was ballooned`);
    for (let p = 0; p < g.reservedPages; p++) assert.ok(!bit(bp.bitmap, p), `allocator metadata page ${p} was ballooned`);
    for (let p = 0; p < g.ramPages; p++) if (bit(bp.bitmap, p)) assert.ok(gb.driver.holds(p), `host says ${p} is ballooned, guest does not hold it`);
    check(g, work);

    // The same bitmap went out on NATS for the migration-manager.
    const ev = await waitFor("balloon event with the full balloon", () =>
      stack.events.find((e) => e.subject === `virtmesh.vm.${m.vm}.balloon` && e.body.ballooned === target),
    );
    assert.equal(ev.body.host, "bt1");
    assert.deepEqual(new Uint8Array(Buffer.from(ev.body.bitmap as string, "base64")), new Uint8Array(bp.bitmap));

    // Deflate back to 0; the guest reuses every page, allocated bytes rise again.
    await call(stack.balloon, stack.balloon.setTarget, { vm: m.vm, targetBytes: 0 });
    await waitFor("deflate to 0", async () => ((await stack.stats(m.vm)).actualPages === 0 ? true : undefined), 15_000);
    assert.equal((await stack.ballooned(m.vm)).ballooned, 0);
    await waitFor("empty-balloon event", () => stack.events.find((e) => e.subject === `virtmesh.vm.${m.vm}.balloon` && e.body.ballooned === 0 && e.body.event === "ballooned"));
    check(g, work);
    touchRam(g);
    const refilled = await stack.allocatedBytes(m.vm);
    assertNear(refilled, full, 64 * PAGE_SIZE, "allocated bytes after deflating and touching the pages again");
    assert.equal((await stack.stats(m.vm)).refusedRequests, 0);
  });
}

test("deflate on OOM: a guest allocation with no free page takes pages back from the balloon, telling the host first", async () => {
  const m = MODES[1];
  const gb = guests[1]!;
  // Balloon as much as the guest can give: the target is all of guest RAM.
  const st0 = await stack.stats(m.vm);
  const bp0 = await stack.ballooned(m.vm);
  await call(stack.balloon, stack.balloon.setTarget, { vm: m.vm, targetBytes: bp0.pages * PAGE_SIZE });
  await gb.settled();
  await waitFor("balloon holds every free page", async () => ((await stack.stats(m.vm)).actualPages === gb.numPages && gb.numPages > 0 ? true : undefined));
  const held = gb.numPages;
  assert.ok(held > st0.actualPages);
  assert.equal((await stack.ballooned(m.vm)).ballooned, held);

  const pfn = await gb.allocPages(0);
  assert.ok(pfn >= 0, "the allocation succeeded after deflating");
  // OOM_VBALLOON_DEFAULT_PAGES = 256 given back, the host told before the guest reused them.
  assert.equal(gb.numPages, held - 256);
  const bp = await stack.ballooned(m.vm);
  assert.equal(bp.ballooned, held - 256);
  assert.ok(!bit(bp.bitmap, pfn), "the page the guest got is no longer ballooned on the host");
  assert.equal((await stack.stats(m.vm)).actualPages, held - 256);

  await call(stack.balloon, stack.balloon.setTarget, { vm: m.vm, targetBytes: 0 });
  await waitFor("deflate to 0", async () => ((await stack.stats(m.vm)).actualPages === 0 ? true : undefined), 15_000);
});

test("free page reporting: free blocks are released on the host but stay the guest's (not ballooned)", async () => {
  const vm = MODES[2].vm;
  const gb = guests[2]!;
  const before = await stack.allocatedBytes(vm);
  const reported = await gb.reportFreePages();
  assert.ok(reported >= 512, `reported ${reported} pages`);
  const afterBytes = await stack.allocatedBytes(vm);
  assertNear(before - afterBytes, reported * PAGE_SIZE, 64 * PAGE_SIZE, "bytes released by reporting");
  assert.equal((await stack.ballooned(vm)).ballooned, 0);
  assert.equal((await stack.stats(vm)).refusedRequests, 0);
});

test("gRPC checks: unknown VM, bad names, a target larger than guest RAM", async () => {
  const rejects = async (p: Promise<unknown>, code: Status, re: RegExp) =>
    assert.rejects(p, (e: ServiceError) => {
      assert.equal(e.code, code, `${Status[e.code]}: ${e.details}`);
      assert.match(e.details, re);
      return true;
    });
  await rejects(call(stack.balloon, stack.balloon.setTarget, { vm: "nope", targetBytes: 0 }), Status.NOT_FOUND, /vm 'nope' has no balloon attached on host bt1/);
  await rejects(call(stack.balloon, stack.balloon.getStats, { vm: "../x" }), Status.INVALID_ARGUMENT, /vm '\.\.\/x' is not a valid name/);
  await rejects(call(stack.balloon, stack.balloon.setTarget, { vm: "vm-pfn", targetBytes: MEM }), Status.OUT_OF_RANGE, /exceeds vm vm-pfn's guest RAM of \d+ pages/);
  await rejects(call(stack.balloon, stack.balloon.attachVm, { vm: "ghost", driverFeatures: 0 }), Status.NOT_FOUND, /vm 'ghost' does not exist on host bt1/);
  await call(stack.sidecar, stack.sidecar.createVm, { incoming: false, vm: "plain", memoryBytes: MIB, queues: [] });
  await rejects(call(stack.balloon, stack.balloon.attachVm, { vm: "plain", driverFeatures: 0 }), Status.FAILED_PRECONDITION, /vm plain has no balloon device/);
});

test("virtmesh balloon set|stats (cli/src/balloon.ts) finds the VM's balloon-host through the state file and the registry", async () => {
  const vm = MODES[0].vm;
  // What the guest-driver and the launcher would have written.
  await (await Registry.open(stack.nc)).putVm({ vm, host: "bt1", state: "RUN_STATE_RUNNING" });
  const dir = mkdtempSync(join(tmpdir(), "virtmesh-balloon-cli-"));
  try {
    writeFileSync(join(dir, "state.json"), JSON.stringify({ nats: { url: stack.nats.url, pid: 0, managed: false } }));
    const cli = (args: string[], json = false) =>
      run(
        process.execPath,
        ["--require", "tsx/cjs", "-e", `require("./cli/src/balloon").balloon(${JSON.stringify({ "state-dir": dir, json })}, ${JSON.stringify(args)}).then((c) => process.exit(c), (e) => { process.stderr.write(e.name + ": " + e.message + "\\n"); process.exit(e.name === "UsageError" ? 2 : 1); })`],
        { ...process.env, NATS_URL: "" },
        60_000,
      );
    let r = await cli(["set", vm, "8M"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^vm-pfn on bt1: balloon target 2048 pages \(8\.0 MiB\); the guest reached it; guest memory file allocated /);
    r = await cli(["stats", vm], true);
    assert.equal(r.code, 0, r.stderr);
    const st = JSON.parse(r.stdout) as Record<string, unknown>;
    assert.equal(st.actualPages, 2048);
    assert.equal(st.targetPages, 2048);
    assert.equal(st.mode, "pfn");
    assert.equal(st.host, "bt1");
    r = await cli(["stats", vm]);
    assert.match(r.stdout, /^vm-pfn on bt1: balloon mode pfn\n {2}target {4}2048 pages \(8\.0 MiB\)\n {2}actual {4}2048 pages/);
    r = await cli(["set", vm, "0"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /balloon target 0 pages .*the guest reached it/);
    // Bad input: one line, no stack trace.
    r = await cli(["set", vm, "lots"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /^UsageError: size 'lots' is not a size/);
    r = await cli(["set", vm, "1G"]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^CliError: SetTarget\(vm-pfn, 1073741824\) on balloon-host@bt1: target_bytes 1073741824 \(262144 pages\) exceeds vm vm-pfn's guest RAM/);
    r = await cli(["stats", "vm-unknown"]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^CliError: vm 'vm-unknown' is not registered/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the sidecar's vm-destroyed detaches the balloon; a late event for a destroyed-and-recreated VM does not", async () => {
  const vm = "vm-cycle";
  const spec = { incoming: false, vm, memoryBytes: 4 * MIB, queues: guestCfg.balloonQueueSpecs(16) };
  await call(stack.sidecar, stack.sidecar.createVm, spec);
  await call(stack.balloon, stack.balloon.attachVm, { vm, driverFeatures: 0 });
  assert.equal((await stack.stats(vm)).vm, vm);
  await call(stack.sidecar, stack.sidecar.destroyVm, { vm });
  await waitFor("detach", async () =>
    stack.stats(vm).then(
      () => undefined,
      (e: ServiceError) => (e.code === Status.NOT_FOUND ? true : undefined),
    ),
  );
  // Reboot: destroy, create, attach back to back; the destroy's event may arrive after the attach.
  await call(stack.sidecar, stack.sidecar.createVm, spec);
  await call(stack.balloon, stack.balloon.attachVm, { vm, driverFeatures: 0 });
  await call(stack.sidecar, stack.sidecar.destroyVm, { vm });
  await call(stack.sidecar, stack.sidecar.createVm, spec);
  await call(stack.balloon, stack.balloon.attachVm, { vm, driverFeatures: 0 });
  const nEvents = stack.events.length;
  await new Promise((r) => setTimeout(r, 300));
  assert.equal((await stack.stats(vm)).vm, vm, "still attached after the old VM's vm-destroyed event");
  await call(stack.balloon, stack.balloon.setTarget, { vm, targetBytes: 4096 });
  await waitFor("target event", () => stack.events.slice(nEvents).find((e) => e.subject === `virtmesh.vm.${vm}.balloon` && e.body.event === "target"));
});

test("balloon-host killed with SIGKILL: the restarted one resumes the running guests' balloons from the config page", async () => {
  const m = MODES[1];
  const gb = guests[1]!;
  assert.equal(gb.numPages, 0);
  await stack.restartBalloonHost();
  // Nobody attaches again: the new device finds the VM through ListVms and the config page's marker.
  const st0 = await waitFor("resumed", () => stack.stats(m.vm).catch(() => undefined));
  assert.equal(st0.mode, m.mode);
  assert.ok(st0.totalMemory > 0, "the stats buffer the dead device held was popped again and decoded");
  await call(stack.balloon, stack.balloon.setTarget, { vm: m.vm, targetBytes: 4 * MIB });
  await waitFor("inflate after the restart", async () => ((await stack.stats(m.vm)).actualPages === 1024 ? true : undefined), 15_000);
  assert.equal(gb.numPages, 1024);
  assert.equal((await stack.ballooned(m.vm)).ballooned, 1024);
  await call(stack.balloon, stack.balloon.setTarget, { vm: m.vm, targetBytes: 0 });
  await waitFor("deflate after the restart", async () => ((await stack.stats(m.vm)).actualPages === 0 ? true : undefined), 15_000);
  assert.equal((await stack.ballooned(m.vm)).ballooned, 0);
});
