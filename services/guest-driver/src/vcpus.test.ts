// The guest's vCPU threads under the migration's controls, on real worker
// threads over a guest memory file: the dirtying walk (QEMU migration-test's
// pattern) and its vCPU dirty log, the throttle, pause, check_guests_ram, and
// save -> another GuestVcpus (another "process") -> restore -> resume.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { BlkRequest, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, parseBlkRequest, type BlkLimits } from "@virtmesh/virtio-blk";
import { DescriptorChain, DeviceQueue, DirtyLog, DriverQueue, GuestMemory, splitQueueLayout, type QueueConfig } from "@virtmesh/virtqueue";
import { mergeOutcome, newRunId, type FioParams } from "./fio";
import { GuestKernel } from "./kernel";
import { STRESS_PAGE } from "./stress";
import type { VcpuBoot } from "./vcpu-protocol";
import { GuestVcpus, WorkloadsMigratedError } from "./vcpus";

const MIB = 1 << 20;
const MEM = 16 * MIB;
const WS = { addr: 8 * MIB, bytes: MIB, vcpus: 2 }; // 256 pages, 128 per vCPU
const PAGES = WS.bytes / STRESS_PAGE;

interface Guest {
  dir: string;
  memMap: SharedMapping;
  logMap: SharedMapping;
  mem: GuestMemory;
  log: DirtyLog;
  kick: Doorbell;
  call: Doorbell;
  kernel: GuestKernel;
  boot: Omit<VcpuBoot, "cpu">;
  vcpus: GuestVcpus[];
}

let g: Guest;

function newVcpus(kernel: GuestKernel): GuestVcpus {
  const v = new GuestVcpus(kernel, { ...g.boot, kernelSab: kernel.sab }, () => g.call.ring());
  g.vcpus.push(v);
  return v;
}

before(() => {
  const dir = mkdtempSync(join("/dev/shm", "virtmesh-vcpus-test-"));
  const memoryPath = join(dir, "mem");
  const logPath = join(dir, "vcpu.log");
  const memMap = mapFile(memoryPath, MEM, { create: true });
  const logMap = mapFile(logPath, DirtyLog.byteLength(MEM), { create: true });
  const log = new DirtyLog(logMap.buffer, MEM);
  const mem = new GuestMemory(memMap.buffer, { size: MEM });
  const kick = Doorbell.create(join(dir, "kick"));
  const call = Doorbell.create(join(dir, "call"));
  const queue = { ...splitQueueLayout(16, 15 * MIB), eventIdx: true, indirect: false };
  const kernel = new GuestKernel({ queueSize: 16, slots: 4, vcpus: 2 });
  // The boot CPU lays out the queue's shared driver state; the vCPUs attach to it.
  new DriverQueue(mem, queue, { sharedState: { buffer: kernel.sab, byteOffset: kernel.driverStateOffset, attach: false } });
  const boot: Omit<VcpuBoot, "cpu"> = {
    kernelSab: kernel.sab,
    geom: kernel.geom,
    memoryPath,
    memoryBytes: MEM,
    kickPath: kick.path,
    callPath: call.path,
    queue,
    indirectArea: null,
    reqArea: MIB,
    dataBase: 4 * MIB,
    maxBs: 64 * 1024,
    slots: 4,
    diskBytes: MIB,
    completionRing: null,
    vcpuDirtyLogPath: logPath,
  };
  g = { dir, memMap, logMap, mem, log, kick, call, kernel, boot, vcpus: [] };
  // ... and vq->lock, which every vCPU attaches to when it boots.
  new GuestVcpus(kernel, boot, () => undefined).layOutLock({ kind: "queue", pv: false, unfair: false });
});

after(async () => {
  for (const v of g.vcpus) await v.close();
  g.kick.close();
  g.call.close();
  g.logMap.unmap();
  g.memMap.unmap();
  rmSync(g.dir, { recursive: true, force: true });
});

async function until(what: string, cond: () => boolean, ms = 20_000): Promise<void> {
  const deadline = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const firstBytes = (): number[] => Array.from({ length: PAGES }, (_, i) => g.mem.bytes[WS.addr + i * STRESS_PAGE]!);

let main: GuestVcpus;

test("the walk writes migration-test's pattern on every vCPU's part and logs each page in the vCPU dirty log", async () => {
  main = newVcpus(g.kernel);
  g.mem.bytes.fill(0xa5, WS.addr, WS.addr + WS.bytes); // whatever the allocator left there
  main.setDirtyLogging(true);
  await main.startStress({ ...WS, rateBytesPerS: 0 });
  assert.throws(() => main.setThrottle(100), RangeError);
  await assert.rejects(main.startStress({ ...WS, rateBytesPerS: 0 }), /already running/);
  await until("two passes", () => main.stressStatus().passes >= 2);
  await main.pause();
  const st = main.stressStatus();
  assert.equal(st.running, true);
  assert.equal(st.vcpus, 2);
  assert.ok(st.pagesWritten >= 2 * PAGES);
  assert.deepEqual(main.verifyStress(g.mem.bytes), { pagesChecked: PAGES, mismatches: 0, firstMismatch: "" });
  for (let p = 0; p < MEM / STRESS_PAGE; p++) {
    const inWs = p >= WS.addr / STRESS_PAGE && p < (WS.addr + WS.bytes) / STRESS_PAGE;
    assert.equal(g.log.isDirty(p), inWs, `page ${p} dirty iff in the working set`);
  }
  assert.equal(g.mem.bytes[WS.addr + 1], 0xa5, "only the first byte of a page is the walk's");

  // Logging off: the vCPUs write without logging (KVM_MEM_LOG_DIRTY_PAGES cleared).
  main.setDirtyLogging(false);
  g.log.clear();
  const before = st.pagesWritten;
  main.resume();
  await until("more pages", () => main.stressStatus().pagesWritten > before + PAGES);
  await main.pause();
  assert.equal(g.log.countDirty(), 0);
  main.setDirtyLogging(true);
  main.resume();
  await until("logged again", () => g.log.countDirty() > 0);
  assert.ok(main.stressStatus().dirtyRateBytesPerS >= 0);
});

test("pause parks every vCPU: no page changes until resume", async () => {
  await main.pause();
  const snap = firstBytes();
  const n = main.stressStatus().pagesWritten;
  await sleep(150);
  assert.deepEqual(firstBytes(), snap);
  assert.equal(main.stressStatus().pagesWritten, n);
  assert.equal(main.stressStatus().dirtyRateBytesPerS, 0);
  main.resume();
  await until("writes after resume", () => main.stressStatus().pagesWritten > n);
});

test("check_guests_ram finds a page that breaks the pattern", async () => {
  await main.pause();
  assert.equal(main.verifyStress(g.mem.bytes).mismatches, 0);
  const page = 100; // inside vCPU 1's part, not its first page
  const a = WS.addr + page * STRESS_PAGE;
  const was = g.mem.bytes[a]!;
  g.mem.bytes[a] = (was + 7) & 0xff;
  const r = main.verifyStress(g.mem.bytes);
  assert.equal(r.pagesChecked, PAGES);
  assert.ok(r.mismatches >= 1);
  assert.match(r.firstMismatch, new RegExp(`^page ${page}: ${(was + 7) & 0xff} after \\d+$`));
  g.mem.bytes[a] = was;
  assert.equal(main.verifyStress(g.mem.bytes).mismatches, 0);
  main.resume();
});

test("throttle: the vCPUs write fewer pages when they sleep most of each slice", async () => {
  const window = async (): Promise<number> => {
    const n0 = main.stressStatus().pagesWritten;
    await sleep(400);
    return main.stressStatus().pagesWritten - n0;
  };
  main.setThrottle(0);
  const free = await window();
  main.setThrottle(95);
  assert.equal(main.stressStatus().throttlePct, 95);
  await sleep(50);
  const throttled = await window();
  main.setThrottle(0);
  assert.ok(throttled < free, `throttled ${throttled} pages vs ${free} unthrottled`);
});

test("a paced walk is paced: far fewer pages than flat out", async () => {
  const s = await main.stopStress();
  assert.equal(s.running, false);
  // 256 KiB/s over 2 vCPUs: 64 pages/s; flat out writes orders of magnitude more.
  await main.startStress({ ...WS, rateBytesPerS: 256 * 1024 });
  const n0 = main.stressStatus().pagesWritten;
  await sleep(500);
  const n = main.stressStatus().pagesWritten - n0;
  assert.ok(n > 0 && n < 2000, `${n} pages in 0.5 s at 64 pages/s`);
  await main.stopStress();
  await main.startStress({ ...WS, rateBytesPerS: 0 });
});

test("save -> a new GuestVcpus over a copy of the kernel memory -> restore -> resume: the walk goes on and the pattern holds", async () => {
  await until("a pass", () => main.stressStatus().passes >= 1);
  main.setThrottle(30);
  await main.pause();
  await assert.rejects(main.restoreWorkloads(new Uint8Array([1])), /already runs workloads|not a saved/);
  const saved = await main.saveWorkloads();
  const at = main.stressStatus();
  assert.equal(main.verifyStress(g.mem.bytes).mismatches, 0);
  const snap = firstBytes();
  await main.dropWorkloads();

  // The destination: the kernel memory travels as raw bytes, guest memory is the same file here.
  const sab = new SharedArrayBuffer(g.kernel.sab.byteLength);
  new Uint8Array(sab).set(new Uint8Array(g.kernel.sab));
  const dst = newVcpus(new GuestKernel(g.kernel.geom, sab));
  dst.setDirtyLogging(true);
  await dst.restoreWorkloads(saved);
  assert.equal(dst.isPaused, true);
  const r = dst.stressStatus();
  assert.equal(r.running, true);
  assert.equal(r.pagesWritten, at.pagesWritten);
  assert.equal(r.passes, at.passes);
  assert.equal(r.throttlePct, 0, "throttling is the source's, not the destination's");
  assert.deepEqual([r.addr, r.bytes, r.vcpus], [WS.addr, WS.bytes, WS.vcpus]);
  await sleep(50);
  assert.deepEqual(firstBytes(), snap, "restored paused: nothing written before resume");
  // The source's vCPUs dropped the walk: resuming them writes nothing.
  main.resume();
  await sleep(50);
  assert.deepEqual(firstBytes(), snap);

  g.log.clear();
  dst.resume();
  await until("two more passes on the destination", () => dst.stressStatus().passes >= at.passes + 2);
  await dst.pause();
  assert.deepEqual(dst.verifyStress(g.mem.bytes), { pagesChecked: PAGES, mismatches: 0, firstMismatch: "" });
  assert.ok(g.log.countDirty() >= PAGES, "the destination's vCPUs log their writes");
  const end = await dst.stopStress();
  assert.equal(end.running, false);
  assert.ok(end.pagesWritten >= at.pagesWritten + 2 * PAGES);
});

/**
 * A virtio-blk device on this thread over a RAM disk, slow enough (one request
 * per turn of the event loop, after a short delay) that a fio run is still going
 * when the test pauses the vCPUs. It keeps serving while they are paused, as
 * GET_VRING_BASE completes what is in flight: those completions wait in the used ring.
 */
function ramDevice(mem: GuestMemory, queue: QueueConfig, diskBytes: number) {
  const dq = new DeviceQueue(mem, queue);
  const disk = new Uint8Array(diskBytes);
  const limits: BlkLimits = { features: 0n, capacityBytes: diskBytes, segMax: 4, maxDiscardSeg: 1, maxZeroesBytes: 0 };
  const chain = dq.newChain();
  const req = new BlkRequest(4, 1);
  let served = 0;
  let running = true;
  const loop = async (): Promise<void> => {
    while (running) {
      const c = dq.pop(chain);
      if (c === null || !(c instanceof DescriptorChain)) {
        assert.ok(c === null, "the guest's chains are well formed");
        await new Promise((r) => setTimeout(r, 1));
        continue;
      }
      const r = parseBlkRequest(c, mem.device, limits, req);
      assert.ok(r instanceof BlkRequest, r instanceof BlkRequest ? "" : r.message);
      let pos = r.sector * 512;
      for (let i = 0; i < r.segCount; i++) {
        const a = r.segAddr[i]!;
        const n = r.segLen[i]!;
        if (r.type === VIRTIO_BLK_T_OUT) disk.set(mem.bytes.subarray(a, a + n), pos);
        else if (r.type === VIRTIO_BLK_T_IN) mem.device.write(a, disk.subarray(pos, pos + n));
        pos += n;
      }
      mem.device.writeU8(r.statusAddr, VIRTIO_BLK_S_OK);
      dq.addUsed(r.head, r.usedLen);
      served++;
      g.call.ring();
      await new Promise((res) => setTimeout(res, 2));
    }
  };
  const done = loop();
  return {
    get served() {
      return served;
    },
    async stop() {
      running = false;
      await done;
    },
  };
}

test("a fio run with verify, paused mid-flight, saved, restored on another GuestVcpus: it finishes there with no verify errors", async () => {
  // A fresh queue (and guest kernel) for the run.
  const queue: QueueConfig = { ...splitQueueLayout(16, 14 * MIB), eventIdx: true, indirect: false };
  const kernel = new GuestKernel({ queueSize: 16, slots: 8, vcpus: 2 });
  new DriverQueue(g.mem, queue, { sharedState: { buffer: kernel.sab, byteOffset: kernel.driverStateOffset, attach: false } });
  const saveBoot = g.boot;
  g.boot = { ...g.boot, queue, geom: kernel.geom, slots: 8 };
  const dev = ramDevice(g.mem, queue, MIB);
  try {
    const src = newVcpus(kernel);
    const lock = { kind: "queue" as const, pv: false, unfair: false };
    src.layOutLock(lock);
    src.setDirtyLogging(true);
    g.log.clear();
    const p: FioParams = { rw: "write", bs: 4096, iodepth: 2, numjobs: 2, size: 128 * 1024, runtimeMs: 0, verify: "crc32c", rwmixRead: 0 };
    const running = src.run(p, lock, newRunId(), null, 0);
    const migrated = assert.rejects(running, WorkloadsMigratedError);
    await until("the run under way", () => dev.served >= 20);
    await src.pause();
    assert.equal(src.currentRun()?.info.params.rw, "write");
    // The vCPUs' guest writes are logged: verify patterns in the data buffers, request headers, the avail ring.
    for (const slot of [0, 2]) assert.ok(g.log.isDirty((g.boot.dataBase + slot * g.boot.maxBs) / STRESS_PAGE), `slot ${slot}'s write buffer`);
    assert.ok(g.log.isDirty(g.boot.reqArea / STRESS_PAGE), "request headers");
    assert.ok(g.log.isDirty(Math.floor(queue.availAddr / STRESS_PAGE)), "avail ring");
    await sleep(30); // in-flight requests complete into the used ring meanwhile
    const served = dev.served;
    const saved = await src.saveWorkloads();
    await src.dropWorkloads();
    await migrated;

    const sab = new SharedArrayBuffer(kernel.sab.byteLength);
    new Uint8Array(sab).set(new Uint8Array(kernel.sab));
    const dst = newVcpus(new GuestKernel(kernel.geom, sab));
    await dst.restoreWorkloads(saved);
    const run = dst.currentRun();
    assert.ok(run, "the fio run came along");
    assert.deepEqual(run.info.params, p);
    await sleep(30);
    assert.ok(dev.served - served <= 4, "the paused destination submits nothing");
    dst.resume();
    const { partials, elapsedMs } = await run.done;
    const r = mergeOutcome(partials, elapsedMs);
    assert.deepEqual(r.verifyFailures, []);
    assert.equal(r.verifyErrors, 0);
    assert.equal(r.writeIos, 64, "every block written once, across both sides");
    assert.equal(r.readIos, 64, "and read back by the verify phase");
    assert.equal(dst.currentRun(), null);
  } finally {
    await dev.stop();
    g.boot = saveBoot;
  }
});

test("warm vCPU threads (an incoming guest's) are adopted by the next GuestVcpus and run its workloads", async () => {
  GuestVcpus.warm(2);
  const v = newVcpus(g.kernel);
  g.mem.bytes.fill(0, WS.addr, WS.addr + WS.bytes);
  await v.startStress({ ...WS, rateBytesPerS: 0 });
  await until("a pass on warm vCPUs", () => v.stressStatus().passes >= 1);
  const s = await v.stopStress();
  assert.ok(s.pagesWritten >= PAGES);
  assert.equal(v.verifyStress(g.mem.bytes).mismatches, 0);
  await v.close();
  await GuestVcpus.coolDown();
});
