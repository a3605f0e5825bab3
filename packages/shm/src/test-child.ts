// Child process for the tests (spawned by test-support.ts, never imported).
// Each command prints JSON lines on stdout; "ready" once it is set up.

import { Doorbell, mapFile } from "./shm";
import { STATE_BYTES, ST_ACK, ST_GO, ST_STOP, ST_WORK } from "./test-support";

function say(msg: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify(msg) + "\n");
}


function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

const commands: Record<string, (args: string[]) => Promise<void> | void> = {
  // Maps an existing file, writes its marker, waits for the parent's marker.
  "map-write": ([path, size]) => {
    const m = mapFile(path, Number(size));
    const w = new Int32Array(m.buffer);
    Atomics.store(w, 1, 0x0c0ffee);
    say({ ready: true });
    while (Atomics.load(w, 2) !== 0x0beef) sleepMs(1);
    say({ sawParent: true, parentWord: Atomics.load(w, 2) });
    m.unmap();
  },

  // Atomics.add on word 1, `iters` times, after the parent raises word 0.
  "atomics-add": ([path, iters]) => {
    const m = mapFile(path, 4096);
    const w = new Int32Array(m.buffer);
    say({ ready: true });
    while (Atomics.load(w, 0) === 0) {
      // spin: start together with the parent
    }
    const n = Number(iters);
    for (let i = 0; i < n; i++) Atomics.add(w, 1, 1);
    say({ done: true });
    m.unmap();
  },

  // Reads a range of an existing file and reports whether it is all zeros.
  "read-zero": ([path, size, offset, length]) => {
    const m = mapFile(path, Number(size));
    const b = new Uint8Array(m.buffer, Number(offset), Number(length));
    say({ zero: b.every((x) => x === 0) });
    m.unmap();
  },

  // Consumes posted items: spinThenWaitSync (sync) or spinThenWait (async)
  // with the given spin bound; acks each; stops when ST_STOP is raised and
  // everything posted has been consumed. Reports the doorbell counters.
  consumer: async ([statePath, dbPath, flavour, maxSpinUs]) => {
    const m = mapFile(statePath, STATE_BYTES);
    const st = new Int32Array(m.buffer);
    const db = Doorbell.open(dbPath);
    const spin = { maxSpinUs: Number(maxSpinUs) };
    let consumed = 0;
    const ready = (): boolean => Atomics.load(st, ST_WORK) !== consumed || Atomics.load(st, ST_STOP) !== 0;
    let pings = 0;
    process.on("message", () => {
      // Answering IPC while parked in the async wait proves the loop is free.
      pings++;
      process.send?.({ pong: pings });
    });
    say({ ready: true });
    for (;;) {
      if (flavour === "async") await db.spinThenWait(ready, spin);
      else db.spinThenWaitSync(ready, spin);
      const posted = Atomics.load(st, ST_WORK);
      while (consumed !== posted) {
        consumed++;
        Atomics.store(st, ST_ACK, consumed);
      }
      if (Atomics.load(st, ST_STOP) !== 0 && Atomics.load(st, ST_WORK) === consumed) break;
    }
    say({ done: true, consumed, counters: db.counters });
    db.close();
    m.unmap();
    process.disconnect?.();
  },

  // A consumer that never sleeps: busy-polls until ST_STOP.
  "busy-consumer": ([statePath, dbPath]) => {
    const m = mapFile(statePath, STATE_BYTES);
    const st = new Int32Array(m.buffer);
    const db = Doorbell.open(dbPath);
    say({ ready: true });
    let consumed = 0;
    while (Atomics.load(st, ST_STOP) === 0 || Atomics.load(st, ST_WORK) !== consumed) {
      const posted = Atomics.load(st, ST_WORK);
      while (consumed !== posted) {
        consumed++;
        Atomics.store(st, ST_ACK, consumed);
      }
    }
    say({ done: true, consumed, counters: db.counters });
    db.close();
    m.unmap();
  },

  // Rings a doorbell once the parent raises ST_GO (after publishing ST_WORK).
  ringer: ([statePath, dbPath]) => {
    const m = mapFile(statePath, STATE_BYTES);
    const st = new Int32Array(m.buffer);
    const db = Doorbell.open(dbPath);
    say({ ready: true });
    while (Atomics.load(st, ST_GO) === 0) sleepMs(1);
    // Ring only once the parent sleeps, so the wake needs the syscall.
    while (!db.peerSleeping) sleepMs(1);
    Atomics.store(st, ST_WORK, 1);
    const syscall = db.ring();
    say({ rang: true, syscall, counters: db.counters });
    db.close();
    m.unmap();
  },

  // Creates a doorbell, parks an event-loop wait on it, closes it and then
  // must exit by itself: nothing (thread, handle) may keep the process alive.
  "close-and-exit": async ([dbPath]) => {
    const db = Doorbell.create(dbPath);
    const waiting = db.wait();
    await new Promise((r) => setTimeout(r, 20));
    db.close();
    let rejected = "";
    try {
      await waiting;
    } catch (err) {
      rejected = (err as Error).message;
    }
    say({ closed: true, rejected });
  },
};

async function main(): Promise<void> {
  const [cmd, ...args] = process.argv.slice(2);
  const fn = commands[cmd];
  if (!fn) throw new Error(`test-child: unknown command ${cmd}`);
  await fn(args);
}

main().catch((err: unknown) => {
  process.stderr.write(String((err as Error)?.stack ?? err) + "\n");
  process.exit(1);
});
