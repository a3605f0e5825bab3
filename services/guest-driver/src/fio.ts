// The guest's fio-like workload over the virtio-blk driver: numjobs jobs, each
// with iodepth requests in flight on its own region [job * size, (job+1) * size)
// of the disk, sequential or random, one pass over the region or until the
// runtime ends. With verify=crc32c every block written is self-describing
// (@virtmesh/virtio-blk verify blocks) and every block read is checked: corrupt,
// misplaced, never-written and stale (lost-write) blocks are reported with their
// offset. Write jobs with verify read their region back afterwards (fio's verify
// phase); every job that wrote ends with a FLUSH.
//
// Jobs run on the guest's vCPU threads (vcpus.ts): FioVcpu is what one vCPU
// runs for its jobs, step by step, taking its completions from the interrupt
// handler one by one; mergeOutcome() adds up what the vCPUs report.
import { randomBytes } from "node:crypto";
import { performance } from "node:perf_hooks";
import { LatencyHistogram } from "@virtmesh/bench";
import { VERIFY_HEADER_BYTES, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, checkVerifyBlock, fillVerifyBlock } from "@virtmesh/virtio-blk";
import type { VirtioBlkDriver } from "./blk";

export type RwMode = "read" | "write" | "randread" | "randwrite" | "randrw";
export const RW_MODES: readonly RwMode[] = ["read", "write", "randread", "randwrite", "randrw"];

export interface FioParams {
  rw: RwMode;
  bs: number;
  iodepth: number;
  numjobs: number;
  size: number;
  runtimeMs: number;
  verify: "" | "crc32c";
  rwmixRead: number;
}

export interface FioOutcome {
  readIos: number;
  writeIos: number;
  readBytes: number;
  writeBytes: number;
  iops: number;
  mbPerS: number;
  latP50Us: number;
  latP99Us: number;
  latP999Us: number;
  verifyErrors: number;
  verifyFailures: string[];
  runtimeMs: number;
}

export const MAX_REPORTED_FAILURES = 100;
/** Blocks one job may cover: it keeps a generation, a busy flag and an order entry per block. */
export const MAX_BLOCKS_PER_JOB = 1 << 22;
/** Sampled requests one vCPU keeps per run for the RunFio trace. */
export const MAX_SAMPLED_REQUESTS = 1000;

/** The sampled RunFio call a run's sampled requests are children of. */
export interface TraceParent {
  traceId: string;
  traceFlags: number;
}

/** A sampled request, recorded on a vCPU; the boot CPU turns it into a span under spanId. */
export interface SampledRequest {
  spanId: string;
  name: string;
  /** Epoch milliseconds (comparable across threads). */
  startMs: number;
  endMs: number;
  offset: number;
  bytes: number;
  job: number;
  status: number;
}

/** What one vCPU reports for its jobs. */
export interface FioPartial {
  readIos: number;
  writeIos: number;
  readBytes: number;
  writeBytes: number;
  errors: number;
  failures: string[];
  /** Latency histogram, LatencyHistogram.encode(). */
  hist: string;
  spans: SampledRequest[];
  /** The run was abandoned (CTL_STOP) before its jobs finished. */
  stopped: boolean;
  /** Requests still in flight when this vCPU gave up draining an abandoned run (0 normally). */
  inflight: number;
}

/** How long an abandoned run waits for its in-flight requests before it reports them lost. */
export const DRAIN_MS = 5000;

export interface FioEnv {
  driver: VirtioBlkDriver;
  /** Guest address of slot s's data buffer: dataBase + s * maxBs. */
  dataBase: number;
  maxBs: number;
  /** Slots [0, slots) the workload may use. */
  slots: number;
  diskBytes: number;
  /** Trace one request in every `traceEvery` (0: none), when the RunFio call is sampled. */
  traceEvery: number;
}

/** The job owning workload slot `slot` (jobs use consecutive runs of iodepth slots). */
export const jobOfSlot = (p: FioParams, slot: number): number => Math.floor(slot / p.iodepth);

/** Checks a request against the VM; returns an error message or null. */
export function checkFioParams(p: FioParams, env: FioEnv): string | null {
  if (!RW_MODES.includes(p.rw)) return `rw '${p.rw}' is not one of ${RW_MODES.join("|")}`;
  if (!(Number.isInteger(p.bs) && p.bs >= 512 && p.bs % 512 === 0 && p.bs <= env.maxBs)) return `bs ${p.bs} must be a multiple of 512 in [512, ${env.maxBs}]`;
  if (p.verify && p.bs < VERIFY_HEADER_BYTES) return `bs ${p.bs} is too small for verify headers`;
  if (!(Number.isInteger(p.iodepth) && p.iodepth >= 1)) return `iodepth ${p.iodepth} must be >= 1`;
  if (!(Number.isInteger(p.numjobs) && p.numjobs >= 1)) return `numjobs ${p.numjobs} must be >= 1`;
  if (p.iodepth * p.numjobs > env.slots) return `iodepth x numjobs = ${p.iodepth * p.numjobs} exceeds the ${env.slots} requests the queue can hold`;
  if (!(Number.isSafeInteger(p.size) && p.size >= p.bs && p.size % p.bs === 0)) return `size ${p.size} must be a positive multiple of bs ${p.bs}`;
  if (p.size * p.numjobs > env.diskBytes) return `numjobs x size = ${p.size * p.numjobs} exceeds the disk's ${env.diskBytes} bytes`;
  if (p.size / p.bs > MAX_BLOCKS_PER_JOB) return `size / bs = ${p.size / p.bs} blocks per job exceeds ${MAX_BLOCKS_PER_JOB} (a job keeps state per block): use a larger bs or a smaller size`;
  if (p.verify !== "" && p.verify !== "crc32c") return `verify '${p.verify}' is not crc32c`;
  if (!(p.rwmixRead >= 0 && p.rwmixRead <= 100)) return `rwmix_read ${p.rwmixRead} must be in [0, 100]`;
  if (!(p.runtimeMs >= 0)) return `runtime ${p.runtimeMs} must be >= 0`;
  return null;
}

/** xorshift32: deterministic, allocation-free randomness for offsets and read/write mix. */
class Rng {
  constructor(public s: number) {
    if (this.s === 0) this.s = 0x2545f491;
  }
  next(): number {
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.s = x >>> 0;
    return this.s;
  }
  below(n: number): number {
    return this.next() % n;
  }
}

type Phase = "main" | "verify" | "flush" | "done";

class Job {
  readonly blocks: number;
  readonly base: number;
  readonly gen: Uint32Array;
  readonly busy: Uint8Array;
  readonly order: Uint32Array | null;
  phase: Phase = "main";
  cursor = 0;
  issued = 0;
  inflight = 0;
  wrote = false;
  readonly slotBlock: Int32Array;
  readonly slotWrite: Uint8Array;
  readonly slotT0: Float64Array;
  readonly slotSpan: Array<SampledRequest | null>;
  private readonly rng: Rng;
  get rngState(): number {
    return this.rng.s;
  }
  set rngState(v: number) {
    this.rng.s = v >>> 0 || 0x2545f491;
  }

  constructor(
    readonly run: Run,
    readonly index: number,
    readonly firstSlot: number,
  ) {
    const p = run.p;
    this.blocks = p.size / p.bs;
    this.base = index * p.size;
    this.gen = new Uint32Array(this.blocks);
    this.busy = new Uint8Array(this.blocks);
    this.rng = new Rng((run.runId ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0);
    if (p.rw === "randread" || p.rw === "randwrite") {
      const o = new Uint32Array(this.blocks);
      for (let i = 0; i < o.length; i++) o[i] = i;
      for (let i = o.length - 1; i > 0; i--) {
        const j = this.rng.below(i + 1);
        const t = o[i]!;
        o[i] = o[j]!;
        o[j] = t;
      }
      this.order = o;
    } else this.order = null;
    this.slotBlock = new Int32Array(p.iodepth).fill(-1);
    this.slotWrite = new Uint8Array(p.iodepth);
    this.slotT0 = new Float64Array(p.iodepth);
    this.slotSpan = new Array<SampledRequest | null>(p.iodepth).fill(null);
  }

  get done(): boolean {
    return this.phase === "done";
  }

  start(): void {
    for (let i = 0; i < this.run.p.iodepth; i++) this.issue(i);
    this.run.env.driver.notify();
    this.maybeAdvance();
  }

  /** Picks and submits the next I/O on local slot i; false if this phase has nothing left. */
  issue(i: number): boolean {
    const p = this.run.p;
    let blk = -1;
    let isWrite = false;
    if (this.phase === "main") {
      if (this.issued >= this.blocks || this.run.timeUp()) return false;
      if (p.rw === "randrw") {
        blk = this.rng.below(this.blocks);
        // One request per block at a time, so verify can expect the last generation.
        for (let k = 0; k < this.blocks && this.busy[blk] === 1; k++) blk = (blk + 1) % this.blocks;
        if (this.busy[blk] === 1) return false;
        isWrite = this.rng.below(100) >= p.rwmixRead;
      } else {
        blk = this.order ? this.order[this.issued]! : this.issued;
        isWrite = p.rw === "write" || p.rw === "randwrite";
      }
      this.issued++;
    } else if (this.phase === "verify") {
      while (this.cursor < this.blocks && this.gen[this.cursor] === 0) this.cursor++;
      if (this.cursor >= this.blocks) return false;
      blk = this.cursor++;
    } else return false;

    const slot = this.firstSlot + i;
    const env = this.run.env;
    const data = env.dataBase + slot * env.maxBs;
    const off = this.base + blk * p.bs;
    if (isWrite) {
      const g = this.gen[blk]! + 1;
      this.gen[blk] = g;
      if (p.verify) {
        fillVerifyBlock(env.driver.mem.bytes, data, p.bs, off, { generation: g, run: this.run.runId, job: this.index });
        env.driver.mem.vcpu.markDirty(data, p.bs);
      }
      this.wrote = true;
    }
    this.busy[blk] = 1;
    this.slotBlock[i] = blk;
    this.slotWrite[i] = isWrite ? 1 : 0;
    this.slotT0[i] = performance.now();
    this.inflight++;
    const sampled = this.run.sampled();
    let spanId = "";
    if (sampled) {
      // A sampled request: its span id rides the head's trace slot to the host now;
      // the span itself is recorded by the boot CPU after the run (startSpanWithId).
      spanId = newSpanId();
      env.driver.traceNext(this.run.parent!.traceId, spanId, this.run.parent!.traceFlags);
    }
    if (!env.driver.submit(slot, isWrite ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, off / 512, data, p.bs)) {
      throw new Error("virtqueue full: more requests than descriptors");
    }
    if (sampled) {
      const rec: SampledRequest = { spanId, name: `virtio-blk ${isWrite ? "OUT" : "IN"}`, startMs: performance.timeOrigin + this.slotT0[i]!, endMs: 0, offset: off, bytes: p.bs, job: this.index, status: -1 };
      this.slotSpan[i] = rec;
      if (this.run.spans.length < MAX_SAMPLED_REQUESTS) this.run.spans.push(rec);
    }
    return true;
  }

  complete(i: number, status: number): void {
    const run = this.run;
    const p = run.p;
    this.inflight--;
    const slot = this.firstSlot + i;
    if (this.phase === "flush") {
      if (status !== VIRTIO_BLK_S_OK) run.fail(`job ${this.index}: FLUSH failed with status ${status}`);
      this.phase = "done";
      return;
    }
    const blk = this.slotBlock[i]!;
    const isWrite = this.slotWrite[i] === 1;
    const off = this.base + blk * p.bs;
    const now = performance.now();
    run.hist.record((now - this.slotT0[i]!) * 1e6);
    const span = this.slotSpan[i];
    if (span) {
      span.endMs = performance.timeOrigin + now;
      span.status = status;
      this.slotSpan[i] = null;
    }
    this.busy[blk] = 0;
    if (isWrite) {
      run.writeIos++;
      run.writeBytes += p.bs;
    } else {
      run.readIos++;
      run.readBytes += p.bs;
    }
    if (status !== VIRTIO_BLK_S_OK) {
      run.fail(`offset ${off}: ${isWrite ? "write" : "read"} failed with status ${status}`);
    } else if (!isWrite && p.verify) {
      const g = this.gen[blk]!;
      // Pure read jobs check any earlier run's blocks; mixed jobs check only what they wrote.
      if (g !== 0 || p.rw === "read" || p.rw === "randread") {
        const bad = checkVerifyBlock(run.env.driver.mem.bytes, run.env.dataBase + slot * run.env.maxBs, p.bs, off, { generation: g, run: g ? run.runId : 0 });
        if (bad) run.fail(bad);
      }
    }
    this.issue(i);
    this.maybeAdvance();
  }

  private maybeAdvance(): void {
    if (this.inflight > 0) return;
    const p = this.run.p;
    if (this.phase === "main" && p.verify && this.wrote && (p.rw === "write" || p.rw === "randwrite")) {
      this.phase = "verify";
      this.cursor = 0;
      let any = false;
      for (let i = 0; i < p.iodepth; i++) any = this.issue(i) || any;
      this.run.env.driver.notify();
      if (any) return;
    }
    if ((this.phase === "main" || this.phase === "verify") && this.wrote) {
      // fio's end_fsync: what was written is on the disk before the job reports.
      this.phase = "flush";
      this.inflight++;
      this.run.env.driver.submit(this.firstSlot, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
      this.run.env.driver.notify();
      return;
    }
    if (this.phase !== "done" && this.phase !== "flush") this.phase = "done";
  }
}

function newSpanId(): string {
  for (;;) {
    const id = randomBytes(8).toString("hex");
    if (id !== "0000000000000000") return id;
  }
}

class Run {
  readIos = 0;
  writeIos = 0;
  readBytes = 0;
  writeBytes = 0;
  errors = 0;
  readonly failures: string[] = [];
  readonly hist = new LatencyHistogram();
  readonly spans: SampledRequest[] = [];
  readonly deadline: number;
  requests = 0;
  private readonly traceOn: boolean;

  constructor(
    readonly p: FioParams,
    readonly env: FioEnv,
    readonly runId: number,
    /** The sampled RunFio call, or null. */
    readonly parent: TraceParent | null,
    /** performance.now() at which the main phase stops issuing (runtime), or Infinity. */
    deadline: number,
  ) {
    this.traceOn = env.traceEvery > 0 && parent !== null;
    this.deadline = deadline;
  }
  /** Whether the next request is sampled (1 in traceEvery, only inside a sampled RunFio). */
  sampled(): boolean {
    return this.traceOn && ++this.requests % this.env.traceEvery === 0;
  }
  timeUp(): boolean {
    return performance.now() >= this.deadline;
  }
  fail(msg: string): void {
    this.errors++;
    if (this.failures.length < MAX_REPORTED_FAILURES) this.failures.push(msg);
  }
}

/** A fresh non-zero run id: verify headers name the run that wrote a block. */
export function newRunId(): number {
  return ((Math.random() * 0xfffffffe) >>> 0) + 1;
}

/** A job's state across a migration (what its vCPU cannot rebuild). */
interface JobState {
  index: number;
  phase: Phase;
  cursor: number;
  issued: number;
  inflight: number;
  wrote: boolean;
  rng: number;
  /** Verify map: the last generation written per block (Uint32Array, base64). */
  gen: string;
  /** Blocks with a request in flight (Uint8Array, base64). */
  busy: string;
  slotBlock: number[];
  slotWrite: number[];
  /** Submission times, epoch ms (comparable across threads and processes). */
  slotT0Epoch: number[];
  /** Index in spans of the slot's sampled request in flight, or -1. */
  slotSpan: number[];
}

/** One vCPU's part of a fio run, as saved by FioVcpu.save() (JSON-safe). */
export interface FioVcpuState {
  p: FioParams;
  runId: number;
  parent: TraceParent | null;
  traceEvery: number;
  deadlineEpochMs: number | null;
  readIos: number;
  writeIos: number;
  readBytes: number;
  writeBytes: number;
  errors: number;
  failures: string[];
  hist: string;
  spans: SampledRequest[];
  requests: number;
  stopped: boolean;
  jobs: JobState[];
}

const b64 = (a: Uint8Array | Uint32Array): string => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString("base64");
function fromB64<T extends Uint8Array | Uint32Array>(s: string, into: T): T {
  const b = Buffer.from(s, "base64");
  if (b.length !== into.byteLength) throw new RangeError(`saved fio state: ${b.length} bytes where ${into.byteLength} are expected`);
  new Uint8Array(into.buffer, into.byteOffset, into.byteLength).set(b);
  return into;
}

/**
 * What one vCPU runs for its fio jobs, one step at a time: start() submits the
 * first requests, deliver() takes one completion (slot << 8 | status) and
 * submits what comes next. The vCPU thread interleaves the steps with its
 * other work (the dirtying walk), parks between two of them (pause), and can
 * save() the whole run between two steps to go on in another process
 * (restore()): positions, the verify map, counters, the latency histogram and
 * which slots are in flight (those requests complete there, through the used
 * ring and the guest kernel's maps, which migrate with guest memory).
 */
export class FioVcpu {
  readonly run: Run;
  readonly jobs = new Map<number, Job>();
  private active = 0;
  /** Abandoned (CTL_STOP): issue nothing more, take back what is in flight until drainUntil. */
  stopped = false;
  private drainUntil = 0;

  constructor(p: FioParams, env: FioEnv, jobIndexes: readonly number[], runId: number, parent: TraceParent | null, deadlineMs: number) {
    this.run = new Run(p, env, runId, parent, deadlineMs);
    for (const j of jobIndexes) this.jobs.set(j, new Job(this.run, j, j * p.iodepth));
  }

  start(): void {
    for (const job of this.jobs.values()) job.start();
    this.count();
  }

  private count(): void {
    let a = 0;
    for (const job of this.jobs.values()) if (!job.done) a++;
    this.active = a;
  }

  get inflight(): number {
    let n = 0;
    for (const job of this.jobs.values()) n += job.inflight;
    return n;
  }

  /** Every job finished, or (abandoned) every request came back or the drain time is over. */
  finished(now: number): boolean {
    if (!this.stopped) return this.active === 0;
    return this.inflight === 0 || now >= this.drainUntil;
  }

  /** Stops issuing; what is in flight is waited for up to DRAIN_MS from now. */
  abandon(now: number): void {
    if (this.stopped) return;
    this.stopped = true;
    this.drainUntil = now + DRAIN_MS;
  }

  /** One completion for this vCPU: slot << 8 | status. */
  deliver(c: number): void {
    const p = this.run.p;
    const slot = c >>> 8;
    const job = this.jobs.get(jobOfSlot(p, slot));
    if (this.stopped) {
      if (job !== undefined && job.inflight > 0) job.inflight--;
      return;
    }
    if (job === undefined || job.done) throw new Error(`completion for slot ${slot}, which no running job of this vCPU owns`);
    job.complete(slot % p.iodepth, c & 0xff);
    if (job.done) this.active--;
  }

  partial(): FioPartial {
    const run = this.run;
    return {
      readIos: run.readIos,
      writeIos: run.writeIos,
      readBytes: run.readBytes,
      writeBytes: run.writeBytes,
      errors: run.errors,
      failures: run.failures,
      hist: run.hist.encode(),
      spans: run.spans,
      stopped: this.stopped,
      inflight: this.stopped ? this.inflight : 0,
    };
  }

  save(): FioVcpuState {
    const run = this.run;
    const spanIndex = (s: SampledRequest | null): number => (s === null ? -1 : run.spans.indexOf(s));
    return {
      p: run.p,
      runId: run.runId,
      parent: run.parent,
      traceEvery: run.env.traceEvery,
      deadlineEpochMs: run.deadline === Infinity ? null : performance.timeOrigin + run.deadline,
      readIos: run.readIos,
      writeIos: run.writeIos,
      readBytes: run.readBytes,
      writeBytes: run.writeBytes,
      errors: run.errors,
      failures: run.failures,
      hist: run.hist.encode(),
      spans: run.spans,
      requests: run.requests,
      stopped: this.stopped,
      jobs: [...this.jobs.values()].map((j) => ({
        index: j.index,
        phase: j.phase,
        cursor: j.cursor,
        issued: j.issued,
        inflight: j.inflight,
        wrote: j.wrote,
        rng: j.rngState,
        gen: b64(j.gen),
        busy: b64(j.busy),
        slotBlock: Array.from(j.slotBlock),
        slotWrite: Array.from(j.slotWrite),
        slotT0Epoch: Array.from(j.slotT0, (t) => performance.timeOrigin + t),
        slotSpan: j.slotSpan.map(spanIndex),
      })),
    };
  }

  /** The run saved by save(), on this vCPU (env: this process's driver and buffers), ready for the next step. */
  static restore(s: FioVcpuState, env: FioEnv): FioVcpu {
    env.traceEvery = s.traceEvery;
    const deadline = s.deadlineEpochMs === null ? Infinity : s.deadlineEpochMs - performance.timeOrigin;
    // Job constructors rebuild the shuffled order from the run id (deterministic); the rest is overwritten.
    const f = new FioVcpu(s.p, env, s.jobs.map((j) => j.index), s.runId, s.parent, deadline);
    const run = f.run;
    run.readIos = s.readIos;
    run.writeIos = s.writeIos;
    run.readBytes = s.readBytes;
    run.writeBytes = s.writeBytes;
    run.errors = s.errors;
    run.failures.push(...s.failures);
    run.hist.merge(s.hist);
    run.spans.push(...s.spans);
    run.requests = s.requests;
    for (const js of s.jobs) {
      const j = f.jobs.get(js.index)!;
      j.phase = js.phase;
      j.cursor = js.cursor;
      j.issued = js.issued;
      j.inflight = js.inflight;
      j.wrote = js.wrote;
      j.rngState = js.rng;
      fromB64(js.gen, j.gen);
      fromB64(js.busy, j.busy);
      j.slotBlock.set(js.slotBlock);
      j.slotWrite.set(js.slotWrite);
      j.slotT0.set(js.slotT0Epoch.map((t) => t - performance.timeOrigin));
      js.slotSpan.forEach((k, i) => (j.slotSpan[i] = k >= 0 ? (run.spans[k] ?? null) : null));
    }
    f.stopped = s.stopped;
    if (f.stopped) f.drainUntil = performance.now() + DRAIN_MS;
    f.count();
    return f;
  }
}

/** Adds up the vCPUs' reports of one run that took elapsedMs. */
export function mergeOutcome(parts: readonly FioPartial[], elapsedMs: number): FioOutcome {
  const hist = new LatencyHistogram();
  let readIos = 0;
  let writeIos = 0;
  let readBytes = 0;
  let writeBytes = 0;
  let errors = 0;
  const failures: string[] = [];
  for (const r of parts) {
    readIos += r.readIos;
    writeIos += r.writeIos;
    readBytes += r.readBytes;
    writeBytes += r.writeBytes;
    errors += r.errors;
    for (const f of r.failures) if (failures.length < MAX_REPORTED_FAILURES) failures.push(f);
    hist.merge(r.hist);
  }
  const elapsed = Math.max(elapsedMs, 0.001);
  return {
    readIos,
    writeIos,
    readBytes,
    writeBytes,
    iops: (readIos + writeIos) / (elapsed / 1000),
    mbPerS: (readBytes + writeBytes) / 1e6 / (elapsed / 1000),
    latP50Us: hist.percentileUs(50),
    latP99Us: hist.percentileUs(99),
    latP999Us: hist.percentileUs(99.9),
    verifyErrors: errors,
    verifyFailures: failures,
    runtimeMs: Math.round(elapsed),
  };
}
