// One guest vCPU as a worker thread: it maps guest memory, joins the blk queue
// through the guest kernel's shared driver state, and runs its workloads: the
// fio jobs it is given, taking vq->lock (the configured guest spinlock) around
// every queue operation, and its part of the memory-dirtying walk (stress.ts).
// While its fio jobs wait for I/O it halts on the queue's interrupt doorbell;
// woken, it runs the interrupt handler itself if the used ring has entries
// (posting each completion to the vCPU that issued it, and waking that one if
// it is halted), then works through its own mailbox.
//
// The vCPU runs in 10 ms slices (QEMU's CPU_THROTTLE_TIMESLICE): each slice
// interleaves its workloads' steps; between slices it returns to its event
// loop, where the boot CPU's commands (pause, throttle, dirty logging, save)
// reach it, so a command always finds it between two steps. Throttled by pct %,
// it runs (100 - pct) % of the slice and sleeps the rest (cpu_throttle_thread).
import { statSync } from "node:fs";
import { parentPort, workerData } from "node:worker_threads";
import { performance } from "node:perf_hooks";
import { LockSpace, lockFromSpace } from "@virtmesh/qspinlock";
import { Doorbell, mapFile } from "@virtmesh/shm";
import { CompletionRing } from "@virtmesh/virtio-blk";
import { DirtyLog, DriverQueue, GuestMemory } from "@virtmesh/virtqueue";
import { VirtioBlkDriver } from "./blk";
import { FioVcpu, type FioEnv } from "./fio";
import { CTL_STOP, GuestKernel, MAILBOX_EMPTY, hasCompletion, pollCompletion, postCompletion, setHalted } from "./kernel";
import { StressWalker } from "./stress";
import type { SpinlockConfig, VcpuBoot, VcpuCommand, VcpuReply, VcpuWorkloadState } from "./vcpu-protocol";

// A warm vCPU (GuestVcpus.warm) gets its boot data by message after it loaded this code's modules.
const boot = ((globalThis as { __virtmeshVcpuBoot?: VcpuBoot }).__virtmeshVcpuBoot ?? workerData) as VcpuBoot;
const port = parentPort!;
const cpu = boot.cpu;
const kernel = new GuestKernel(boot.geom, boot.kernelSab);
const memMap = mapFile(boot.memoryPath, boot.memoryBytes);
// The vCPU log, as KVM's dirty bitmap: off until the boot CPU relays the sidecar's switch.
const logMap = boot.vcpuDirtyLogPath ? mapFile(boot.vcpuDirtyLogPath, statSync(boot.vcpuDirtyLogPath).size) : null;
const vcpuLog = logMap ? new DirtyLog(logMap.buffer, boot.memoryBytes, { enabled: false }) : null;
const mem = new GuestMemory(memMap.buffer, { size: boot.memoryBytes, vcpuLog });
const kick = Doorbell.open(boot.kickPath);
const call = Doorbell.open(boot.callPath);
const dq = new DriverQueue(mem, boot.queue, {
  ...(boot.indirectArea ? { indirectArea: boot.indirectArea } : {}),
  sharedState: { buffer: boot.kernelSab, byteOffset: kernel.driverStateOffset, attach: true },
});
const space = LockSpace.attach(boot.kernelSab, kernel.lockOffset);
const driver = new VirtioBlkDriver(mem, dq, kick, call, boot.reqArea, boot.slots, kernel, cpu, lockFromSpace(space, 0, "queue", false));
// The interrupt handler's routing, on whichever vCPU runs it (under vq->lock).
let wakeOthers = false;
driver.onComplete = (slot, status) => {
  const owner = kernel.slotOwner[slot]!;
  if (owner > 0 && postCompletion(kernel, owner, slot, status) && owner !== cpu) wakeOthers = true;
};
const cringMap = boot.completionRing ? mapFile(boot.completionRing.path, boot.completionRing.bytes) : null;
if (cringMap) driver.traceRing = CompletionRing.open(cringMap.buffer);

const env: FioEnv = { driver, dataBase: boot.dataBase, maxBs: boot.maxBs, slots: boot.slots - 1, diskBytes: boot.diskBytes, traceEvery: 0 };
const stopped = (): boolean => Atomics.load(kernel.ctl, CTL_STOP) !== 0;
let draining = false;
const idleCheck = (): boolean => hasCompletion(kernel, cpu) || dq.hasUsed() || (!draining && stopped());
const reply = (r: VcpuReply): void => port.postMessage(r);
const ack = (what: "stress-start" | "stress-stop" | "pause" | "restore" | "drop"): void => reply({ type: "ack", gen: 0, cpu, what });

/** QEMU's CPU_THROTTLE_TIMESLICE_NS. */
const SLICE_MS = 10;
/** Pages the flat-out walk writes between looks at the clock and the mailbox. */
const STRESS_CHUNK = 64;
const sleeper = new Int32Array(new SharedArrayBuffer(4));

let paused = false;
let exiting = false;
let throttlePct = 0;
let fio: FioVcpu | null = null;
let fioGen = 0;
let fioStarted = false;
let fioLock: SpinlockConfig | null = null;
let stress: StressWalker | null = null;
/** This vCPU's share of the target rate; 0: flat out. */
let stressRate = 0;
/** Up to when the walk's credit is counted (throttle sleeps and pauses earn none). */
let stressClock = 0;
let stats: Float64Array | null = null;
let scheduled = false;
/** Length of the throttle sleep before the next slice (earns the walk no credit). */
let unpaidMs = 0;

function useLock(l: SpinlockConfig): void {
  // The boot CPU laid out a fresh lock for this run; attach to it.
  driver.lock = lockFromSpace(LockSpace.attach(boot.kernelSab, kernel.lockOffset), 0, l.kind, l.pv, { unfair: l.unfair });
  fioLock = l;
}

function schedule(delayMs: number): void {
  if (scheduled || exiting) return;
  scheduled = true;
  if (delayMs <= 0) setImmediate(slice);
  else setTimeout(slice, delayMs);
}

/** One step of the fio jobs: a completion from the mailbox, else the interrupt handler. False: nothing to do now. */
function fioStep(f: FioVcpu): boolean {
  const c = pollCompletion(kernel, cpu);
  if (c !== MAILBOX_EMPTY) {
    f.deliver(c);
    return true;
  }
  if (dq.hasUsed()) {
    if (!driver.handleInterrupt()) throw driver.failure!;
    if (wakeOthers) {
      wakeOthers = false;
      call.ring();
    }
    return true;
  }
  // Kick the device for what was queued since the last kick (blk-mq's commit_rqs).
  driver.notify();
  return false;
}

/** Walks as many pages as the pacing allows now (a chunk when flat out). False: out of credit. */
function stressStep(w: StressWalker, now: number): boolean {
  if (stressRate === 0) {
    w.step(STRESS_CHUNK);
    return true;
  }
  if (now > stressClock) {
    // Credit for at most two slices: a vCPU that was halted long does not burst.
    w.credit = Math.min(w.credit + (now - stressClock) * stressRate, Math.max(1, 2 * SLICE_MS * stressRate));
    stressClock = now;
  }
  const n = Math.min(Math.floor(w.credit), STRESS_CHUNK);
  if (n === 0) return false;
  w.credit -= n;
  w.step(n);
  return true;
}

function publishStats(): void {
  if (stats && stress) {
    stats[2 * cpu] = stress.pagesWritten;
    stats[2 * cpu + 1] = stress.passes;
  }
}

function finishFio(r: VcpuReply): void {
  fio = null;
  fioStarted = false;
  draining = false;
  reply(r);
}

function slice(): void {
  scheduled = false;
  if (paused || exiting) return;
  const t0 = performance.now();
  if (unpaidMs > 0) {
    stressClock = Math.max(stressClock, Math.min(t0, stressClock + unpaidMs));
    unpaidMs = 0;
  }
  const end = t0 + (SLICE_MS * (100 - throttlePct)) / 100;
  try {
    if (fio && !fioStarted) {
      fioStarted = true;
      fio.start();
    }
    for (;;) {
      let progress = false;
      const f = fio;
      if (f) {
        if (!f.stopped && stopped()) {
          f.abandon(performance.now());
          draining = true;
        }
        progress = fioStep(f);
        if (f.finished(performance.now())) finishFio({ type: "done", gen: fioGen, cpu, partial: f.partial() });
      }
      const now = performance.now();
      if (stress) progress = stressStep(stress, now) || progress;
      if (now >= end) break;
      if (progress) continue;
      if (!fio && !stress) break;
      // Nothing to do until an interrupt or the walk's next page of credit: halt.
      let waitMs = end - now;
      if (stress && stressRate > 0) waitMs = Math.min(waitMs, (1 - stress.credit) / stressRate);
      waitMs = Math.max(0.05, waitMs);
      if (fio) {
        setHalted(kernel, cpu, 1);
        call.spinThenWaitSync(idleCheck, { maxSpinUs: 20, timeoutMs: waitMs });
        setHalted(kernel, cpu, 0);
      } else Atomics.wait(sleeper, 0, 0, waitMs);
    }
  } catch (e) {
    if (fio) finishFio({ type: "error", gen: fioGen, cpu, message: (e as Error).message });
    else throw e;
  }
  publishStats();
  if (!fio && !stress) return; // idle: the next command wakes the vCPU
  unpaidMs = (SLICE_MS * throttlePct) / 100;
  schedule(unpaidMs);
}

function save(): VcpuWorkloadState {
  return {
    stress: stress ? { walk: stress.save(), ratePagesPerMs: stressRate } : null,
    fio: fio && fioLock ? { state: fio.save(), started: fioStarted, lock: fioLock } : null,
  };
}

function restore(s: VcpuWorkloadState, gen: number, statsSab: SharedArrayBuffer): void {
  paused = true;
  stress = null;
  fio = null;
  stats = new Float64Array(statsSab);
  if (s.stress) {
    stress = StressWalker.restore(mem.vcpu, s.stress.walk);
    stressRate = s.stress.ratePagesPerMs;
    publishStats();
  }
  if (s.fio) {
    useLock(s.fio.lock);
    fio = FioVcpu.restore(s.fio.state, env);
    fioStarted = s.fio.started;
    fioGen = gen;
    draining = fio.stopped;
  }
}

port.on("message", (m: VcpuCommand) => {
  switch (m.type) {
    case "exit":
      exiting = true;
      cringMap?.unmap();
      kick.close();
      call.close();
      logMap?.unmap();
      memMap.unmap();
      port.close();
      return;
    case "run":
      try {
        useLock(m.lock);
        env.traceEvery = m.traceEvery;
        const deadline = m.deadlineEpochMs === null ? Infinity : m.deadlineEpochMs - performance.timeOrigin;
        fio = new FioVcpu(m.params, env, m.jobs, m.runId, m.parent, deadline);
        fioGen = m.gen;
        fioStarted = false;
        draining = false;
      } catch (e) {
        reply({ type: "error", gen: m.gen, cpu, message: (e as Error).message });
        return;
      }
      schedule(0);
      return;
    case "stress-start":
      stats = new Float64Array(m.stats);
      stress = new StressWalker(mem.vcpu, m.addr, m.pages);
      stress.init();
      stressRate = m.ratePagesPerMs;
      stressClock = performance.now();
      publishStats();
      ack("stress-start");
      schedule(0);
      return;
    case "stress-stop":
      publishStats();
      stress = null;
      ack("stress-stop");
      return;
    case "throttle":
      throttlePct = m.pct;
      return;
    case "dirty-logging":
      if (vcpuLog) vcpuLog.enabled = m.enabled;
      return;
    case "pause":
      // Between two slices, hence between two steps of every workload.
      paused = true;
      publishStats();
      ack("pause");
      return;
    case "resume":
      if (!paused) return;
      paused = false;
      stressClock = performance.now(); // a paused vCPU earns no credit
      schedule(0);
      return;
    case "save":
      reply({ type: "saved", gen: 0, cpu, state: save() });
      return;
    case "restore":
      try {
        restore(m.state, m.gen, m.stats);
      } catch (e) {
        reply({ type: "error", gen: m.gen, cpu, message: `restore: ${(e as Error).message}` });
        return;
      }
      ack("restore");
      return;
    case "drop":
      stress = null;
      fio = null;
      fioStarted = false;
      draining = false;
      ack("drop");
      return;
  }
});
const ready: VcpuReply = { type: "ready", gen: 0, cpu };
port.postMessage(ready);
