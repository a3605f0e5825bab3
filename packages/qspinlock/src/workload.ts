// vCPU runner: a guest's vCPUs as worker threads sharing the guest's lock
// words, possibly more of them than the host has cores.
import { execFileSync } from "node:child_process";
import { Worker } from "node:worker_threads";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { lockSpaceBytes, type LockStats } from "./layout";
import { LockSpace, type RaceHook } from "./lockspace";
import { isLockKind, lockFromSpace } from "./guest-lock";
import type { GuestLock, LockKind } from "./ticket";
import { CTL, type RandomDelays, type VcpuMessage, type VcpuRunParams, type VcpuWorkerData } from "./workload-protocol";

export type { RandomDelays };

const WORKER_FILE = join(__dirname, "vcpu-worker.ts");

function bootstrap(): string {
  // tsx registers itself per thread; a worker must load it before the .ts file.
  return `require(${JSON.stringify(require.resolve("tsx/cjs"))}); require(${JSON.stringify(WORKER_FILE)});`;
}

/** What one vCPU does in a run. */
export interface VcpuTask {
  cpu: number;
  /** "loop": lock; counter++; unlock, `iterations` times. "hold": lock once, wait for releaseHold(cpu), unlock. */
  mode: "loop" | "hold";
  iterations?: number;
  /** Pause at armed race points (see VcpuPool.arm). */
  hooks?: boolean;
  seed?: number;
}

export interface VcpuRunConfig {
  kind: LockKind;
  pv: boolean;
  unfair?: boolean;
  /** Work iterations inside the critical section (0 = just the counter update). */
  criticalSectionWork?: number;
  /** Work iterations between unlock and the next lock. */
  outsideWork?: number;
  random?: RandomDelays;
  haltTimeoutUs?: number;
  /** Host pause-loop exiting: PLE window in cpu_relax() iterations (a power of 2), 0 or absent = off. See LockSpaceInit.pleWindow. */
  pleWindow?: number;
}

/**
 * A guest's vCPUs as worker threads around one lock in a SharedArrayBuffer.
 * The threads persist across runs; each run lays out a fresh lock space.
 */
export class VcpuPool {
  readonly sab: SharedArrayBuffer;
  readonly ctl: Int32Array;
  private readonly ctlF64: Float64Array;
  private spaceCur: LockSpace | null = null;
  private cfg: VcpuRunConfig | null = null;
  private readonly workers = new Map<number, Worker>();
  private readonly ready = new Set<number>();
  private readonly done = new Set<number>();
  private running: number[] = [];
  private readonly errors: string[] = [];
  private waiters: Array<() => void> = [];
  private gen = 0;
  private dead = false;
  private readonly tids = new Map<number, number>();
  private pinnedCores = availableParallelism();

  private constructor(readonly maxCpus: number) {
    if (!Number.isInteger(maxCpus) || maxCpus < 1 || maxCpus > CTL.MAX_CPUS) throw new RangeError(`maxCpus must be an integer in 1..${CTL.MAX_CPUS}, got ${maxCpus}`);
    const spaceBytes = lockSpaceBytes(maxCpus, 1);
    this.sab = new SharedArrayBuffer(spaceBytes + CTL.WORDS * 4);
    this.ctl = new Int32Array(this.sab, spaceBytes, CTL.WORDS);
    this.ctlF64 = new Float64Array(this.sab, spaceBytes, 8); // spaceBytes is a multiple of 64
  }

  /** Starts worker threads for vCPUs `cpus` (default 0..maxCpus-1); other ids are free for the main thread. */
  static async start(maxCpus: number, cpus?: number[]): Promise<VcpuPool> {
    const pool = new VcpuPool(maxCpus);
    const spaceBytes = lockSpaceBytes(maxCpus, 1);
    const ids = cpus ?? Array.from({ length: maxCpus }, (_, i) => i);
    for (const cpu of ids) {
      if (!Number.isInteger(cpu) || cpu < 0 || cpu >= maxCpus) throw new RangeError(`cpu ${cpu} out of range 0..${maxCpus - 1}`);
      const data: VcpuWorkerData = { sab: pool.sab, spaceByteOffset: 0, ctlByteOffset: spaceBytes, cpu };
      const w = new Worker(bootstrap(), { eval: true, workerData: data });
      pool.workers.set(cpu, w);
      w.on("message", (m: VcpuMessage) => {
        if (m.type === "tid") {
          pool.tids.set(m.cpu, m.tid);
          pool.wake();
          return;
        }
        if (m.gen !== pool.gen) return;
        if (m.type === "ready") pool.ready.add(m.cpu);
        else pool.done.add(m.cpu);
        pool.wake();
      });
      w.on("error", (e: Error) => {
        pool.errors.push(`vCPU ${cpu}: ${e.message}`);
        pool.wake();
      });
      w.on("exit", () => {
        pool.dead = true;
        pool.wake();
      });
    }
    if (!(await pool.waitFor(() => pool.tids.size === ids.length, 30_000))) {
      await pool.terminate();
      throw new Error(`VcpuPool: vCPU threads did not start: ${pool.errors.join("; ") || "timeout"}`);
    }
    return pool;
  }

  /**
   * Confines every vCPU thread to host cores 0..hostCores-1 (taskset on each
   * thread id), as a host with that many cores would; null lifts the limit.
   */
  pinToHostCores(hostCores: number | null): void {
    const all = availableParallelism();
    const n = hostCores ?? all;
    if (!Number.isInteger(n) || n < 1 || n > all) throw new RangeError(`hostCores must be an integer in 1..${all}, got ${hostCores}`);
    if (n === this.pinnedCores) return;
    for (const [cpu, tid] of this.tids) {
      if (tid < 0) throw new Error(`cannot pin vCPU ${cpu}: thread ids are only known on Linux`);
      try {
        execFileSync("taskset", ["-pc", `0-${n - 1}`, String(tid)], { stdio: "ignore" });
      } catch (e) {
        throw new Error(`cannot pin vCPU ${cpu} (thread ${tid}) to cores 0-${n - 1} with taskset: ${(e as Error).message}`);
      }
    }
    this.pinnedCores = n;
  }

  private wake(): void {
    const ws = this.waiters;
    this.waiters = [];
    for (const f of ws) f();
  }

  private waitFor(cond: () => boolean, timeoutMs: number): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      const check = (): void => {
        if (cond()) {
          clearTimeout(timer);
          resolve(true);
        } else if (this.errors.length > 0 || this.dead) {
          clearTimeout(timer);
          resolve(false);
        } else this.waiters.push(check);
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((f) => f !== check);
        resolve(cond());
      }, timeoutMs);
      check();
    });
  }

  get space(): LockSpace {
    if (this.spaceCur === null) throw new Error("VcpuPool: no run prepared");
    return this.spaceCur;
  }

  /** Lays out a fresh lock and control block and hands each task to its vCPU; resolves when all are ready. */
  async prepare(cfg: VcpuRunConfig, tasks: VcpuTask[]): Promise<void> {
    if (!isLockKind(cfg.kind)) throw new TypeError(`lock kind must be "ticket" or "queue", got ${String(cfg.kind)}`);
    if (this.dead || this.errors.length > 0) throw new Error(`VcpuPool is unusable: ${this.errors.join("; ") || "a worker exited"}`);
    if (this.running.length > 0 && this.done.size < this.running.length) throw new Error("VcpuPool: previous run still in progress");
    this.gen++;
    this.ready.clear();
    this.done.clear();
    for (let i = 0; i < CTL.WORDS; i++) if (i < CTL.GO || i >= CTL.GO + CTL.MAX_CPUS) Atomics.store(this.ctl, i, 0);
    for (let i = 0; i < 8; i++) this.ctlF64[i] = 0;
    Atomics.store(this.ctl, CTL.NR_VCPUS, tasks.length);
    const space = LockSpace.init(this.sab, 0, { maxCpus: this.maxCpus, nrLocks: 1, haltTimeoutUs: cfg.haltTimeoutUs ?? 0, pleWindow: cfg.pleWindow ?? 0 });
    // For PLE's directed yield every vCPU is idle (in HLT, never a target)
    // until its worker starts the run's guest code, and again after.
    for (let c = 0; c < this.maxCpus; c++) space.setVcpuIdle(c, true);
    this.spaceCur = space;
    this.cfg = cfg;
    this.running = tasks.map((t) => t.cpu);
    for (const t of tasks) {
      const w = this.workers.get(t.cpu);
      if (w === undefined) throw new RangeError(`no worker runs vCPU ${t.cpu}`);
      const p: VcpuRunParams = {
        gen: this.gen,
        kind: cfg.kind,
        pv: cfg.pv,
        unfair: cfg.unfair === true,
        mode: t.mode,
        iterations: t.iterations ?? 0,
        criticalSectionWork: cfg.criticalSectionWork ?? 0,
        outsideWork: cfg.outsideWork ?? 0,
        random: cfg.random,
        seed: t.seed ?? t.cpu * 7919 + this.gen,
        hooks: t.hooks === true,
      };
      w.postMessage(p);
    }
    const ok = await this.waitFor(() => this.ready.size === this.running.length, 30_000);
    if (!ok) throw new Error(`VcpuPool: vCPUs did not become ready: ${this.errors.join("; ") || "timeout"}`);
  }

  /** A handle on the run's lock for the main thread, running as vCPU `cpu` (one without a worker). */
  mainLock(hook: RaceHook | null = null): GuestLock {
    const cfg = this.cfg;
    if (cfg === null) throw new Error("VcpuPool: no run prepared");
    return lockFromSpace(this.space, 0, cfg.kind, cfg.pv, { unfair: cfg.unfair, hook });
  }

  go(cpu: number): void {
    Atomics.store(this.ctl, CTL.GO + cpu, this.gen);
    Atomics.notify(this.ctl, CTL.GO + cpu);
  }
  goAll(): void {
    for (const cpu of this.running) this.go(cpu);
  }
  /** Ends "loop" runs early: each vCPU finishes its current round and stops. */
  stop(): void {
    Atomics.store(this.ctl, CTL.STOP, 1);
  }
  releaseHold(cpu: number): void {
    Atomics.store(this.ctl, CTL.RELEASE + cpu, 1);
    Atomics.notify(this.ctl, CTL.RELEASE + cpu);
  }
  acquired(cpu: number): number {
    return Atomics.load(this.ctl, CTL.ACQUIRED + cpu);
  }
  counter(): number {
    return Atomics.load(this.ctl, CTL.COUNTER);
  }
  /** vCPU holding the lock in "hold" mode, or -1. */
  holder(): number {
    return Atomics.load(this.ctl, CTL.HOLDER) - 1;
  }
  /**
   * The run's steady state: from the moment the last of its vCPUs first got
   * the lock (all of them contending) to the moment the last one finished:
   * rounds done and milliseconds. null if some vCPU never got the lock or the
   * run has not finished.
   */
  steadyState(): { ops: number; ms: number } | null {
    const t0 = this.ctlF64[CTL.STEADY_T_F64]!;
    const t1 = this.ctlF64[CTL.END_T_F64]!;
    if (t0 === 0 || t1 === 0 || Atomics.load(this.ctl, CTL.STARTED) < this.running.length) return null;
    return { ops: this.counter() - Atomics.load(this.ctl, CTL.STEADY_OPS), ms: t1 - t0 };
  }
  isDone(cpu: number): boolean {
    return this.done.has(cpu);
  }
  get workerErrors(): readonly string[] {
    return this.errors;
  }

  /** Pause vCPU `cpu` the next time it reaches race point `point` (its task needs hooks: true). */
  arm(point: number, cpu: number): void {
    const base = CTL.HOOKS + point * CTL.HOOK_STRIDE;
    Atomics.store(this.ctl, base + 1, 0);
    Atomics.store(this.ctl, base + 2, 0);
    Atomics.store(this.ctl, base, cpu + 1);
  }
  reached(point: number): boolean {
    return Atomics.load(this.ctl, CTL.HOOKS + point * CTL.HOOK_STRIDE + 1) === 1;
  }
  release(point: number): void {
    const base = CTL.HOOKS + point * CTL.HOOK_STRIDE;
    Atomics.store(this.ctl, base + 2, 1);
    Atomics.notify(this.ctl, base + 2);
  }

  /** Polls `cond` every millisecond until true or the deadline. */
  async until(cond: () => boolean, timeoutMs: number): Promise<boolean> {
    const end = performance.now() + timeoutMs;
    while (!cond()) {
      if (this.errors.length > 0 || performance.now() > end) return cond();
      await new Promise((r) => setTimeout(r, 1));
    }
    return true;
  }

  /** Resolves true when every vCPU of the run reported done; false on worker error or timeout. */
  waitDone(timeoutMs: number): Promise<boolean> {
    return this.waitFor(() => this.done.size === this.running.length, timeoutMs);
  }

  /** Terminates every worker, wherever it is (spinning, halted); idempotent. */
  async terminate(): Promise<void> {
    this.dead = true;
    await Promise.all([...this.workers.values()].map((w) => w.terminate()));
    this.wake();
  }
}

export interface LockWorkloadOptions {
  lock: LockKind;
  pv: boolean;
  vcpus: number;
  /** lock/unlock rounds per vCPU. */
  iterations: number;
  /** Work iterations inside the critical section (0 = just the counter update, as the seed's micro-benchmark). */
  criticalSectionWork?: number;
  /** Work iterations between unlock and the next lock. */
  outsideWork?: number;
  /**
   * Host cores the vCPU threads may run on (default: all of this machine's).
   * Fewer than the machine has: the threads are pinned to cores 0..hostCores-1.
   */
  hostCores?: number;
  /** Queue lock: allow lock stealing in the fast path. */
  unfair?: boolean;
  /** Hard limit: on expiry the workers are terminated and the result has ok = false. Default 60 s. */
  timeoutMs?: number;
  /** Soft limit: when reached every vCPU stops after its current round; the result has truncated = true. */
  budgetMs?: number;
  haltTimeoutUs?: number;
  /**
   * Host pause-loop exiting (LockSpaceInit.pleWindow): a PLE window in
   * cpu_relax() iterations, a power of 2 (PLE_WINDOW_SPINS is KVM-like);
   * 0 or absent = no PLE, spinners never give up their host core.
   */
  pleWindow?: number;
  random?: RandomDelays;
  /** Reuse these threads (vCPUs 0..vcpus-1 must have workers); otherwise a pool is started and torn down. */
  pool?: VcpuPool;
}

export interface LockWorkloadResult {
  ok: boolean;
  timedOut: boolean;
  /** The soft budget ended the run before every vCPU did `iterations` rounds. */
  truncated: boolean;
  error: string | null;
  lock: LockKind;
  pv: boolean;
  unfair: boolean;
  vcpus: number;
  hostCores: number;
  overcommit: number;
  iterations: number;
  elapsedMs: number;
  /** lock/unlock rounds completed (all vCPUs). */
  ops: number;
  /** Final value of the shared counter; equals ops unless mutual exclusion failed. */
  counter: number;
  acquiredPerVcpu: number[];
  /**
   * Rounds done and ms taken after every vCPU had acquired the lock once, to
   * the end of the run: the steady state, without the start-up transient in
   * which the vCPU threads that got a host core first run with fewer
   * contenders than `vcpus`. 0 and 0 if some vCPU never got the lock.
   */
  steadyOps: number;
  steadyMs: number;
  /** PLE window the run used (0 = no PLE). */
  pleWindow: number;
  stats: LockStats;
}

/** Runs `vcpus` worker threads, each doing lock; counter++ (plain RMW); unlock, `iterations` times. */
export async function runLockWorkload(o: LockWorkloadOptions): Promise<LockWorkloadResult> {
  if (!isLockKind(o.lock)) throw new TypeError(`lock must be "ticket" or "queue", got ${String(o.lock)}`);
  if (!Number.isInteger(o.vcpus) || o.vcpus < 1 || o.vcpus > CTL.MAX_CPUS) throw new RangeError(`vcpus must be an integer in 1..${CTL.MAX_CPUS}, got ${o.vcpus}`);
  if (!Number.isInteger(o.iterations) || o.iterations < 0) throw new RangeError(`iterations must be a non-negative integer, got ${o.iterations}`);
  const hostCores = o.hostCores ?? availableParallelism();
  if (!Number.isInteger(hostCores) || hostCores < 1 || hostCores > availableParallelism()) throw new RangeError(`hostCores must be an integer in 1..${availableParallelism()}, got ${hostCores}`);
  const timeoutMs = o.timeoutMs ?? 60_000;
  const own = o.pool === undefined;
  const pool = o.pool ?? (await VcpuPool.start(o.vcpus));
  const tasks: VcpuTask[] = [];
  for (let c = 0; c < o.vcpus; c++) tasks.push({ cpu: c, mode: "loop", iterations: o.iterations });
  try {
    pool.pinToHostCores(hostCores);
    await pool.prepare({ kind: o.lock, pv: o.pv, unfair: o.unfair, criticalSectionWork: o.criticalSectionWork, outsideWork: o.outsideWork, random: o.random, haltTimeoutUs: o.haltTimeoutUs, pleWindow: o.pleWindow }, tasks);
    let truncated = false;
    const t0 = performance.now();
    pool.goAll();
    const budget =
      o.budgetMs !== undefined
        ? setTimeout(() => {
            truncated = true;
            pool.stop();
          }, o.budgetMs)
        : undefined;
    const finished = await pool.waitDone(timeoutMs);
    const elapsedMs = performance.now() - t0;
    clearTimeout(budget);
    if (!finished) await pool.terminate(); // stuck vCPUs (a lost wake-up, a broken lock): kill them
    const acquiredPerVcpu = tasks.map((t) => pool.acquired(t.cpu));
    const ops = acquiredPerVcpu.reduce((a, b) => a + b, 0);
    const counter = pool.counter();
    const steady = finished ? pool.steadyState() : null;
    const errs = pool.workerErrors;
    const full = o.vcpus * o.iterations;
    const error =
      errs.length > 0
        ? errs.join("; ")
        : !finished
          ? `timed out after ${timeoutMs} ms with ${ops} of ${full} rounds done`
          : counter !== ops
            ? `mutual exclusion violated: counter ${counter} after ${ops} rounds`
            : !truncated && ops !== full
              ? `only ${ops} of ${full} rounds done`
              : null;
    return {
      ok: error === null,
      timedOut: !finished && errs.length === 0,
      truncated,
      error,
      lock: o.lock,
      pv: o.pv,
      unfair: o.unfair === true,
      vcpus: o.vcpus,
      hostCores,
      overcommit: o.vcpus / hostCores,
      iterations: o.iterations,
      elapsedMs,
      ops,
      counter,
      acquiredPerVcpu,
      steadyOps: steady?.ops ?? 0,
      steadyMs: steady?.ms ?? 0,
      pleWindow: o.pleWindow ?? 0,
      stats: pool.space.stats(),
    };
  } finally {
    if (own) await pool.terminate();
  }
}
