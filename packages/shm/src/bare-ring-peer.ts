// The other process of bare-ring.ts's measurements (spawned by it, never
// imported). Usage:
//   bare-ring-peer.ts ring-consumer <file> <messages>
//   bare-ring-peer.ts pingpong <mode> <file> <rounds> [pingFifo pongFifo]

import { closeSync, openSync, readFileSync, readSync, writeSync } from "node:fs";
import {
  BENCH_FILE_BYTES,
  CTL_CHECK,
  CTL_DONE,
  CTL_READY,
  MSG_WORDS,
  PING,
  PING_DOORBELL_OFFSET,
  PONG,
  PONG_DOORBELL_OFFSET,
  RING_HEAD,
  RING_SLOTS,
  RING_SLOTS_OFFSET,
  RING_TAIL,
} from "./bare-ring";
import { Doorbell, mapFile } from "./shm";

// If the measuring process dies, this one must not keep burning a core: our
// parent pid changes when we are reparented (process.ppid is a snapshot in
// Node 20, so read it from /proc; called rarely).
function currentPpid(): number {
  const stat = readFileSync("/proc/self/stat", "utf8");
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
}
const parentPid = currentPpid();
function orphaned(): boolean {
  return currentPpid() !== parentPid;
}
setInterval(() => {
  if (orphaned()) process.exit(2);
}, 500).unref();

function ringConsumer(path: string, messages: number): void {
  const mapping = mapFile(path, BENCH_FILE_BYTES);
  const w = new Int32Array(mapping.buffer);
  const mask = RING_SLOTS - 1;
  const slot0 = RING_SLOTS_OFFSET / 4;
  let tail = 0;
  let bad = 0;
  Atomics.store(w, CTL_READY, 1);
  for (let polls = 1; tail < messages; polls++) {
    if ((polls & 0xfffff) === 0 && orphaned()) process.exit(2);
    const head = Atomics.load(w, RING_HEAD);
    while (tail !== head) {
      const b = slot0 + (tail & mask) * MSG_WORDS;
      // Read the whole 64-byte message: word 0 is the sequence, word k is seq+k.
      let sum = 0;
      for (let k = 1; k < MSG_WORDS; k++) sum += w[b + k] - k;
      bad |= (w[b] ^ tail) | (sum - (MSG_WORDS - 1) * tail);
      tail++;
    }
    Atomics.store(w, RING_TAIL, tail);
  }
  Atomics.store(w, CTL_CHECK, bad === 0 ? 0 : 1);
  Atomics.store(w, CTL_DONE, 1);
  mapping.unmap();
}

async function pingpong(mode: string, path: string, rounds: number, fifos: string[]): Promise<void> {
  const mapping = mapFile(path, BENCH_FILE_BYTES);
  const w = new Int32Array(mapping.buffer);
  if (mode === "fifo") {
    const pingFd = openSync(fifos[0], "r+");
    const pongFd = openSync(fifos[1], "r+");
    const one = Buffer.alloc(1);
    Atomics.store(w, CTL_READY, 1);
    for (let r = 0; r < rounds; r++) {
      if (readSync(pingFd, one, 0, 1, null) !== 1) throw new Error("fifo: short read");
      writeSync(pongFd, one, 0, 1);
    }
    closeSync(pingFd);
    closeSync(pongFd);
  } else {
    const ping = Doorbell.attach(mapping, PING_DOORBELL_OFFSET, false);
    const pong = Doorbell.attach(mapping, PONG_DOORBELL_OFFSET, false);
    const maxSpinUs = mode === "futex-spin" ? 50 : 0;
    Atomics.store(w, CTL_READY, 1);
    for (let r = 1; r <= rounds; r++) {
      const asked = (): boolean => Atomics.load(w, PING) === r;
      if (mode === "futex-async") await ping.spinThenWait(asked, { maxSpinUs });
      else while (!ping.spinThenWaitSync(asked, { maxSpinUs, timeoutMs: 1000 })) if (orphaned()) process.exit(2);
      Atomics.store(w, PONG, r);
      pong.ring();
    }
    ping.close();
    pong.close();
  }
  Atomics.store(w, CTL_DONE, 1);
  mapping.unmap();
}

async function main(): Promise<void> {
  const [cmd, ...rest] = process.argv.slice(2);
  if (cmd === "ring-consumer") ringConsumer(rest[0], Number(rest[1]));
  else if (cmd === "pingpong") await pingpong(rest[0], rest[1], Number(rest[2]), rest.slice(3));
  else throw new Error(`bare-ring-peer: unknown command ${String(cmd)}`);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
