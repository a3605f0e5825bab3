// The guest kernel memory's completion mailboxes: order, wrap-around, the stop
// and drain rules, and that a vCPU halted on its mailbox is woken by a post.
import { test } from "node:test";
import assert from "node:assert/strict";
import { performance } from "node:perf_hooks";
import { Worker } from "node:worker_threads";
import { CTL_STOP, GuestKernel, MAILBOX_EMPTY, pollCompletion, postCompletion, resetMailboxes, takeCompletion } from "./kernel";

test("completions come out in order, across many wrap-arounds of the ring", () => {
  const k = new GuestKernel({ queueSize: 16, slots: 5, vcpus: 2 });
  assert.equal(k.mbCapacity, 6);
  let next = 0;
  for (let round = 0; round < 50; round++) {
    const n = 1 + (round % 5); // at most `slots` outstanding
    for (let i = 0; i < n; i++) postCompletion(k, 2, (next + i) % 5, (next + i) & 0xff);
    for (let i = 0; i < n; i++) {
      const c = pollCompletion(k, 2);
      assert.equal(c >>> 8, next % 5);
      assert.equal(c & 0xff, next & 0xff);
      next++;
    }
    assert.equal(pollCompletion(k, 2), MAILBOX_EMPTY);
    assert.equal(pollCompletion(k, 1), MAILBOX_EMPTY, "another vCPU's mailbox is untouched");
  }
});

test("an empty mailbox returns -1 once the run is stopped; a draining vCPU ignores the stop until its deadline", () => {
  const k = new GuestKernel({ queueSize: 16, slots: 8, vcpus: 1 });
  Atomics.store(k.ctl, CTL_STOP, 1);
  assert.equal(takeCompletion(k, 1), -1);
  postCompletion(k, 1, 3, 0);
  assert.equal(takeCompletion(k, 1) >>> 8, 3, "what is already posted still comes out");
  const t0 = performance.now();
  assert.equal(takeCompletion(k, 1, t0 + 30), -1);
  assert.ok(performance.now() >= t0 + 29);
  resetMailboxes(k);
  assert.equal(Atomics.load(k.ctl, CTL_STOP), 0);
});

test("a vCPU halted on its mailbox wakes for a completion posted from another thread", async () => {
  const k = new GuestKernel({ queueSize: 16, slots: 8, vcpus: 1 });
  const src = `
    const { workerData, parentPort } = require("node:worker_threads");
    require(${JSON.stringify(require.resolve("tsx/cjs"))});
    const { GuestKernel, takeCompletion } = require(${JSON.stringify(require.resolve("./kernel"))});
    const k = new GuestKernel(workerData.geom, workerData.sab);
    parentPort.postMessage("waiting");
    parentPort.postMessage(takeCompletion(k, 1));`;
  const w = new Worker(src, { eval: true, workerData: { geom: k.geom, sab: k.sab } });
  try {
    const got = await new Promise<number>((resolve, reject) => {
      w.on("message", (m: string | number) => {
        if (m === "waiting") setTimeout(() => postCompletion(k, 1, 7, 1), 50);
        else resolve(m as number);
      });
      w.on("error", reject);
    });
    assert.equal(got, (7 << 8) | 1);
  } finally {
    await w.terminate();
  }
});
