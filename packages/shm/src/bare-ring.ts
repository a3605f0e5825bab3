// Baselines for the shared-memory virtqueue between two Node processes:
//  - measureBareRing: a bare busy-polled single-producer/single-consumer ring
//    of 64-byte messages over a MAP_SHARED file (the ceiling the virtqueue is
//    held against: "within 10x of bare_ring_msgs_per_s").
//  - measureDoorbellPingPong: round trip of a notification when the other
//    side really sleeps (futex Doorbell sync/async/with spin, or a FIFO).
// This process is one side; it spawns bare-ring-peer.ts as the other.

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from "node:fs";
import { join } from "node:path";
import { Doorbell, mapFile, type SharedMapping } from "./shm";

// Layout of the bench file, in 32-bit words. Producer and consumer indices sit
// 128 bytes apart so they never share a cache line (nor an adjacent-line
// prefetch pair).
export const RING_HEAD = 0; // producer: messages published
export const RING_TAIL = 32; // consumer: messages consumed
export const CTL_READY = 64; // peer: 1 once mapped and polling
export const CTL_DONE = 65; // peer: 1 when finished
export const CTL_CHECK = 66; // peer: payload checksum / error flag
export const PING = 96;
export const PONG = 128;
export const PING_DOORBELL_OFFSET = 1024; // bytes
export const PONG_DOORBELL_OFFSET = 2048; // bytes
export const RING_SLOTS_OFFSET = 4096; // bytes
export const RING_SLOTS = 4096; // power of two
export const MSG_BYTES = 64;
export const MSG_WORDS = MSG_BYTES / 4;
export const BENCH_FILE_BYTES = RING_SLOTS_OFFSET + RING_SLOTS * MSG_BYTES;

const PEER_FILE = join(__dirname, "bare-ring-peer.ts");
const PEER_START_TIMEOUT_MS = 30_000;
/** A busy-poll loop gives up when the peer made no progress for this long (it died or hangs). */
export const STALL_TIMEOUT_MS = 15_000;

function stalled(since: number): boolean {
  return performance.now() - since > STALL_TIMEOUT_MS;
}

export interface BareRingOptions {
  messages: number;
  /** Producer publishes its head index every this many messages (default 1: every message, as a driver would). */
  publishEvery?: number;
  /** Directory for the ring file (default /dev/shm). */
  dir?: string;
}

export interface BareRingResult {
  msgsPerS: number;
  messages: number;
  elapsedMs: number;
  publishEvery: number;
}

export type PingPongMode = "futex-sync" | "futex-async" | "futex-spin" | "fifo";

export interface PingPongOptions {
  rounds: number;
  /**
   * futex-sync (default): both sides block in FUTEX_WAIT on their thread, no spin.
   * futex-async: both sides await spinThenWait (native waiter thread + threadsafe function), no spin.
   * futex-spin: futex-sync with the adaptive spin (default 50 us).
   * fifo: a pair of named pipes, blocking 1-byte write/read.
   */
  mode?: PingPongMode;
  dir?: string;
}

export interface PingPongResult {
  roundTripUs: number;
  rounds: number;
  mode: PingPongMode;
  /** FUTEX_WAKE syscalls this side made per round (0 for fifo). */
  wakeSyscallsPerRound: number;
}

function checkCount(what: string, v: unknown, max: number): number {
  if (typeof v !== "number" || !Number.isInteger(v)) throw new TypeError(`${what} must be an integer`);
  if (v < 1 || v > max) throw new RangeError(`${what} must be in [1, ${max}], got ${v}`);
  return v;
}

interface Peer {
  child: ChildProcess;
  exited: Promise<number | null>;
}

function startPeer(args: string[]): Peer {
  // cwd = the package, so `--import tsx` resolves from the workspace.
  const child = spawn(process.execPath, ["--import", "tsx", PEER_FILE, ...args], {
    cwd: join(__dirname, ".."),
    stdio: ["ignore", "inherit", "inherit"],
  });
  const exited = new Promise<number | null>((resolve) => {
    child.once("exit", (code) => resolve(code));
    child.once("error", () => resolve(-1));
  });
  return { child, exited };
}

async function stopPeer(peer: Peer): Promise<void> {
  if (peer.child.exitCode === null && peer.child.signalCode === null) peer.child.kill("SIGKILL");
  await peer.exited;
}

async function waitForWord(w: Int32Array, index: number, peer: Peer, what: string): Promise<void> {
  const deadline = Date.now() + PEER_START_TIMEOUT_MS;
  let exitCode: number | null | undefined;
  void peer.exited.then((c) => {
    exitCode = c;
  });
  while (Atomics.load(w, index) === 0) {
    if (exitCode !== undefined) throw new Error(`bench peer exited (code ${exitCode}) before ${what}`);
    if (Date.now() > deadline) throw new Error(`bench peer: timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

function benchDir(dir: string | undefined): string {
  return mkdtempSync(join(dir ?? "/dev/shm", "virtmesh-bench-"));
}

/**
 * Bare SPSC ring, busy-polled on both sides: this process produces
 * `messages` 64-byte messages (16 words each, word 0 the sequence number),
 * the peer consumes and verifies them. Timed from the first message to the
 * producer seeing the consumer's tail reach `messages`.
 */
export async function measureBareRing(opts: BareRingOptions): Promise<BareRingResult> {
  const messages = checkCount("measureBareRing: messages", opts.messages, 2 ** 31 - 1);
  const publishEvery = checkCount("measureBareRing: publishEvery", opts.publishEvery ?? 1, RING_SLOTS);
  const dir = benchDir(opts.dir);
  let mapping: SharedMapping | null = null;
  let peer: Peer | null = null;
  try {
    const path = join(dir, "ring");
    mapping = mapFile(path, BENCH_FILE_BYTES, { create: true });
    const w = new Int32Array(mapping.buffer);
    peer = startPeer(["ring-consumer", path, String(messages)]);
    await waitForWord(w, CTL_READY, peer, "ready");

    const mask = RING_SLOTS - 1;
    const slot0 = RING_SLOTS_OFFSET / 4;
    let head = 0;
    let tail = 0;
    const t0 = performance.now();
    let progressAt = t0;
    for (let i = 0; i < messages; i++) {
      if (head - tail >= RING_SLOTS) {
        for (let spins = 1; head - tail >= RING_SLOTS; spins++) {
          tail = Atomics.load(w, RING_TAIL);
          if ((spins & 0xfffff) === 0 && stalled(progressAt)) throw new Error("bare ring: the consumer stopped");
        }
        progressAt = performance.now();
      }
      const b = slot0 + (head & mask) * MSG_WORDS;
      w[b] = i;
      for (let k = 1; k < MSG_WORDS; k++) w[b + k] = i + k;
      head++;
      // The release store that makes the 64 bytes visible before the index.
      if (head % publishEvery === 0) Atomics.store(w, RING_HEAD, head);
    }
    Atomics.store(w, RING_HEAD, head);
    const drainAt = performance.now();
    for (let spins = 1; Atomics.load(w, RING_TAIL) !== messages; spins++) {
      if ((spins & 0xfffff) === 0 && stalled(drainAt)) throw new Error("bare ring: the consumer stopped");
    }
    const elapsedMs = performance.now() - t0;
    await waitForWord(w, CTL_DONE, peer, "done");
    if (Atomics.load(w, CTL_CHECK) !== 0) throw new Error("bare ring: the consumer saw a corrupted or out-of-order message");
    const code = await peer.exited;
    if (code !== 0) throw new Error(`bare ring peer exited with code ${code}`);
    return { msgsPerS: messages / (elapsedMs / 1000), messages, elapsedMs, publishEvery };
  } finally {
    if (peer) await stopPeer(peer);
    mapping?.unmap();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Round trip of a notification between two processes that sleep between rounds. */
export async function measureDoorbellPingPong(opts: PingPongOptions): Promise<PingPongResult> {
  const rounds = checkCount("measureDoorbellPingPong: rounds", opts.rounds, 10_000_000);
  const mode: PingPongMode = opts.mode ?? "futex-sync";
  if (!["futex-sync", "futex-async", "futex-spin", "fifo"].includes(mode)) {
    throw new RangeError(`measureDoorbellPingPong: unknown mode ${String(mode)}`);
  }
  const dir = benchDir(opts.dir);
  let mapping: SharedMapping | null = null;
  let ping: Doorbell | null = null;
  let pong: Doorbell | null = null;
  let peer: Peer | null = null;
  const fds: number[] = [];
  try {
    const path = join(dir, "pingpong");
    mapping = mapFile(path, BENCH_FILE_BYTES, { create: true });
    const w = new Int32Array(mapping.buffer);
    if (mode === "fifo") {
      const a = join(dir, "ping.fifo");
      const b = join(dir, "pong.fifo");
      for (const f of [a, b]) {
        const r = spawnSync("mkfifo", ["-m", "600", f]);
        if (r.status !== 0) throw new Error(`mkfifo ${f} failed: ${String(r.stderr)}`);
      }
      // O_RDWR on a FIFO (Linux) never blocks in open and never sees EOF.
      const pingFd = openSync(a, "r+");
      fds.push(pingFd);
      const pongFd = openSync(b, "r+");
      fds.push(pongFd);
      peer = startPeer(["pingpong", mode, path, String(rounds), a, b]);
      await waitForWord(w, CTL_READY, peer, "ready");
      const one = Buffer.alloc(1);
      const t0 = performance.now();
      for (let r = 0; r < rounds; r++) {
        writeSync(pingFd, one, 0, 1);
        if (readSync(pongFd, one, 0, 1, null) !== 1) throw new Error("fifo: short read");
      }
      const us = ((performance.now() - t0) * 1000) / rounds;
      await waitForWord(w, CTL_DONE, peer, "done");
      return { roundTripUs: us, rounds, mode, wakeSyscallsPerRound: 0 };
    }

    ping = Doorbell.attach(mapping, PING_DOORBELL_OFFSET, true);
    pong = Doorbell.attach(mapping, PONG_DOORBELL_OFFSET, true);
    peer = startPeer(["pingpong", mode, path, String(rounds)]);
    await waitForWord(w, CTL_READY, peer, "ready");
    // A peer that dies mid-run must not leave this side waiting forever:
    // closing the doorbell rejects a pending event-loop wait.
    let finished = false;
    const pongDb = pong;
    void peer.exited.then(() => {
      if (!finished) pongDb.close();
    });
    const maxSpinUs = mode === "futex-spin" ? 50 : 0;
    const t0 = performance.now();
    for (let r = 1; r <= rounds; r++) {
      Atomics.store(w, PING, r);
      ping.ring();
      const answered = (): boolean => Atomics.load(w, PONG) === r;
      if (mode === "futex-async") await pong.spinThenWait(answered, { maxSpinUs });
      else if (!pong.spinThenWaitSync(answered, { maxSpinUs, timeoutMs: STALL_TIMEOUT_MS })) {
        throw new Error(`ping-pong: no answer to round ${r}`);
      }
    }
    const us = ((performance.now() - t0) * 1000) / rounds;
    finished = true;
    await waitForWord(w, CTL_DONE, peer, "done");
    const code = await peer.exited;
    if (code !== 0) throw new Error(`ping-pong peer exited with code ${code}`);
    return { roundTripUs: us, rounds, mode, wakeSyscallsPerRound: ping.counters.wakeSyscalls / rounds };
  } finally {
    if (peer) await stopPeer(peer);
    ping?.close();
    pong?.close();
    for (const fd of fds) closeSync(fd);
    mapping?.unmap();
    rmSync(dir, { recursive: true, force: true });
  }
}
