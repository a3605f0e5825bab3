// Several threads drive one split virtqueue through DriverQueue objects over one
// shared state block, serialized by a lock (as a guest's vCPUs share
// struct vring_virtqueue under vq->lock): every buffer comes back exactly once,
// the free list ends whole, and a protocol violation seen by one thread stops
// the others.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import { join } from "node:path";
import { DeviceQueue, type QueueConfig } from "./device";
import { DeviceProtocolError, DriverQueue, driverStateBytes } from "./driver";
import { GuestMemory } from "./guest-memory";
import { splitQueueLayout } from "./layout";
import type { SharedDriverPeer } from "./shared-driver-worker";

const WORKER = join(__dirname, "shared-driver-worker.ts");
const boot = `require(${JSON.stringify(require.resolve("tsx/cjs"))}); require(${JSON.stringify(WORKER)});`;

function setup(size: number, eventIdx: boolean) {
  const mem = new SharedArrayBuffer(1 << 20);
  const gm = new GuestMemory(mem);
  const cfg: QueueConfig = { ...splitQueueLayout(size, 0), eventIdx, indirect: false };
  const state = new SharedArrayBuffer(driverStateBytes(size));
  const dq = new DriverQueue(gm, cfg, { sharedState: { buffer: state, byteOffset: 0, attach: false } });
  return { mem, gm, cfg, state, dq, device: new DeviceQueue(gm, cfg) };
}

for (const eventIdx of [false, true]) {
  test(`three threads share one driver queue under a lock (EVENT_IDX ${eventIdx ? "on" : "off"})`, async () => {
    const size = 16;
    const requests = 1000;
    const { mem, gm, cfg, state, dq, device } = setup(size, eventIdx);
    const ctl = new SharedArrayBuffer(16);
    const c = new Int32Array(ctl);
    const workers: Worker[] = [];
    const exited: Array<Promise<void>> = [];
    let stopping = false;
    let failed: Error | null = null;
    try {
      for (let id = 0; id < 3; id++) {
        const data: SharedDriverPeer = { mem, state, cfg, ctl, id, requests, dataAddr: 1 << 16 };
        const w = new Worker(boot, { eval: true, workerData: data });
        workers.push(w);
        exited.push(
          new Promise((resolve, reject) => {
            w.once("error", (e) => {
              failed = e;
              reject(e);
            });
            w.once("exit", (code) => (code === 0 || stopping ? resolve() : reject(new Error(`worker exited with ${code}`))));
          }),
        );
      }
      // The device side on this thread: each chain must be the one a worker built.
      const chain = device.newChain();
      let served = 0;
      const total = 3 * requests;
      const deadline = Date.now() + 60_000;
      while (served < total) {
        const r = device.pop(chain);
        if (failed) throw failed;
        if (r === null) {
          if (Date.now() > deadline) throw new Error(`device served ${served} of ${total}`);
          await new Promise((res) => setImmediate(res));
          continue;
        }
        assert.ok(!(r instanceof Error), `device saw a bad chain: ${r instanceof Error ? r.message : ""}`);
        assert.equal(chain.count, 2);
        device.addUsed(chain.head, 4);
        served++;
      }
      await Promise.all(exited);
      assert.equal(Atomics.load(c, 1), total, "every buffer taken back exactly once");
      assert.equal(dq.outstanding, 0);
      assert.equal(dq.numFree, size, "the shared free list is whole again");
      assert.equal(gm.vcpu.loadU16Atomic(cfg.availAddr + 2), total & 0xffff);
    } finally {
      stopping = true;
      await Promise.all(workers.map((w) => w.terminate()));
    }
  });
}

test("attaching needs a laid-out state block of the same queue size", () => {
  const { gm, cfg, state } = setup(16, false);
  assert.throws(() => new DriverQueue(gm, { ...cfg, ...splitQueueLayout(8, 0) }, { sharedState: { buffer: state, byteOffset: 0, attach: true } }), /no driver state for a queue of size 8/);
  const fresh = new SharedArrayBuffer(driverStateBytes(16));
  assert.throws(() => new DriverQueue(gm, cfg, { sharedState: { buffer: fresh, byteOffset: 0, attach: true } }), /no driver state/);
  assert.throws(() => new DriverQueue(gm, cfg, { sharedState: { buffer: fresh, byteOffset: 4, attach: false } }), /8-byte aligned/);
});

test("a used-ring violation seen through one queue object stops every object sharing the state", () => {
  const { gm, cfg, state, dq } = setup(16, false);
  const other = new DriverQueue(gm, cfg, { sharedState: { buffer: state, byteOffset: 0, attach: true } });
  const head = other.add([{ addr: 1 << 16, len: 16 }], [{ addr: (1 << 16) + 16, len: 4 }]);
  assert.equal(head, 0);
  assert.equal(dq.outstanding, 1, "state is shared");
  // A lying device: used entry for a head that is not outstanding.
  gm.device.writeU32(cfg.usedAddr + 4, 7);
  gm.device.writeU32(cfg.usedAddr + 8, 0);
  gm.device.storeU16Atomic(cfg.usedAddr + 2, 1);
  assert.throws(() => dq.popUsed(), /used id 7 is not an outstanding head/);
  assert.throws(() => other.add([{ addr: 1 << 16, len: 16 }], []), DeviceProtocolError);
  assert.ok(other.brokenReason instanceof DeviceProtocolError);
});
