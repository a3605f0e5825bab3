// The guest's vCPUs: worker threads (vcpu-worker.ts) that run fio jobs, one
// job per vCPU in turn, possibly more of them than the host has cores. The
// boot CPU (this thread, cpu 0) lays out vq->lock for each run; during a run
// the vCPUs take the queue's interrupts themselves and post each completion to
// the vCPU that issued it.
import { performance } from "node:perf_hooks";
import { join } from "node:path";
import { Worker } from "node:worker_threads";
import { LockSpace, lockFromSpace, type GuestLock } from "@virtmesh/qspinlock";
import type { FioParams, FioPartial, TraceParent } from "./fio";
import { CTL_STOP, GuestKernel, postCompletion, resetMailboxes } from "./kernel";
import type { SpinlockConfig, VcpuBoot, VcpuReply, VcpuRun } from "./vcpu-protocol";

const WORKER_FILE = join(__dirname, "vcpu-worker.ts");
// tsx registers itself per thread: a worker loads it before the .ts entry.
const BOOTSTRAP = `require(${JSON.stringify(require.resolve("tsx/cjs"))}); require(${JSON.stringify(WORKER_FILE)});`;

export interface VcpuRunResult {
  partials: FioPartial[];
  /** From the moment every vCPU of the run was up to the last report. */
  elapsedMs: number;
}

interface Pending {
  gen: number;
  cpus: Set<number>;
  parts: FioPartial[];
  errors: string[];
  t0: number;
  resolve: (r: VcpuRunResult) => void;
  reject: (e: Error) => void;
}

/** A vCPU of the run failed; the run settled only after every other vCPU stopped. */
export class VcpuRunError extends Error {
  override readonly name = "VcpuRunError";
}

export class GuestVcpus {
  private readonly workers = new Map<number, Worker>();
  private readonly starting = new Map<number, Promise<void>>();
  private pending: Pending | null = null;
  private gen = 0;
  private closed = false;

  /** @param wake rings the call doorbell halted vCPUs sleep on (the IPI) */
  constructor(
    readonly kernel: GuestKernel,
    private readonly boot: Omit<VcpuBoot, "cpu">,
    private readonly wake: () => void,
  ) {}

  get count(): number {
    return this.kernel.geom.vcpus;
  }

  /** A lock handle for the boot CPU on the lock space laid out now (a fresh one: statistics start at 0). */
  layOutLock(cfg: SpinlockConfig): { lock: GuestLock; space: LockSpace } {
    const space = LockSpace.init(this.kernel.sab, this.kernel.lockOffset, { maxCpus: this.kernel.geom.vcpus + 1, nrLocks: 1 });
    return { lock: lockFromSpace(space, 0, cfg.kind, cfg.pv, { unfair: cfg.unfair }), space };
  }

  /** The interrupt handler's routing of a workload completion (called under vq->lock). */
  complete(slot: number, status: number): boolean {
    const cpu = this.kernel.slotOwner[slot] ?? 0;
    if (cpu === 0) return false;
    if (postCompletion(this.kernel, cpu, slot, status)) this.wake();
    return true;
  }

  private start(cpu: number): Promise<void> {
    const have = this.starting.get(cpu);
    if (have) return have;
    const p = new Promise<void>((resolve, reject) => {
      const data: VcpuBoot = { ...this.boot, cpu };
      const w = new Worker(BOOTSTRAP, { eval: true, workerData: data });
      this.workers.set(cpu, w);
      w.on("message", (m: VcpuReply) => {
        if (m.type === "ready") return resolve();
        const run = this.pending;
        if (!run || m.gen !== run.gen) return;
        if (m.type === "error") {
          run.errors.push(`vCPU ${m.cpu}: ${m.message}`);
          Atomics.store(this.kernel.ctl, CTL_STOP, 1); // the others stop, drain and report
        } else run.parts.push(m.partial);
        this.replied(m.cpu);
      });
      w.on("error", (e: Error) => {
        reject(e);
        this.lost(cpu, `vCPU ${cpu} crashed: ${e.message}`);
      });
      w.on("exit", (code) => {
        this.workers.delete(cpu);
        this.starting.delete(cpu);
        reject(new Error(`vCPU ${cpu} exited with code ${code}`));
        this.lost(cpu, `vCPU ${cpu} exited with code ${code}`);
      });
    });
    this.starting.set(cpu, p);
    return p;
  }

  /** vCPU cpu will not report for the current run (it died): count it as failed. */
  private lost(cpu: number, msg: string): void {
    const run = this.pending;
    if (!run || !run.cpus.has(cpu)) return;
    run.errors.push(msg);
    Atomics.store(this.kernel.ctl, CTL_STOP, 1);
    this.replied(cpu);
  }

  /** Settles the run once every one of its vCPUs has reported (or died). */
  private replied(cpu: number): void {
    const run = this.pending;
    if (!run || !run.cpus.delete(cpu) || run.cpus.size > 0) return;
    this.pending = null;
    if (run.errors.length > 0) run.reject(new VcpuRunError(run.errors.join("; ")));
    else run.resolve({ partials: run.parts, elapsedMs: performance.now() - run.t0 });
  }

  /** Starts the first n vCPU threads ahead of a run (they start on demand otherwise). */
  prestart(n: number): Promise<void> {
    const cpus = Array.from({ length: Math.min(n, this.count) }, (_, i) => i + 1);
    return Promise.all(cpus.map((c) => this.start(c))).then(() => undefined);
  }

  /**
   * Runs fio jobs 0..numjobs-1 on vCPUs 1..min(numjobs, count), job j on vCPU
   * 1 + j % that, under the lock `lock` (laid out by the caller with
   * layOutLock, on no vCPU yet). The runtime starts once every vCPU of the run
   * is up. Settles only when every vCPU of the run has stopped: with every
   * report, or with a VcpuRunError if one failed.
   */
  async run(p: FioParams, lock: SpinlockConfig, runId: number, parent: TraceParent | null, traceEvery: number): Promise<VcpuRunResult> {
    if (this.closed) throw new Error("the guest's vCPUs are shut down");
    if (this.pending) throw new Error("a vCPU run is already in progress");
    const n = Math.min(p.numjobs, this.count);
    const cpus = Array.from({ length: n }, (_, i) => i + 1);
    await Promise.all(cpus.map((c) => this.start(c)));
    if (this.closed) throw new Error("the guest's vCPUs are shut down");
    resetMailboxes(this.kernel);
    const owner = this.kernel.slotOwner;
    owner.fill(0);
    const jobsOf = new Map<number, number[]>(cpus.map((c) => [c, []]));
    for (let j = 0; j < p.numjobs; j++) {
      const cpu = 1 + (j % n);
      jobsOf.get(cpu)!.push(j);
      for (let s = j * p.iodepth; s < (j + 1) * p.iodepth; s++) owner[s] = cpu;
    }
    const gen = ++this.gen;
    const deadlineEpochMs = p.runtimeMs > 0 ? Date.now() + p.runtimeMs : null;
    const done = new Promise<VcpuRunResult>((resolve, reject) => {
      this.pending = { gen, cpus: new Set(cpus), parts: [], errors: [], t0: performance.now(), resolve, reject };
    });
    for (const cpu of cpus) {
      const m: VcpuRun = { type: "run", gen, params: p, jobs: jobsOf.get(cpu)!, runId, parent, traceEvery, deadlineEpochMs, lock };
      this.workers.get(cpu)!.postMessage(m);
    }
    try {
      return await done;
    } finally {
      owner.fill(0);
    }
  }

  /** Abandons the current run: vCPUs stop waiting for completions and report what they have. */
  abandon(): void {
    Atomics.store(this.kernel.ctl, CTL_STOP, 1);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.abandon();
    const ws = [...this.workers.values()];
    await Promise.all(
      ws.map(
        (w) =>
          new Promise<void>((resolve) => {
            const t = setTimeout(() => void w.terminate().then(() => resolve()), 2000);
            w.once("exit", () => {
              clearTimeout(t);
              resolve();
            });
            w.postMessage({ type: "exit" });
          }),
      ),
    );
  }
}
