// The guest's vCPUs: worker threads (vcpu-worker.ts) that run fio jobs, one
// job per vCPU in turn, possibly more of them than the host has cores, and the
// memory-dirtying walk (stress.ts). The boot CPU (this thread, cpu 0) lays out
// vq->lock for each run; during a run the vCPUs take the queue's interrupts
// themselves and post each completion to the vCPU that issued it.
//
// For live migration the boot CPU also acts as the VMM's vCPU control: it
// throttles the vCPUs (auto-converge), relays the dirty-logging switch to
// them, pauses them between two steps of their workloads, and saves and
// restores those workloads (the walk's positions, a fio run's jobs).
import { performance } from "node:perf_hooks";
import { join } from "node:path";
import { Worker } from "node:worker_threads";
import { LockSpace, lockFromSpace, type GuestLock } from "@virtmesh/qspinlock";
import type { FioParams, FioPartial, TraceParent } from "./fio";
import { CTL_STOP, GuestKernel, postCompletion, resetMailboxes } from "./kernel";
import { STRESS_PAGE, checkStressParams, stressPart, verifyStress, type StressParams, type StressSnapshot, type StressVerifyResult } from "./stress";
import type { SpinlockConfig, VcpuBoot, VcpuCommand, VcpuReply, VcpuRun, VcpuWorkloadState } from "./vcpu-protocol";

export type { StressParams, StressSnapshot, StressVerifyResult } from "./stress";

const WORKER_FILE = join(__dirname, "vcpu-worker.ts");
// tsx registers itself per thread: a worker loads it before the .ts entry.
const BOOTSTRAP = `require(${JSON.stringify(require.resolve("tsx/cjs"))}); require(${JSON.stringify(WORKER_FILE)});`;
// A warm vCPU thread: tsx and the vCPU code's modules loaded, waiting for its boot data
// (then it runs vcpu-worker.ts as a fresh one would). An incoming guest keeps a few ready,
// so a migrated VM's vCPUs come up within the downtime without loading any code.
const WARM_MODULES = ["@virtmesh/qspinlock", "@virtmesh/shm", "@virtmesh/virtio-blk", "@virtmesh/virtqueue", join(__dirname, "blk.ts"), join(__dirname, "fio.ts"), join(__dirname, "kernel.ts"), join(__dirname, "stress.ts")];
const WARM_BOOTSTRAP =
  `require(${JSON.stringify(require.resolve("tsx/cjs"))});` +
  WARM_MODULES.map((m) => `require(${JSON.stringify(m)});`).join("") +
  `require("node:worker_threads").parentPort.once("message", (m) => { globalThis.__virtmeshVcpuBoot = m.boot; require(${JSON.stringify(WORKER_FILE)}); });` +
  `require("node:worker_threads").parentPort.postMessage({ type: "warm" });`;

/** Warm vCPU threads of this process, waiting to be adopted by the next GuestVcpus. */
const warmPool: { worker: Worker; ready: Promise<void> }[] = [];

function spawnWarm(): void {
  const worker = new Worker(WARM_BOOTSTRAP, { eval: true });
  const ready = new Promise<void>((resolve, reject) => {
    worker.once("message", () => resolve());
    worker.once("error", reject);
  });
  ready.catch(() => undefined);
  // Idle warm threads never keep the process alive.
  worker.unref();
  worker.once("exit", () => {
    const i = warmPool.findIndex((x) => x.worker === worker);
    if (i >= 0) warmPool.splice(i, 1);
  });
  warmPool.push({ worker, ready });
}

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
  done: Promise<VcpuRunResult>;
  info: FioRunInfo;
}

/** The fio run in progress (also the one restoreWorkloads() brought in). */
export interface FioRunInfo {
  params: FioParams;
  lock: SpinlockConfig;
  runId: number;
  /** vCPUs the run uses: 1..vcpus. */
  vcpus: number;
}

/** What saveWorkloads() encodes (JSON). */
interface SavedWorkloads {
  version: 1;
  stress: { params: StressParams; running: boolean; pagesWrittenBefore: number } | null;
  run: { info: FioRunInfo; cpus: number[]; parts: FioPartial[]; elapsedMs: number } | null;
  vcpus: Array<{ cpu: number; state: VcpuWorkloadState }>;
}

const SAVED_VERSION = 1;
/** QEMU's cpu-throttle-max is 99. */
export const MAX_THROTTLE_PCT = 99;

/** A vCPU of the run failed; the run settled only after every other vCPU stopped. */
export class VcpuRunError extends Error {
  override readonly name = "VcpuRunError";
}

/** The run went on in another process (migrated): this side's vCPUs dropped it (dropWorkloads). */
export class WorkloadsMigratedError extends Error {
  override readonly name = "WorkloadsMigratedError";
}

interface Waiter {
  what: string;
  cpus: Set<number>;
  results: Map<number, VcpuWorkloadState>;
  resolve: (r: Map<number, VcpuWorkloadState>) => void;
  reject: (e: Error) => void;
}

export class GuestVcpus {
  /** Keeps `n` warm vCPU threads ready in this process (an incoming guest's, before its VM arrives). */
  static warm(n: number): void {
    while (warmPool.length < n) spawnWarm();
  }

  /** Ends the warm vCPU threads (shutdown). */
  static async coolDown(): Promise<void> {
    await Promise.all(warmPool.splice(0).map((x) => x.worker.terminate()));
  }

  private readonly workers = new Map<number, Worker>();
  private readonly starting = new Map<number, Promise<void>>();
  private pending: Pending | null = null;
  private gen = 0;
  private closed = false;
  private paused = false;
  private throttlePct = 0;
  private dirtyLogging = false;
  private stress: { params: StressParams; running: boolean; stats: Float64Array; sab: SharedArrayBuffer; pagesWrittenBefore: number } | null = null;
  private rateSamples: Array<{ t: number; pages: number }> = [];
  private rateTimer: NodeJS.Timeout | null = null;
  private waiters = new Set<Waiter>();

  /** @param wake rings the call doorbell halted vCPUs sleep on (the IPI) */
  constructor(
    readonly kernel: GuestKernel,
    private readonly boot: Omit<VcpuBoot, "cpu">,
    private readonly wake: () => void,
  ) {
    // Callers may take these as plain functions (e.g. `const start = vcpus.startStress`).
    this.startStress = this.startStress.bind(this);
    this.stopStress = this.stopStress.bind(this);
    this.stressStatus = this.stressStatus.bind(this);
    this.verifyStress = this.verifyStress.bind(this);
    this.setThrottle = this.setThrottle.bind(this);
    this.setDirtyLogging = this.setDirtyLogging.bind(this);
    this.pause = this.pause.bind(this);
    this.resume = this.resume.bind(this);
    this.saveWorkloads = this.saveWorkloads.bind(this);
    this.restoreWorkloads = this.restoreWorkloads.bind(this);
  }

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
      const warm = warmPool.shift();
      let w: Worker;
      if (warm) {
        w = warm.worker;
        w.ref();
        w.postMessage({ boot: data });
      } else w = new Worker(BOOTSTRAP, { eval: true, workerData: data });
      this.workers.set(cpu, w);
      w.on("message", (m: VcpuReply) => {
        if (m.type === "ready") return resolve();
        if (m.type === "ack" || m.type === "saved") return this.answered(m.cpu, m.type === "ack" ? m.what : "save", m.type === "saved" ? m.state : null);
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
      // Queued until the vCPU listens: it starts with the guest's current settings.
      if (this.throttlePct > 0) this.post(w, { type: "throttle", pct: this.throttlePct });
      if (this.dirtyLogging) this.post(w, { type: "dirty-logging", enabled: true });
      if (this.paused) this.post(w, { type: "pause" });
    });
    this.starting.set(cpu, p);
    return p;
  }

  private post(w: Worker, m: VcpuCommand): void {
    w.postMessage(m);
  }

  /** Sends m to every vCPU in cpus and resolves once each has answered `what` (or fails if one dies). */
  private ask(cpus: number[], what: string, m: (cpu: number) => VcpuCommand): Promise<Map<number, VcpuWorkloadState>> {
    return new Promise((resolve, reject) => {
      const waiter: Waiter = { what, cpus: new Set(cpus), results: new Map(), resolve, reject };
      if (cpus.length === 0) return resolve(waiter.results);
      this.waiters.add(waiter);
      for (const c of cpus) {
        const w = this.workers.get(c);
        if (w) this.post(w, m(c));
        else this.answered(c, what, null, `vCPU ${c} is not running`);
      }
    });
  }

  private answered(cpu: number, what: string, state: VcpuWorkloadState | null, error?: string): void {
    for (const w of this.waiters) {
      if (w.what !== what || !w.cpus.has(cpu)) continue;
      if (error !== undefined) {
        this.waiters.delete(w);
        w.reject(new Error(`${what}: ${error}`));
        continue;
      }
      w.cpus.delete(cpu);
      if (state) w.results.set(cpu, state);
      if (w.cpus.size === 0) {
        this.waiters.delete(w);
        w.resolve(w.results);
      }
    }
  }

  /** vCPU cpu will not report for the current run (it died): count it as failed. */
  private lost(cpu: number, msg: string): void {
    for (const w of this.waiters) if (w.cpus.has(cpu)) this.answered(cpu, w.what, null, msg);
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
    if (this.paused) throw new Error("the guest's vCPUs are paused");
    const n = Math.min(p.numjobs, this.count);
    const cpus = Array.from({ length: n }, (_, i) => i + 1);
    await Promise.all(cpus.map((c) => this.start(c)));
    if (this.closed) throw new Error("the guest's vCPUs are shut down");
    resetMailboxes(this.kernel);
    this.dropped = false;
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
    const done = this.newPending(gen, cpus, [], performance.now(), { params: p, lock, runId, vcpus: n });
    for (const cpu of cpus) {
      const m: VcpuRun = { type: "run", gen, params: p, jobs: jobsOf.get(cpu)!, runId, parent, traceEvery, deadlineEpochMs, lock };
      this.workers.get(cpu)!.postMessage(m);
    }
    try {
      return await done;
    } finally {
      // A run that migrated away keeps its slots: they are the destination's now.
      if (!this.dropped) owner.fill(0);
    }
  }

  private dropped = false;

  private newPending(gen: number, cpus: number[], parts: FioPartial[], t0: number, info: FioRunInfo): Promise<VcpuRunResult> {
    let resolve: (r: VcpuRunResult) => void = () => undefined;
    let reject: (e: Error) => void = () => undefined;
    const done = new Promise<VcpuRunResult>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    this.pending = { gen, cpus: new Set(cpus), parts, errors: [], t0, resolve, reject, done, info };
    return done;
  }

  /** The fio run in progress (on the destination: the one restoreWorkloads() brought), or null. Its promise settles as run()'s would. */
  currentRun(): { info: FioRunInfo; done: Promise<VcpuRunResult> } | null {
    const p = this.pending;
    return p ? { info: p.info, done: p.done } : null;
  }

  // --- The memory-dirtying workload (issue 11; QEMU migration-test's pattern) ---

  /**
   * vCPUs 1..p.vcpus walk [p.addr, p.addr + p.bytes), each its own contiguous
   * part, incrementing the first byte of each page; the first byte of every
   * page is set to 0 first. Resolves once every walker has started.
   */
  async startStress(p: StressParams): Promise<void> {
    if (this.closed) throw new Error("the guest's vCPUs are shut down");
    if (this.paused) throw new Error("the guest's vCPUs are paused");
    if (this.stress?.running) throw new Error("the dirtying workload is already running");
    const bad = checkStressParams(p, this.boot.memoryBytes, this.count);
    if (bad) throw new RangeError(bad);
    const cpus = Array.from({ length: p.vcpus }, (_, i) => i + 1);
    await Promise.all(cpus.map((c) => this.start(c)));
    const sab = new SharedArrayBuffer(8 * 2 * (this.count + 1));
    this.stress = { params: { ...p }, running: true, stats: new Float64Array(sab), sab, pagesWrittenBefore: 0 };
    this.rateSamples = [];
    const ratePagesPerMs = p.rateBytesPerS / STRESS_PAGE / 1000 / p.vcpus;
    await this.ask(cpus, "stress-start", (c) => ({ type: "stress-start", ...stressPart(p, c - 1), ratePagesPerMs, stats: sab }));
    this.startRateSampling();
  }

  /** Stops the walk; resolves once no walker writes any more, with the final figures. */
  async stopStress(): Promise<StressSnapshot> {
    const s = this.stress;
    if (s?.running) {
      await this.ask(this.stressCpus(), "stress-stop", () => ({ type: "stress-stop" }));
      s.running = false;
      this.stopRateSampling();
    }
    return this.stressStatus();
  }

  private stressCpus(): number[] {
    const n = this.stress?.params.vcpus ?? 0;
    return Array.from({ length: n }, (_, i) => i + 1);
  }

  private stressTotals(): { pages: number; passes: number } {
    const s = this.stress;
    if (!s) return { pages: 0, passes: 0 };
    let pages = s.pagesWrittenBefore;
    let passes = Infinity;
    for (let c = 1; c <= s.params.vcpus; c++) {
      pages += s.stats[2 * c]!;
      passes = Math.min(passes, s.stats[2 * c + 1]!);
    }
    return { pages, passes: passes === Infinity ? 0 : passes };
  }

  private startRateSampling(): void {
    this.stopRateSampling();
    this.rateTimer = setInterval(() => {
      const now = performance.now();
      this.rateSamples.push({ t: now, pages: this.stressTotals().pages });
      while (this.rateSamples.length > 0 && this.rateSamples[0]!.t < now - 1500) this.rateSamples.shift();
    }, 100);
    this.rateTimer.unref();
  }

  private stopRateSampling(): void {
    if (this.rateTimer) clearInterval(this.rateTimer);
    this.rateTimer = null;
    this.rateSamples = [];
  }

  stressStatus(): StressSnapshot {
    const s = this.stress;
    const { pages, passes } = this.stressTotals();
    let rate = 0;
    if (s?.running && !this.paused) {
      // Over the last second: from the newest sample at least 1 s old (or the oldest one).
      const now = performance.now();
      let base: { t: number; pages: number } | undefined;
      for (const x of this.rateSamples) {
        if (x.t <= now - 1000) base = x;
        else break;
      }
      base ??= this.rateSamples[0];
      if (base && now - base.t >= 100) rate = ((pages - base.pages) * STRESS_PAGE * 1000) / (now - base.t);
    }
    return {
      running: s?.running ?? false,
      addr: s?.params.addr ?? 0,
      bytes: s?.params.bytes ?? 0,
      vcpus: s?.params.vcpus ?? 0,
      pagesWritten: pages,
      passes,
      dirtyRateBytesPerS: rate,
      throttlePct: this.throttlePct,
    };
  }

  /**
   * migration-test's check_guests_ram() over the working set of the last
   * startStress (or the restored one) in `mem` (guest memory, guest-physical
   * 0 at index 0). Call it with the walk paused or stopped.
   */
  verifyStress(mem: Uint8Array): StressVerifyResult {
    const s = this.stress;
    if (!s) return { pagesChecked: 0, mismatches: 0, firstMismatch: "" };
    return verifyStress(mem, s.params);
  }

  /** Auto-converge (QEMU cpu_throttle_set): every vCPU sleeps pct % of each 10 ms slice. */
  setThrottle(pct: number): void {
    if (!(Number.isInteger(pct) && pct >= 0 && pct <= MAX_THROTTLE_PCT)) throw new RangeError(`throttle ${pct} must be an integer in [0, ${MAX_THROTTLE_PCT}]`);
    this.throttlePct = pct;
    for (const w of this.workers.values()) this.post(w, { type: "throttle", pct });
  }

  get throttle(): number {
    return this.throttlePct;
  }

  /**
   * The sidecar's dirty-logging switch (its "dirty-logging" NATS event), relayed
   * to every vCPU: they log their guest writes in the vCPU dirty log while on.
   */
  setDirtyLogging(enabled: boolean): void {
    this.dirtyLogging = enabled;
    for (const w of this.workers.values()) this.post(w, { type: "dirty-logging", enabled });
  }

  get isPaused(): boolean {
    return this.paused;
  }

  /**
   * Parks every vCPU between two steps of its workloads: the walk writes
   * nothing more, a fio job keeps its requests in flight and submits nothing,
   * and completions stay in the used ring (or the vCPU's mailbox) until
   * resume(). Resolves once all are parked.
   */
  async pause(): Promise<void> {
    if (this.closed) throw new Error("the guest's vCPUs are shut down");
    this.paused = true;
    // vCPUs still starting get the pause queued behind their boot (start()).
    await Promise.all([...this.starting.values()].map((p) => p.catch(() => undefined)));
    await this.ask([...this.workers.keys()], "pause", () => ({ type: "pause" }));
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    for (const w of this.workers.values()) this.post(w, { type: "resume" });
    if (this.stress?.running) this.startRateSampling();
  }

  /** Paused only: the walk's positions, counters and params, and a running fio's state, as one blob. */
  async saveWorkloads(): Promise<Uint8Array> {
    if (!this.paused) throw new Error("saveWorkloads: the vCPUs must be paused first");
    const states = await this.ask([...this.workers.keys()], "save", () => ({ type: "save" }));
    const run = this.pending;
    const s = this.stress;
    const saved: SavedWorkloads = {
      version: SAVED_VERSION,
      stress: s ? { params: s.params, running: s.running, pagesWrittenBefore: s.pagesWrittenBefore } : null,
      run: run ? { info: run.info, cpus: [...run.cpus], parts: run.parts, elapsedMs: performance.now() - run.t0 } : null,
      vcpus: [...states].filter(([, st]) => st.stress !== null || st.fio !== null).map(([cpu, state]) => ({ cpu, state })),
    };
    return new TextEncoder().encode(JSON.stringify(saved));
  }

  /**
   * The incoming side, before resume(): loads what saveWorkloads() saved on
   * the source. The guest kernel memory (this.kernel.sab) must already hold
   * the source's bytes. Leaves the vCPUs paused; a restored fio run is
   * currentRun().
   */
  async restoreWorkloads(state: Uint8Array): Promise<void> {
    if (this.closed) throw new Error("the guest's vCPUs are shut down");
    if (this.pending || this.stress?.running) throw new Error("restoreWorkloads: this guest already runs workloads");
    let saved: SavedWorkloads;
    try {
      saved = JSON.parse(new TextDecoder().decode(state)) as SavedWorkloads;
    } catch (e) {
      throw new Error(`restoreWorkloads: not a saved workload state: ${(e as Error).message}`);
    }
    if (saved.version !== SAVED_VERSION) throw new Error(`restoreWorkloads: state version ${saved.version} is not ${SAVED_VERSION}`);
    for (const v of saved.vcpus) if (!(Number.isInteger(v.cpu) && v.cpu >= 1 && v.cpu <= this.count)) throw new RangeError(`restoreWorkloads: vCPU ${v.cpu} outside 1..${this.count}`);
    this.paused = true;
    const cpus = saved.vcpus.map((v) => v.cpu);
    await Promise.all(cpus.map((c) => this.start(c)));
    const sab = new SharedArrayBuffer(8 * 2 * (this.count + 1));
    if (saved.stress) this.stress = { params: saved.stress.params, running: saved.stress.running, stats: new Float64Array(sab), sab, pagesWrittenBefore: saved.stress.pagesWrittenBefore };
    let gen = 0;
    if (saved.run) {
      gen = ++this.gen;
      this.dropped = false;
      void this.newPending(gen, saved.run.cpus, saved.run.parts, performance.now() - saved.run.elapsedMs, saved.run.info).catch(() => undefined);
    }
    const byCpu = new Map(saved.vcpus.map((v) => [v.cpu, v.state]));
    await this.ask(cpus, "restore", (c) => ({ type: "restore", state: byCpu.get(c)!, gen, stats: sab }));
  }

  /**
   * The source after a successful migration: the workloads go on at the
   * destination, so the vCPUs forget them without touching guest memory or
   * the ring; a fio run in progress rejects with WorkloadsMigratedError.
   */
  async dropWorkloads(): Promise<void> {
    const run = this.pending;
    this.dropped = run !== null;
    await this.ask([...this.workers.keys()], "drop", () => ({ type: "drop" }));
    if (run) {
      this.pending = null;
      run.reject(new WorkloadsMigratedError("the fio run migrated to another host"));
    }
    if (this.stress) this.stress.running = false;
    this.stopRateSampling();
  }

  /** Abandons the current run: vCPUs stop waiting for completions and report what they have. */
  abandon(): void {
    Atomics.store(this.kernel.ctl, CTL_STOP, 1);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.stopRateSampling();
    for (const w of this.waiters) w.reject(new Error(`${w.what}: the guest's vCPUs are shut down`));
    this.waiters.clear();
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
