// One guest vCPU as a worker thread: it maps guest memory, joins the blk queue
// through the guest kernel's shared driver state, and runs the fio jobs it is
// given, taking vq->lock (the configured guest spinlock) around every queue
// operation. When idle it halts on the queue's interrupt doorbell; woken, it
// runs the interrupt handler itself if the used ring has entries (posting each
// completion to the vCPU that issued it, and waking that one if it is halted),
// then works through its own mailbox.
import { parentPort, workerData } from "node:worker_threads";
import { performance } from "node:perf_hooks";
import { LockSpace, lockFromSpace } from "@virtmesh/qspinlock";
import { Doorbell, mapFile } from "@virtmesh/shm";
import { CompletionRing } from "@virtmesh/virtio-blk";
import { DriverQueue, GuestMemory } from "@virtmesh/virtqueue";
import { VirtioBlkDriver } from "./blk";
import { runJobs } from "./fio";
import { CTL_STOP, GuestKernel, MAILBOX_EMPTY, hasCompletion, pollCompletion, postCompletion, setHalted } from "./kernel";
import type { VcpuBoot, VcpuReply, VcpuRun } from "./vcpu-protocol";

const boot = workerData as VcpuBoot;
const port = parentPort!;
const cpu = boot.cpu;
const kernel = new GuestKernel(boot.geom, boot.kernelSab);
const memMap = mapFile(boot.memoryPath, boot.memoryBytes);
const mem = new GuestMemory(memMap.buffer, { size: boot.memoryBytes });
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

const env = { driver, dataBase: boot.dataBase, maxBs: boot.maxBs, slots: boot.slots - 1, diskBytes: boot.diskBytes, traceEvery: 0 };
const stopped = (): boolean => Atomics.load(kernel.ctl, CTL_STOP) !== 0;
const idleCheck = (): boolean => hasCompletion(kernel, cpu) || dq.hasUsed() || stopped();

/**
 * The next completion for this vCPU: from its mailbox, else by taking the
 * interrupt, else by halting on the interrupt doorbell (after an adaptive
 * halt poll). Before it halts it kicks the device for what it queued since
 * the last kick (blk-mq's commit_rqs at the end of a batch). -1 when the run
 * is stopped, or, with untilMs (draining an abandoned run), at that time.
 */
function take(untilMs: number): number {
  for (;;) {
    const c = pollCompletion(kernel, cpu);
    if (c !== MAILBOX_EMPTY) return c;
    if (dq.hasUsed()) {
      if (!driver.handleInterrupt()) throw driver.failure!;
      if (wakeOthers) {
        wakeOthers = false;
        call.ring();
      }
      continue;
    }
    driver.notify();
    let waitMs = 100;
    if (untilMs > 0) {
      waitMs = untilMs - performance.now();
      if (waitMs <= 0) return -1;
    } else if (stopped()) return -1;
    setHalted(kernel, cpu, 1);
    call.spinThenWaitSync(idleCheck, { maxSpinUs: 20, timeoutMs: Math.min(waitMs, 100) });
    setHalted(kernel, cpu, 0);
  }
}
const src = { next: (): number => take(0), drain: (untilMs: number): number => take(untilMs) };

port.on("message", (m: VcpuRun | { type: "exit" }) => {
  if (m.type === "exit") {
    cringMap?.unmap();
    kick.close();
    call.close();
    memMap.unmap();
    port.close();
    return;
  }
  try {
    // The boot CPU laid out a fresh lock for this run; attach to it.
    driver.lock = lockFromSpace(LockSpace.attach(boot.kernelSab, kernel.lockOffset), 0, m.lock.kind, m.lock.pv, { unfair: m.lock.unfair });
    env.traceEvery = m.traceEvery;
    const deadline = m.deadlineEpochMs === null ? Infinity : m.deadlineEpochMs - performance.timeOrigin;
    const partial = runJobs(m.params, env, m.jobs, m.runId, m.parent, deadline, src);
    const r: VcpuReply = { type: "done", gen: m.gen, cpu, partial };
    port.postMessage(r);
  } catch (e) {
    const r: VcpuReply = { type: "error", gen: m.gen, cpu, message: (e as Error).message };
    port.postMessage(r);
  }
});
const ready: VcpuReply = { type: "ready", gen: 0, cpu };
port.postMessage(ready);
