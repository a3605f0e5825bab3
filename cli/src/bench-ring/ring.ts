// `virtmesh bench ring` (issue 3): the same 64-byte request/response stream
// between two processes over
//   (a) the shared-memory split virtqueue (EVENT_IDX, futex doorbells used only
//       when the other side sleeps),
//   (b) gRPC unary, (c) gRPC bidirectional stream, (d) NATS request/reply,
// plus the ceiling the virtqueue is held against: a bare busy-polled SPSC ring
// between two processes (measureBareRing from @virtmesh/shm).
//
// This process is the client and the virtqueue driver; peer.ts (spawned once)
// is the server of all four transports and the virtqueue device. Every case
// runs twice at the same message size: with IN_FLIGHT requests outstanding
// (the throughput figures and the summary) and with one (the true round-trip
// latency). Each case gets a warm-up run that is not counted.

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { loadavg } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import * as grpc from "@grpc/grpc-js";
import type { NatsConnection } from "@nats-io/transport-node";
import { LatencyHistogram, machineInfo, type BenchResult, type BenchRow } from "@virtmesh/bench";
import { connectNats, drainNats, startNatsServer, type NatsServerHandle } from "@virtmesh/nats";
import { Doorbell, mapFile, measureBareRing, type SharedMapping } from "@virtmesh/shm";
import { DriverQueue, GuestMemory, type BufferSegment } from "@virtmesh/virtqueue";
import {
  CALL_DOORBELL_OFFSET,
  CONTROL_BYTES,
  CTL_DEVICE_RUNNING,
  CTL_STOP,
  ECHO_STREAM_PATH,
  ECHO_UNARY_PATH,
  GUEST_MEMORY_BYTES,
  KICK_DOORBELL_OFFSET,
  MAX_IN_FLIGHT,
  MSG_BYTES,
  MSG_WORDS,
  NATS_ECHO_SUBJECT,
  QUEUE_LAYOUT,
  QUEUE_SIZE,
  REQ_BASE,
  RESP_BASE,
  SHARED_FILE_BYTES,
  STALL_MS,
  rawBuffer,
  type PeerCommand,
  type PeerConfig,
  type PeerMessage,
} from "./wire";

export interface RingBenchOptions {
  quick: boolean;
  onProgress?: (line: string) => void;
  /** Measured milliseconds per case (default 1500 quick, 5000 full). For tests. */
  measureMs?: number;
  /** Warm-up milliseconds per case, not counted (default 300 quick, 1000 full). For tests. */
  warmupMs?: number;
  /** Messages through the bare ring (default: sized by a calibration run to last ~1 s quick, ~3 s full). For tests. */
  bareMessages?: number;
}

/** Requests outstanding in the throughput runs, on every transport. */
export const IN_FLIGHT = 64;
/**
 * In the virtqueue throughput run one request in this many is timestamped
 * (two clock reads and a histogram insert would be a visible share of a
 * sub-microsecond request); every request is timed in all other runs.
 */
export const RING_LATENCY_SAMPLE_EVERY = 16;

const BARE_CALIBRATION_MESSAGES = 500_000;
const BARE_MAX_MESSAGES = 500_000_000;

const PEER_FILE = join(__dirname, "peer.ts");
const REPO_ROOT = resolve(__dirname, "..", "..", "..");
const PEER_START_TIMEOUT_MS = 30_000;
/** Request slots are picked by sequence number; in-order completion (checked) keeps them unique. */
const SLOT_MASK = MAX_IN_FLIGHT - 1;

// ---------------------------------------------------------------------------
// the peer process

class Peer {
  readonly child: ChildProcess;
  readonly exited: Promise<number | null>;
  private exitCode: number | null | undefined;
  private readonly lines: PeerMessage[] = [];
  private waiter: ((m: PeerMessage | null) => void) | null = null;
  private stderrTail = "";

  constructor(cfg: PeerConfig) {
    // cwd = the repository root, so `--require tsx/cjs` and @virtmesh/* resolve.
    this.child = spawn(process.execPath, ["--require", "tsx/cjs", PEER_FILE, JSON.stringify(cfg)], {
      cwd: REPO_ROOT,
      stdio: ["pipe", "pipe", "pipe"],
    });
    this.exited = new Promise((res) => {
      this.child.once("exit", (code, signal) => {
        this.exitCode = code ?? (signal ? -1 : null);
        this.deliver(null);
        res(this.exitCode);
      });
      this.child.once("error", () => {
        this.exitCode = -1;
        this.deliver(null);
        res(-1);
      });
    });
    this.child.stderr?.on("data", (d: Buffer) => {
      this.stderrTail = (this.stderrTail + d.toString()).slice(-2000);
    });
    this.child.stdin?.on("error", () => undefined); // EPIPE after the peer died: reported via exit
    createInterface({ input: this.child.stdout! }).on("line", (line) => {
      let msg: PeerMessage;
      try {
        msg = JSON.parse(line) as PeerMessage;
      } catch {
        this.stderrTail = (this.stderrTail + line + "\n").slice(-2000);
        return;
      }
      this.deliver(msg);
    });
  }

  private deliver(m: PeerMessage | null): void {
    if (m !== null) this.lines.push(m);
    const w = this.waiter;
    if (w && (this.lines.length > 0 || m === null)) {
      this.waiter = null;
      w(this.lines.shift() ?? null);
    }
  }

  get alive(): boolean {
    return this.exitCode === undefined;
  }

  send(cmd: PeerCommand): void {
    if (this.alive) this.child.stdin?.write(JSON.stringify(cmd) + "\n");
  }

  /** The next message of type `type`; throws on an error message, exit or timeout. */
  async next<T extends PeerMessage["type"]>(type: T, timeoutMs: number): Promise<Extract<PeerMessage, { type: T }>> {
    const m = await new Promise<PeerMessage | null>((res, rej) => {
      const queued = this.lines.shift();
      if (queued) return res(queued);
      if (!this.alive) return res(null);
      const t = setTimeout(() => {
        this.waiter = null;
        rej(new Error(`bench peer: no '${type}' message within ${timeoutMs} ms${this.why()}`));
      }, timeoutMs);
      this.waiter = (msg) => {
        clearTimeout(t);
        res(msg);
      };
    });
    if (m === null) throw new Error(`bench peer exited (code ${this.exitCode}) while waiting for '${type}'${this.why()}`);
    if (m.type === "error") throw new Error(`bench peer: ${m.message}`);
    if (m.type !== type) throw new Error(`bench peer: expected '${type}', got '${m.type}'`);
    return m as Extract<PeerMessage, { type: T }>;
  }

  private why(): string {
    const t = this.stderrTail.trim();
    return t ? `: ${t.split("\n").slice(-5).join(" | ")}` : "";
  }

  /** Asks the peer to exit, then kills it if it has not within graceMs. */
  async stop(graceMs = 3000): Promise<void> {
    if (!this.alive) return;
    this.send({ cmd: "exit" });
    this.child.stdin?.end();
    const t = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
    await this.exited;
    clearTimeout(t);
  }
}

// ---------------------------------------------------------------------------
// (a) the shared-memory virtqueue, driver side

interface RingCtx {
  ctl: Int32Array;
  u32: Uint32Array; // guest memory as words (little-endian host, checked by @virtmesh/virtqueue)
  q: DriverQueue;
  kick: Doorbell;
  call: Doorbell;
  readable: BufferSegment[];
  writable: BufferSegment[];
  headSeq: Float64Array;
  sendT: Float64Array;
  hasUsed: () => boolean;
  /** Next request sequence number (continues across runs). */
  seq: number;
}

interface RingRun {
  requests: number;
  elapsedMs: number;
  kickNotifies: number;
  kickSyscalls: number;
  driverSleeps: number;
}

/**
 * Drives the queue for `ms` with `depth` requests outstanding, then drains.
 * Synchronous: the driver polls like a vCPU, sleeping on the call doorbell
 * (spinThenWaitSync) only when it has nothing to reap.
 */
function driveRing(c: RingCtx, depth: number, ms: number, hist: LatencyHistogram, sampleMask: number): RingRun {
  const { u32, q, kick, call, readable, writable, headSeq, sendT } = c;
  // Imported bindings compile (tsx/esbuild, CommonJS) to getter calls on the
  // module object: copy the ones the loop uses into locals.
  const reqBase = REQ_BASE;
  const respBase = RESP_BASE;
  const msgBytes = MSG_BYTES;
  const msgWords = MSG_WORDS;
  const slotMask = SLOT_MASK;
  const base = c.seq;
  const callBefore = call.counters;
  let submitted = 0;
  let completed = 0;
  let kickNotifies = 0;
  let kickSyscalls = 0;
  let stopping = false;
  let iter = 0;
  q.disableCallbacks();
  const t0 = performance.now();
  const deadline = t0 + ms;
  for (;;) {
    if (!stopping) {
      while (submitted - completed < depth) {
        const seq = base + submitted;
        const slot = seq & slotMask;
        const req = reqBase + slot * msgBytes;
        const resp = respBase + slot * msgBytes;
        const rw = req >>> 2;
        for (let k = 0; k < msgWords; k++) u32[rw + k] = seq + k;
        u32[resp >>> 2] = ~seq; // must be overwritten by the echo
        readable[0]!.addr = req;
        writable[0]!.addr = resp;
        const head = q.add(readable, writable);
        if (head < 0) throw new Error(`virtqueue full with ${submitted - completed} of at most ${MAX_IN_FLIGHT} requests outstanding`);
        headSeq[head] = seq;
        if ((seq & sampleMask) === 0) sendT[head] = performance.now();
        submitted++;
      }
      if (q.kickPrepare()) {
        kickNotifies++;
        if (kick.ring()) kickSyscalls++;
      }
    }
    let reaped = 0;
    for (let u = q.popUsed(); u !== null; u = q.popUsed()) {
      const seq = base + completed;
      if (headSeq[u.id] !== seq) throw new Error(`virtqueue: used id ${u.id} carries request ${headSeq[u.id]}, expected ${seq} (reordered)`);
      const rw = (respBase + (seq & slotMask) * msgBytes) >>> 2;
      if (u.len !== msgBytes || u32[rw] !== seq >>> 0 || u32[rw + msgWords - 1] !== (seq + msgWords - 1) >>> 0) {
        throw new Error(`virtqueue: request ${seq}: used len ${u.len}, echo word 0 = ${u32[rw]}`);
      }
      if ((seq & sampleMask) === 0) hist.record((performance.now() - sendT[u.id]!) * 1e6);
      completed++;
      reaped++;
    }
    if (stopping) {
      if (completed === submitted) break;
    } else if ((++iter & 15) === 0 && performance.now() >= deadline) stopping = true;
    if (reaped === 0) {
      // Nothing used yet: ask for an interrupt, re-check (§2.7.14's race), then
      // spin and sleep on the call doorbell.
      if (q.enableCallbacks()) {
        q.disableCallbacks();
        continue;
      }
      if (!call.spinThenWaitSync(c.hasUsed, { timeoutMs: STALL_MS }) && !q.hasUsed()) {
        throw new Error(`virtqueue: no used buffer for ${STALL_MS} ms with ${submitted - completed} outstanding (peer device gone?)`);
      }
      q.disableCallbacks();
    }
  }
  const elapsedMs = performance.now() - t0;
  c.seq = base + completed;
  const callAfter = call.counters;
  return {
    requests: completed,
    elapsedMs,
    kickNotifies,
    kickSyscalls,
    driverSleeps: callAfter.waitSyscalls - callBefore.waitSyscalls,
  };
}

async function until(cond: () => boolean, peer: Peer, what: string): Promise<void> {
  const deadline = Date.now() + PEER_START_TIMEOUT_MS;
  while (!cond()) {
    if (!peer.alive) throw new Error(`bench peer exited while waiting for ${what}`);
    if (Date.now() > deadline) throw new Error(`bench peer: timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** One run of the device loop in the peer around one driver run. */
async function ringRun(c: RingCtx, peer: Peer, depth: number, ms: number, hist: LatencyHistogram, sampleMask: number) {
  Atomics.store(c.ctl, CTL_STOP, 0);
  peer.send({ cmd: "ring" });
  await until(() => Atomics.load(c.ctl, CTL_DEVICE_RUNNING) === 1, peer, "the device loop");
  let run: RingRun;
  try {
    run = driveRing(c, depth, ms, hist, sampleMask);
  } finally {
    // Everything is drained (or we failed): let the device loop return.
    Atomics.store(c.ctl, CTL_STOP, 1);
    c.kick.ring();
  }
  const dev = await peer.next("ring", STALL_MS);
  if (dev.served !== run.requests) throw new Error(`virtqueue: device served ${dev.served} requests, driver completed ${run.requests}`);
  return { run, dev };
}

// ---------------------------------------------------------------------------
// (b), (c), (d): async transports, same window discipline

type Reply = (err: Error | null, reply?: Uint8Array) => void;
type Issue = (seq: number, req: Buffer, reply: Reply) => void;

function makeRequest(seq: number): Buffer {
  const b = Buffer.allocUnsafe(MSG_BYTES);
  for (let k = 0; k < MSG_WORDS; k++) b.writeUInt32LE((seq + k) >>> 0, 4 * k);
  return b;
}

function echoOk(r: Uint8Array | undefined, seq: number): boolean {
  if (!r || r.length !== MSG_BYTES) return false;
  const v = new DataView(r.buffer, r.byteOffset, r.byteLength);
  return v.getUint32(0, true) === seq >>> 0 && v.getUint32(MSG_BYTES - 4, true) === (seq + MSG_WORDS - 1) >>> 0;
}

/** Keeps `depth` requests outstanding for `ms`, then drains. Every reply is timed and checked. */
function windowedRun(depth: number, ms: number, hist: LatencyHistogram, issue: Issue): Promise<{ requests: number; elapsedMs: number }> {
  return new Promise((resolvePromise, reject) => {
    let submitted = 0;
    let completed = 0;
    let stopping = false;
    let failed = false;
    const t0 = performance.now();
    let progressAt = t0;
    const timer = setTimeout(() => {
      stopping = true;
    }, ms);
    // One watchdog per run instead of a deadline per request: a peer that
    // stops answering fails the run after STALL_MS without any reply.
    const watchdog = setInterval(() => {
      if (performance.now() - progressAt > STALL_MS) fail(new Error(`no reply for ${STALL_MS} ms with ${submitted - completed} requests outstanding (peer gone?)`));
    }, 250);
    const fail = (err: Error): void => {
      if (failed) return;
      failed = true;
      clearTimeout(timer);
      clearInterval(watchdog);
      reject(err);
    };
    const sendOne = (): void => {
      const seq = submitted++;
      const req = makeRequest(seq);
      const t = performance.now();
      issue(seq, req, (err, reply) => {
        if (failed) return;
        if (err) return fail(err);
        if (!echoOk(reply, seq)) return fail(new Error(`echo mismatch for request ${seq}`));
        progressAt = performance.now();
        hist.record((progressAt - t) * 1e6);
        completed++;
        if (!stopping) sendOne();
        else if (completed === submitted) {
          clearInterval(watchdog);
          resolvePromise({ requests: completed, elapsedMs: progressAt - t0 });
        }
      });
    };
    for (let i = 0; i < depth; i++) sendOne();
  });
}

function grpcUnaryIssue(client: grpc.Client): Issue {
  return (_seq, req, reply) => {
    client.makeUnaryRequest<Buffer, Buffer>(ECHO_UNARY_PATH, rawBuffer, rawBuffer, req, (err, resp) => reply(err ?? null, resp));
  };
}

/** One bidirectional stream per run; replies come back in order, so a FIFO matches them. */
async function grpcStreamRun(client: grpc.Client, depth: number, ms: number, hist: LatencyHistogram) {
  const stream = client.makeBidiStreamRequest<Buffer, Buffer>(ECHO_STREAM_PATH, rawBuffer, rawBuffer);
  const pending: Reply[] = [];
  let streamError: Error | null = null;
  stream.on("data", (m: Buffer) => {
    const r = pending.shift();
    if (r) r(null, m);
  });
  stream.on("error", (e: Error) => {
    streamError = e;
    for (const r of pending.splice(0)) r(e);
  });
  try {
    const r = await windowedRun(depth, ms, hist, (_seq, req, reply) => {
      if (streamError) return reply(streamError);
      pending.push(reply);
      stream.write(req);
    });
    stream.end(); // half-close; the server ends its side and the call finishes with OK
    return r;
  } catch (err) {
    stream.cancel();
    throw err;
  }
}

function natsIssue(nc: NatsConnection): Issue {
  return (_seq, req, reply) => {
    nc.request(NATS_ECHO_SUBJECT, req, { timeout: STALL_MS }).then(
      (m) => reply(null, m.data),
      (e: unknown) => reply(e instanceof Error ? e : new Error(String(e))),
    );
  };
}

// ---------------------------------------------------------------------------

interface Case {
  transport: string;
  inFlight: number;
  requests: number;
  msgsPerS: number;
  p50Us: number;
  p99Us: number;
  kicksPerRequest: number | null;
  interruptsPerRequest: number | null;
}

const round = (x: number, digits: number): number => Number(x.toFixed(digits));

function caseRow(c: Case): BenchRow {
  return {
    transport: c.transport,
    in_flight: c.inFlight,
    requests: c.requests,
    msgs_per_s: Math.round(c.msgsPerS),
    p50_us: round(c.p50Us, 2),
    p99_us: round(c.p99Us, 2),
    kicks_per_request: c.kicksPerRequest === null ? null : round(c.kicksPerRequest, 6),
    interrupts_per_request: c.interruptsPerRequest === null ? null : round(c.interruptsPerRequest, 6),
  };
}

const fmtRate = (x: number): string => (x >= 1e6 ? `${(x / 1e6).toFixed(2)} M` : `${(x / 1e3).toFixed(1)} k`);

function shmParent(): string {
  const d = process.env.VIRTMESH_SHM_DIR;
  return d && d.length > 0 ? d : "/dev/shm";
}

/** Best-effort step of the cleanup: remembers the first failure, never skips the rest. */
async function step(errors: unknown[], fn: () => unknown): Promise<void> {
  try {
    await fn();
  } catch (err) {
    errors.push(err);
  }
}

export async function runRingBench(opts: RingBenchOptions): Promise<BenchResult> {
  const progress = opts.onProgress ?? (() => undefined);
  const measureMs = opts.measureMs ?? (opts.quick ? 1500 : 5000);
  const warmupMs = opts.warmupMs ?? (opts.quick ? 300 : 1000);
  const bareTargetMs = opts.quick ? 1000 : 3000;
  for (const [k, v] of [["measureMs", measureMs], ["warmupMs", warmupMs], ["bareMessages", opts.bareMessages ?? 1]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`runRingBench: ${k} must be a positive integer, got ${v}`);
  }

  // Busy-polling figures depend on having the two cores to ourselves: record how busy the machine was.
  const loadBefore = loadavg()[0]!;

  // The ceiling first, while nothing else runs: a bare SPSC ring, both sides
  // busy-polling. Sized from a calibration run (which also warms up) to last
  // about bareTargetMs, so a slow or busy machine cannot blow the time budget.
  let bareMessages = opts.bareMessages;
  if (bareMessages === undefined) {
    const cal = await measureBareRing({ messages: BARE_CALIBRATION_MESSAGES });
    bareMessages = Math.max(BARE_CALIBRATION_MESSAGES, Math.min(BARE_MAX_MESSAGES, Math.round((cal.msgsPerS * bareTargetMs) / 1000)));
  }
  progress(`bare busy-polled ring: ${bareMessages} messages of ${MSG_BYTES} bytes...`);
  const bare = await measureBareRing({ messages: bareMessages });
  progress(`bare busy-polled ring: ${fmtRate(bare.msgsPerS)} msgs/s`);

  const cases: Case[] = [];
  const ringDetail: Record<string, unknown> = {};
  const dir = mkdtempSync(join(shmParent(), "virtmesh-bench-"));
  let natsServer: NatsServerHandle | null = null;
  let mapping: SharedMapping | null = null;
  let kick: Doorbell | null = null;
  let call: Doorbell | null = null;
  let peer: Peer | null = null;
  let client: grpc.Client | null = null;
  let nc: NatsConnection | undefined;
  let failure: unknown = null;
  try {
    natsServer = await startNatsServer();
    const sharedPath = join(dir, "guest-memory");
    mapping = mapFile(sharedPath, SHARED_FILE_BYTES, { create: true });
    kick = Doorbell.attach(mapping, KICK_DOORBELL_OFFSET, true);
    call = Doorbell.attach(mapping, CALL_DOORBELL_OFFSET, true);
    const mem = new GuestMemory(mapping.buffer, { byteOffset: CONTROL_BYTES, size: GUEST_MEMORY_BYTES });
    // The driver initialises the rings before the device process exists.
    const q = new DriverQueue(mem, { ...QUEUE_LAYOUT, eventIdx: true });
    const ctx: RingCtx = {
      ctl: new Int32Array(mapping.buffer, 0, CONTROL_BYTES / 4),
      u32: new Uint32Array(mapping.buffer, CONTROL_BYTES, GUEST_MEMORY_BYTES / 4),
      q,
      kick,
      call,
      readable: [{ addr: REQ_BASE, len: MSG_BYTES }],
      writable: [{ addr: RESP_BASE, len: MSG_BYTES }],
      headSeq: new Float64Array(QUEUE_SIZE).fill(-1),
      sendT: new Float64Array(QUEUE_SIZE),
      hasUsed: () => q.hasUsed(),
      seq: 0,
    };

    progress("starting the peer process (virtqueue device, gRPC server, NATS responder)...");
    peer = new Peer({ sharedPath, natsUrl: natsServer.url });
    const ready = await peer.next("ready", PEER_START_TIMEOUT_MS);

    // (a) virtqueue
    const sampleMaskWindow = RING_LATENCY_SAMPLE_EVERY - 1;
    for (const depth of [IN_FLIGHT, 1]) {
      const sampleMask = depth === 1 ? 0 : sampleMaskWindow;
      await ringRun(ctx, peer, depth, warmupMs, new LatencyHistogram(), sampleMask);
      const hist = new LatencyHistogram();
      const { run, dev } = await ringRun(ctx, peer, depth, measureMs, hist, sampleMask);
      const c: Case = {
        transport: "shm virtqueue",
        inFlight: depth,
        requests: run.requests,
        msgsPerS: run.requests / (run.elapsedMs / 1000),
        p50Us: hist.percentileUs(50),
        p99Us: hist.percentileUs(99),
        kicksPerRequest: run.kickSyscalls / run.requests,
        interruptsPerRequest: dev.interruptSyscalls / run.requests,
      };
      cases.push(c);
      ringDetail[`in_flight_${depth}`] = {
        requests: run.requests,
        latency_samples: hist.count,
        kick_notifications: run.kickNotifies,
        kick_syscalls: run.kickSyscalls,
        interrupt_notifications: dev.interruptsNeeded,
        interrupt_syscalls: dev.interruptSyscalls,
        driver_sleeps: run.driverSleeps,
        device_sleeps: dev.deviceSleeps,
      };
      progress(
        `shm virtqueue in_flight=${depth}: ${fmtRate(c.msgsPerS)} msgs/s, p50 ${c.p50Us.toFixed(2)} us, p99 ${c.p99Us.toFixed(2)} us, ` +
          `kicks/req ${c.kicksPerRequest!.toFixed(4)}, interrupts/req ${c.interruptsPerRequest!.toFixed(4)}`,
      );
    }

    // (b), (c) gRPC over loopback TCP
    client = new grpc.Client(`127.0.0.1:${ready.grpcPort}`, grpc.credentials.createInsecure());
    const grpcClient = client;
    await new Promise<void>((res, rej) => grpcClient.waitForReady(Date.now() + STALL_MS, (err) => (err ? rej(err) : res())));
    // (d) NATS, through the nats-server started above
    nc = await connectNats(natsServer.url, "virtmesh-bench-ring");
    const natsConn = nc;

    const asyncCases: Array<[string, (depth: number, ms: number, h: LatencyHistogram) => Promise<{ requests: number; elapsedMs: number }>]> = [
      ["gRPC unary", (d, ms, h) => windowedRun(d, ms, h, grpcUnaryIssue(grpcClient))],
      ["gRPC bidi stream", (d, ms, h) => grpcStreamRun(grpcClient, d, ms, h)],
      ["NATS request/reply", (d, ms, h) => windowedRun(d, ms, h, natsIssue(natsConn))],
    ];
    for (const [transport, run] of asyncCases) {
      for (const depth of [IN_FLIGHT, 1]) {
        await run(depth, warmupMs, new LatencyHistogram());
        const hist = new LatencyHistogram();
        const r = await run(depth, measureMs, hist);
        const c: Case = {
          transport,
          inFlight: depth,
          requests: r.requests,
          msgsPerS: r.requests / (r.elapsedMs / 1000),
          p50Us: hist.percentileUs(50),
          p99Us: hist.percentileUs(99),
          kicksPerRequest: null,
          interruptsPerRequest: null,
        };
        cases.push(c);
        progress(`${transport} in_flight=${depth}: ${fmtRate(c.msgsPerS)} msgs/s, p50 ${c.p50Us.toFixed(1)} us, p99 ${c.p99Us.toFixed(1)} us`);
      }
    }
  } catch (err) {
    failure = err;
  } finally {
    const errors: unknown[] = [];
    if (peer?.alive && mapping?.mapped) {
      // A failed driver may have left the device loop polling: release it.
      await step(errors, () => {
        Atomics.store(new Int32Array(mapping!.buffer, 0, CONTROL_BYTES / 4), CTL_STOP, 1);
        kick?.ring();
      });
    }
    await step(errors, () => client?.close());
    await step(errors, () => drainNats(nc));
    await step(errors, () => peer?.stop());
    await step(errors, () => natsServer?.stop());
    await step(errors, () => kick?.close());
    await step(errors, () => call?.close());
    await step(errors, () => mapping?.unmap());
    await step(errors, () => rmSync(dir, { recursive: true, force: true }));
    if (failure === null && errors.length > 0) failure = errors[0];
  }
  if (failure !== null) throw failure;

  const find = (t: string, d: number): Case => {
    const c = cases.find((x) => x.transport === t && x.inFlight === d);
    if (!c) throw new Error(`bench ring: case ${t} in_flight=${d} missing`);
    return c;
  };
  const ring = find("shm virtqueue", IN_FLIGHT);
  const ring1 = find("shm virtqueue", 1);
  const unary = find("gRPC unary", IN_FLIGHT);
  const unary1 = find("gRPC unary", 1);
  const stream = find("gRPC bidi stream", IN_FLIGHT);
  const natsCase = find("NATS request/reply", IN_FLIGHT);

  const rows: BenchRow[] = cases.map(caseRow);
  rows.push({
    transport: "bare busy-polled ring (one-way)",
    in_flight: null,
    requests: bare.messages,
    msgs_per_s: Math.round(bare.msgsPerS),
    p50_us: null,
    p99_us: null,
    kicks_per_request: null,
    interrupts_per_request: null,
  });

  return {
    bench: "ring",
    machine: machineInfo(),
    params: {
      quick: opts.quick,
      load_average_1m_at_start: round(loadBefore, 2),
      load_average_1m_at_end: round(loadavg()[0]!, 2),
      message_bytes: MSG_BYTES,
      in_flight: IN_FLIGHT,
      latency_in_flight: 1,
      measure_ms_per_case: measureMs,
      warmup_ms_per_case: warmupMs,
      queue_size: QUEUE_SIZE,
      event_idx: true,
      doorbell: "futex on a shared word (@virtmesh/shm Doorbell), rung only when the other side published that it sleeps; waits are spinThenWaitSync (adaptive spin, max 50 us)",
      ring_latency_sample_every: RING_LATENCY_SAMPLE_EVERY,
      bare_ring_messages: bare.messages,
      bare_ring_publish_every: bare.publishEvery,
      grpc: "@grpc/grpc-js over loopback TCP, hand-defined RingEcho service with raw 64-byte Buffer messages",
      nats: `nats-server started for the run, request/reply on ${NATS_ECHO_SUBJECT}`,
      ring_detail: ringDetail,
      notes: [
        `msgs_per_s is completed round trips (request + 64-byte response) per second with in_flight requests outstanding; the summary's *_msgs_per_s come from the in_flight=${IN_FLIGHT} rows.`,
        `p50/p99 are round trips: at in_flight=1 the unloaded latency, at in_flight=${IN_FLIGHT} the latency under load (queueing included); shm virtqueue at in_flight=${IN_FLIGHT} times 1 request in ${RING_LATENCY_SAMPLE_EVERY}.`,
        "kicks_per_request / interrupts_per_request count doorbell rings that made a FUTEX_WAKE syscall (the other side was asleep), per request; EVENT_IDX-requested notifications that found the other side polling cost no syscall and are listed in ring_detail.",
        "bare_ring_msgs_per_s is one-way messages (no response), both processes busy-polling, from measureBareRing (@virtmesh/shm).",
        "Both sides poll while requests flow, so the figures assume each process gets a core; load_average_1m_* records how busy the machine was (busy-polled figures, the bare ring most of all, collapse when the cores are shared).",
      ],
    },
    rows,
    summary: {
      ring_msgs_per_s: Math.round(ring.msgsPerS),
      grpc_msgs_per_s: Math.round(unary.msgsPerS),
      grpc_stream_msgs_per_s: Math.round(stream.msgsPerS),
      nats_msgs_per_s: Math.round(natsCase.msgsPerS),
      kicks_per_request: round(ring.kicksPerRequest!, 6),
      interrupts_per_request: round(ring.interruptsPerRequest!, 6),
      bare_ring_msgs_per_s: Math.round(bare.msgsPerS),
      ring_rtt_p50_us: round(ring1.p50Us, 2),
      ring_rtt_p99_us: round(ring1.p99Us, 2),
      grpc_rtt_p50_us: round(unary1.p50Us, 2),
      ring_over_grpc: round(ring.msgsPerS / unary.msgsPerS, 2),
      bare_ring_over_ring: round(bare.msgsPerS / ring.msgsPerS, 2),
      goal_ring_20x_grpc: ring.msgsPerS >= 20 * unary.msgsPerS,
      goal_ring_within_10x_bare: bare.msgsPerS <= 10 * ring.msgsPerS,
    },
    reference: {
      source: "BRIEF.md, Figures to beat: shared-memory ring",
      bare_ring_msgs_per_s: 38_000_000,
      bare_ring_note: "single-producer ring over mmap between two Node processes, busy poll, 64-byte messages: ~38 M msgs/s",
      process_send_ipc_msgs_per_s: 124_000,
      futex_ping_pong_us: 15.6,
      goals: { ring_over_grpc_unary_at_least: 20, bare_ring_over_ring_at_most: 10 },
    },
  };
}
