import { test } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import { join } from "node:path";
import { DirtyLog, GuestMemory, DIRTY_PAGE_SIZE } from "./guest-memory";
import { harness } from "./test-util";
import { DescriptorChain } from "./device";

const P = DIRTY_PAGE_SIZE;

test("byteLength: one bit per 4 KiB page in whole 32-bit words", () => {
  assert.equal(DirtyLog.byteLength(P), 4);
  assert.equal(DirtyLog.byteLength(32 * P), 4);
  assert.equal(DirtyLog.byteLength(32 * P + 1), 8);
  assert.equal(DirtyLog.byteLength(1 << 30), (1 << 18) / 8);
});

test("markRange sets exactly the pages touched, across word boundaries", () => {
  const log = DirtyLog.create(256 * P);
  log.markRange(P - 1, 2); // pages 0 and 1
  log.markRange(31 * P, 3 * P); // pages 31..33 (crosses a word)
  log.markRange(40 * P, 100 * P); // pages 40..139 (whole words in the middle)
  log.markRange(200 * P + 5, 0); // nothing
  const want = new Set<number>([0, 1, 31, 32, 33]);
  for (let p = 40; p < 140; p++) want.add(p);
  for (let p = 0; p < 256; p++) assert.equal(log.isDirty(p), want.has(p), `page ${p}`);
  assert.equal(log.countDirty(), want.size);
});

test("fetchAndClear returns the bitmap and clears it; disabled log records nothing", () => {
  const log = DirtyLog.create(64 * P);
  log.markPage(3);
  log.markPage(35);
  const words = log.fetchAndClear();
  assert.deepEqual(Array.from(words), [1 << 3, 1 << 3]);
  assert.equal(log.countDirty(), 0);
  log.enabled = false;
  log.markRange(0, 64 * P);
  assert.equal(log.countDirty(), 0);
  const into = new Uint32Array(2);
  assert.equal(log.fetchAndClear(into), into);
  assert.throws(() => log.fetchAndClear(new Uint32Array(1)), RangeError);
  assert.throws(() => new DirtyLog(new ArrayBuffer(4), 64 * P), RangeError);
});

test("bit 31 (sign bit of the Int32 word) round-trips as unsigned", () => {
  const log = DirtyLog.create(32 * P);
  log.markPage(31);
  assert.equal(log.fetchAndClear()[0], 0x8000_0000);
});

test("vCPU writes go to the vCPU log, device writes to the device log", () => {
  const h = harness({ size: 8 });
  h.vcpuLog.enabled = true;
  h.deviceLog.enabled = true;
  const reqPage = h.dataAddr / P;
  const respPage = reqPage + 3;
  h.mem.vcpu.writeU32(h.dataAddr, 42);
  const head = h.driver.add([{ addr: h.dataAddr, len: 4 }], [{ addr: respPage * P + 10, len: 8 }]);
  const chain = h.device.newChain();
  const c = h.device.pop(chain) as DescriptorChain;
  assert.ok(c instanceof DescriptorChain);
  h.device.writeChain(c, new Uint8Array([1, 2, 3]));
  h.device.addUsed(head, 3);

  const usedPage = Math.floor(h.cfg.usedAddr / P);
  assert.equal(h.vcpuLog.isDirty(reqPage), true, "driver wrote the request");
  assert.equal(h.vcpuLog.isDirty(Math.floor(h.cfg.descAddr / P)), true, "driver wrote descriptors");
  assert.equal(h.vcpuLog.isDirty(respPage), false);
  assert.equal(h.deviceLog.isDirty(respPage), true, "device wrote the response");
  assert.equal(h.deviceLog.isDirty(usedPage), true, "device wrote the used ring");
  assert.equal(h.deviceLog.isDirty(reqPage), false, "device only read the request");
  // Reads never dirty anything.
  const before = h.deviceLog.countDirty();
  h.device.readChain(c, new Uint8Array(4));
  assert.equal(h.deviceLog.countDirty(), before);
});

test("logs can be attached later (VHOST_SET_LOG_BASE) and swapped", () => {
  const mem = new GuestMemory(new ArrayBuffer(16 * P));
  mem.device.writeU8(0, 1);
  const log = DirtyLog.create(16 * P);
  mem.device.dirtyLog = log;
  mem.device.writeU8(5 * P, 1);
  assert.deepEqual([log.isDirty(0), log.isDirty(5)], [false, true]);
});

test("concurrent markRange from two threads while harvesting loses no bit", async () => {
  const pages = 4096;
  const sab = new SharedArrayBuffer(DirtyLog.byteLength(pages * P));
  const log = new DirtyLog(sab, pages * P);
  // Workers do not inherit tsx's loader: register it in the worker first.
  const boot = `require("tsx/cjs"); require(${JSON.stringify(join(__dirname, "dirty-log-worker.ts"))});`;
  const workers = [0, 1].map((start) => new Worker(boot, { eval: true, workerData: { sab, pages, start, step: 2, rounds: 50 } }));
  const seen = new Uint8Array(pages);
  const into = new Uint32Array(log.words.length);
  const harvest = () => {
    log.fetchAndClear(into);
    for (let p = 0; p < pages; p++) if (into[p >>> 5]! & (1 << (p & 31))) seen[p] = 1;
  };
  let failure: unknown = null;
  const done = Promise.all(
    workers.map(
      (w) =>
        new Promise<void>((resolve) => {
          w.once("message", () => resolve());
          w.once("error", (e) => ((failure = e), resolve()));
          w.once("exit", () => resolve());
        }),
    ),
  );
  let finished = false;
  void done.then(() => (finished = true));
  while (!finished) {
    harvest();
    await new Promise((r) => setImmediate(r));
  }
  harvest();
  await Promise.all(workers.map((w) => w.terminate()));
  if (failure) throw failure;
  assert.equal(seen.reduce((a, b) => a + b, 0), pages);
});
