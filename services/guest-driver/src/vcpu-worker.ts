// One guest vCPU as a worker thread: it maps guest memory, joins the blk queue
// through the guest kernel's shared driver state, and runs the fio jobs it is
// given, taking vq->lock (the configured guest spinlock) around every queue
// operation. It halts in the guest's idle loop until the interrupt handler on
// the boot CPU posts one of its completions.
import { parentPort, workerData } from "node:worker_threads";
import { performance } from "node:perf_hooks";
import { LockSpace, lockFromSpace } from "@virtmesh/qspinlock";
import { Doorbell, mapFile } from "@virtmesh/shm";
import { CompletionRing } from "@virtmesh/virtio-blk";
import { DriverQueue, GuestMemory } from "@virtmesh/virtqueue";
import { VirtioBlkDriver } from "./blk";
import { runJobs } from "./fio";
import { GuestKernel, MAILBOX_EMPTY, pollCompletion, takeCompletion } from "./kernel";
import type { VcpuBoot, VcpuReply, VcpuRun } from "./vcpu-protocol";

const boot = workerData as VcpuBoot;
const port = parentPort!;
const cpu = boot.cpu;
const kernel = new GuestKernel(boot.geom, boot.kernelSab);
const memMap = mapFile(boot.memoryPath, boot.memoryBytes);
const mem = new GuestMemory(memMap.buffer, { size: boot.memoryBytes });
const kick = Doorbell.open(boot.kickPath);
const dq = new DriverQueue(mem, boot.queue, {
  ...(boot.indirectArea ? { indirectArea: boot.indirectArea } : {}),
  sharedState: { buffer: boot.kernelSab, byteOffset: kernel.driverStateOffset, attach: true },
});
const space = LockSpace.attach(boot.kernelSab, kernel.lockOffset);
const driver = new VirtioBlkDriver(mem, dq, kick, null, boot.reqArea, boot.slots, kernel, cpu, lockFromSpace(space, 0, "queue", false));
const cringMap = boot.completionRing ? mapFile(boot.completionRing.path, boot.completionRing.bytes) : null;
if (cringMap) driver.traceRing = CompletionRing.open(cringMap.buffer);

const env = { driver, dataBase: boot.dataBase, maxBs: boot.maxBs, slots: boot.slots - 1, diskBytes: boot.diskBytes, traceEvery: 0 };
// Before the vCPU halts for its next completion, it kicks the device for what it
// queued since the last kick (blk-mq's commit_rqs at the end of a batch).
const src = {
  next(): number {
    const c = pollCompletion(kernel, cpu);
    if (c !== MAILBOX_EMPTY) return c;
    driver.notify();
    return takeCompletion(kernel, cpu);
  },
  drain(untilMs: number): number {
    driver.notify();
    return takeCompletion(kernel, cpu, untilMs);
  },
};

port.on("message", (m: VcpuRun | { type: "exit" }) => {
  if (m.type === "exit") {
    cringMap?.unmap();
    kick.close();
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
