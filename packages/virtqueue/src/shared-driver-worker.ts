// Test peer for shared-driver.test.ts: one "vCPU" thread driving a DriverQueue
// whose state another thread laid out, under a test-and-set lock.
import { parentPort, workerData } from "node:worker_threads";
import { DriverQueue } from "./driver";
import { GuestMemory } from "./guest-memory";
import type { QueueConfig } from "./device";

export interface SharedDriverPeer {
  mem: SharedArrayBuffer;
  state: SharedArrayBuffer;
  cfg: QueueConfig;
  /** Words: [0] lock, [1] buffers taken back from the used ring, [2] buffers added. */
  ctl: SharedArrayBuffer;
  id: number;
  requests: number;
  dataAddr: number;
}

const p = workerData as SharedDriverPeer;
const ctl = new Int32Array(p.ctl);
const mem = new GuestMemory(p.mem);
const dq = new DriverQueue(mem, p.cfg, { sharedState: { buffer: p.state, byteOffset: 0, attach: true } });
const lock = (): void => {
  // Spin a little, then back off: four threads on two cores must not starve the device thread.
  for (let n = 0; Atomics.compareExchange(ctl, 0, 0, 1) !== 0; n++) if (n > 64) Atomics.wait(ctl, 0, 1, 0.02);
};
const unlock = (): void => {
  Atomics.store(ctl, 0, 0);
};

const out = { addr: p.dataAddr + p.id * 64, len: 16 };
const inn = { addr: p.dataAddr + p.id * 64 + 16, len: 4 };
const readable = [out];
const writable = [inn];
let added = 0;
let reaped = 0;
while (added < p.requests) {
  lock();
  const head = dq.add(readable, writable);
  // Whoever holds the lock reaps whatever is used, as virtblk_done would on any vCPU.
  while (dq.popUsed() !== null) reaped++;
  unlock();
  if (head >= 0) added++;
}
Atomics.add(ctl, 2, added);
// Wait for the device to finish everything, reaping on the way.
for (;;) {
  lock();
  while (dq.popUsed() !== null) reaped++;
  const outstanding = dq.outstanding;
  unlock();
  Atomics.add(ctl, 1, reaped);
  reaped = 0;
  if (outstanding === 0 && Atomics.load(ctl, 2) === p.requests * 3) break;
}
parentPort!.postMessage("done");
