// A guest vCPU as a worker thread: takes the guest's lock and bumps a shared
// counter with a plain (non-atomic) read-modify-write, so a lock that lets two
// vCPUs in at once loses increments. Idle between runs; each run message
// names the lock flavour, so one set of threads serves a whole benchmark.
import { readlinkSync } from "node:fs";
import { parentPort, workerData } from "node:worker_threads";
import { LockSpace } from "./lockspace";
import { lockFromSpace } from "./guest-lock";
import type { VcpuMessage, VcpuRunParams, VcpuWorkerData } from "./workload-protocol";
import * as Protocol from "./workload-protocol";
const { CTL } = Protocol;

const d = workerData as VcpuWorkerData;
const ctl = new Int32Array(d.sab, d.ctlByteOffset, CTL.WORDS);
const ctlF64 = new Float64Array(d.sab, d.ctlByteOffset, 8);
const cpu = d.cpu;
const port = parentPort!;

function gateHook(point: number, c: number): void {
  const base = CTL.HOOKS + point * CTL.HOOK_STRIDE;
  if (Atomics.load(ctl, base) !== c + 1) return;
  Atomics.store(ctl, base, 0); // one-shot
  Atomics.store(ctl, base + 1, 1);
  Atomics.notify(ctl, base + 1);
  while (Atomics.load(ctl, base + 2) === 0) Atomics.wait(ctl, base + 2, 0, 1000);
}

let rnd = 1;
function next(): number {
  // xorshift32
  rnd ^= rnd << 13;
  rnd ^= rnd >>> 17;
  rnd ^= rnd << 5;
  return rnd >>> 0;
}

let sink = 0;
function work(n: number): void {
  let x = sink | 1;
  for (let i = 0; i < n; i++) x = (Math.imul(x, 1103515245) + 12345) | 0;
  sink = x;
}

function run(p: VcpuRunParams): void {
  const space = LockSpace.attach(d.sab, d.spaceByteOffset);
  const lock = lockFromSpace(space, 0, p.kind, p.pv, { unfair: p.unfair, hook: p.hooks ? gateHook : null });
  rnd = (p.seed | 0) || 0x9e3779b9;
  const random = p.random;
  const delay = (): void => {
    if (random === undefined) return;
    if (random.maxSpin > 0) work(next() % random.maxSpin);
    // Now and then the vCPU loses its physical CPU for a while (host preemption).
    if (random.sleepOneIn > 0 && next() % random.sleepOneIn === 0) Atomics.wait(ctl, CTL.SLEEP, 0, 1 + (next() % random.maxSleepMs));
  };
  const msg: VcpuMessage = { type: "ready", cpu, gen: p.gen };
  port.postMessage(msg);
  while (Atomics.load(ctl, CTL.GO + cpu) !== p.gen) Atomics.wait(ctl, CTL.GO + cpu, Atomics.load(ctl, CTL.GO + cpu));

  const t0 = performance.now();
  // PLE bookkeeping (no-ops without PLE): the vCPU runs guest code from here
  // on, and tells the host it is on a core once per round (LockSpace.vcpuRan).
  const ple = space.pleMask >= 0;
  space.setVcpuIdle(cpu, false);
  if (p.mode === "hold") {
    lock.lock(cpu);
    Atomics.add(ctl, CTL.ACQUIRED + cpu, 1);
    Atomics.store(ctl, CTL.HOLDER, cpu + 1);
    while (Atomics.load(ctl, CTL.RELEASE + cpu) === 0) Atomics.wait(ctl, CTL.RELEASE + cpu, 0, 1000);
    Atomics.store(ctl, CTL.HOLDER, 0);
    lock.unlock(cpu);
  } else {
    const counter = CTL.COUNTER;
    const cs = p.criticalSectionWork;
    const outside = p.outsideWork;
    const acq = CTL.ACQUIRED + cpu;
    const nr = Atomics.load(ctl, CTL.NR_VCPUS);
    for (let i = 0; i < p.iterations; i++) {
      if (Atomics.load(ctl, CTL.STOP) !== 0) break;
      if (ple) space.vcpuRan(cpu);
      lock.lock(cpu);
      const c = ctl[counter]!;
      if (cs > 0) work(cs);
      if (random !== undefined) delay();
      ctl[counter] = c + 1;
      // The last vCPU to get its first turn marks the start of the steady state
      // (every vCPU of the run contending); under the lock, so the count is exact.
      if (i === 0 && Atomics.add(ctl, CTL.STARTED, 1) === nr - 1) {
        ctlF64[CTL.STEADY_T_F64] = performance.timeOrigin + performance.now();
        Atomics.store(ctl, CTL.STEADY_OPS, c + 1);
      }
      lock.unlock(cpu);
      ctl[acq]!++;
      if (outside > 0) work(outside);
      if (random !== undefined) delay();
    }
  }
  space.setVcpuIdle(cpu, true);
  const done: VcpuMessage = { type: "done", cpu, gen: p.gen, ms: performance.now() - t0, sink };
  if (Atomics.add(ctl, CTL.DONE, 1) === Atomics.load(ctl, CTL.NR_VCPUS) - 1) ctlF64[CTL.END_T_F64] = performance.timeOrigin + performance.now();
  port.postMessage(done);
}

port.on("message", (p: VcpuRunParams) => run(p));

// Our kernel thread id, so that the runner can pin this vCPU thread to host cores.
let tid = -1;
try {
  tid = Number(readlinkSync("/proc/thread-self").split("/").pop());
} catch (_e) {
  tid = -1; // not Linux: the runner cannot pin
}
const hello: VcpuMessage = { type: "tid", cpu, gen: 0, tid };
port.postMessage(hello);
