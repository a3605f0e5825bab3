// The addon inside worker threads: it is context-aware (loads once per
// environment), a worker can block in FUTEX_WAIT and be woken by the main
// thread, and terminating a worker with a parked waiter thread is clean.
// The workers use the addon directly (plain JS, no TypeScript loader).

import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { after, test } from "node:test";
import { Worker } from "node:worker_threads";
import { Doorbell, mapFile } from "./index";
import { tempShmDir } from "./test-support";

const dir = tempShmDir();
const ADDON = join(__dirname, "..", "build", "Release", "virtmesh_shm.node");
const workers: Worker[] = [];

after(async () => {
  await Promise.all(workers.map((w) => w.terminate()));
  rmSync(dir, { recursive: true, force: true });
});

// Doorbell words (see shm.ts): 2 = seq (futex word), 3 = sleepers.
const WORKER_SRC = `
const { parentPort, workerData } = require("node:worker_threads");
const addon = require(workerData.addon);
const m = new addon.Mapping(workerData.path, 4096, false, 0o600);
const w = new Int32Array(m.buffer(0, 4096));
const f = new addon.FutexWord(m, 8, () => parentPort.postMessage({ asyncWake: true }));
const ticket = Atomics.load(w, 2);
Atomics.add(w, 3, 1);
if (workerData.mode === "sync") {
  parentPort.postMessage({ sleeping: true });
  const status = f.waitSync(ticket, 20000);
  Atomics.sub(w, 3, 1);
  f.close();
  m.unmap();
  parentPort.postMessage({ status });
} else {
  f.arm(ticket);
  parentPort.postMessage({ sleeping: true });
}
`;

function startWorker(path: string, mode: "sync" | "park"): Worker {
  const w = new Worker(WORKER_SRC, { eval: true, workerData: { addon: ADDON, path, mode } });
  workers.push(w);
  return w;
}

function nextMessage(w: Worker): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    w.once("message", resolve);
    w.once("error", reject);
  });
}

test("a worker blocked in waitSync is woken by ring() on the main thread", async () => {
  const m = mapFile(join(dir, "sync"), 4096, { create: true });
  const db = Doorbell.attach(m, 0, true);
  const w = startWorker(join(dir, "sync"), "sync");
  assert.deepEqual(await nextMessage(w), { sleeping: true });
  const done = nextMessage(w);
  assert.equal(db.ring(), true);
  const { status } = await done;
  assert.ok(status === 0 || status === 2, `woken (0) or seq already moved (2), got ${String(status)}`);
  db.close();
  m.unmap();
});

test("terminating a worker whose waiter thread is parked is clean", async () => {
  const m = mapFile(join(dir, "park"), 4096, { create: true });
  const db = Doorbell.attach(m, 0, true);
  const w = startWorker(join(dir, "park"), "park");
  assert.deepEqual(await nextMessage(w), { sleeping: true });
  assert.equal(await w.terminate(), 1);
  // The worker's environment cleanup stopped its thread; this process goes on.
  assert.equal(db.ring(), true, "the worker left its sleeping mark (it died asleep)");
  db.close();
  m.unmap();
});
