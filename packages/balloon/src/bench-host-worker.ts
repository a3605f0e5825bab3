// Worker entry of ThreadHandoff (see bench-host.ts).
import { parentPort, workerData } from "node:worker_threads";
import { mapFile } from "@virtmesh/shm";
import { BalloonDevice } from "./device";
import {
  CTL_ACK,
  CTL_ERRLEN,
  CTL_KICK,
  CTL_LEN,
  CTL_QUEUE,
  CTL_RESULT,
  CTL_STOP,
  HANDOFF_QUEUES,
  type HostWorkerData,
  STAT_BALLOONED,
  STAT_RELEASE_CALLS,
  STAT_RELEASE_MS,
  STAT_TRANSLATE_MS,
} from "./bench-host";
import { PAGE_BITMAP_BUFFER_SIZE } from "./wire";

const d = workerData as HostWorkerData;
const ctl = new Int32Array(d.ctl, 0, 16);
const stats = new Float64Array(d.ctl, 64, 8);
const errBytes = new Uint8Array(d.ctl, 128, 4096);
const mem = mapFile(d.path, d.size);
const buf = new Uint8Array(mem.view(0, d.reservedBytes), d.bufOffset, PAGE_BITMAP_BUFFER_SIZE);
const device = new BalloonDevice({ guestPages: d.guestPages, features: d.features, coalescePfn: d.coalescePfn, release: (o, l) => mem.releaseRange(o, l) });

parentPort!.postMessage("ready");
let seen = 0;
for (;;) {
  Atomics.wait(ctl, CTL_KICK, seen);
  seen = Atomics.load(ctl, CTL_KICK);
  if (Atomics.load(ctl, CTL_STOP) === 1) break;
  const err = device.handle(HANDOFF_QUEUES[ctl[CTL_QUEUE]!]!, buf, ctl[CTL_LEN]!);
  if (err) {
    const json = new TextEncoder().encode(JSON.stringify(err)).subarray(0, errBytes.length);
    errBytes.set(json);
    ctl[CTL_ERRLEN] = json.length;
  }
  ctl[CTL_RESULT] = err ? 1 : 0;
  stats[STAT_TRANSLATE_MS] = device.counters.translateMs;
  stats[STAT_RELEASE_MS] = device.counters.releaseMs;
  stats[STAT_RELEASE_CALLS] = device.counters.releaseCalls;
  stats[STAT_BALLOONED] = device.ballooned.count;
  Atomics.add(ctl, CTL_ACK, 1);
  Atomics.notify(ctl, CTL_ACK, 1);
}
mem.unmap();
