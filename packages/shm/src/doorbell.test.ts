import assert from "node:assert/strict";
import { existsSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { DOORBELL_BYTES, Doorbell, mapFile, type SharedMapping } from "./index";
import { STATE_BYTES, ST_ACK, ST_GO, ST_STOP, ST_WORK, startChild, tempShmDir, type TestChild } from "./test-support";

const dir = tempShmDir();
const children: TestChild[] = [];
const doorbells: Doorbell[] = [];
const mappings: SharedMapping[] = [];
let n = 0;

after(async () => {
  await Promise.all(children.map((c) => c.kill()));
  for (const d of doorbells) d.close();
  for (const m of mappings) m.unmap();
  rmSync(dir, { recursive: true, force: true });
});

interface Setup {
  st: Int32Array;
  db: Doorbell;
  statePath: string;
  dbPath: string;
}

function setup(): Setup {
  const statePath = join(dir, `state${n}`);
  const dbPath = join(dir, `db${n++}`);
  const m = mapFile(statePath, STATE_BYTES, { create: true });
  mappings.push(m);
  const db = Doorbell.create(dbPath);
  doorbells.push(db);
  return { st: new Int32Array(m.buffer), db, statePath, dbPath };
}

function spawnChild(args: string[], ipc = false): TestChild {
  const c = startChild(args, { ipc });
  children.push(c);
  return c;
}

/** utime + stime of a process, in clock ticks (/proc/<pid>/stat fields 14, 15). */
function cpuTicks(pid: number | undefined): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(f[11]) + Number(f[12]);
}

/** Polls cond on the event loop (the child is another process). */
async function until(cond: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** Busy-waits (this thread) for cond, failing instead of hanging. */
function spinUntil(cond: () => boolean, what: string, timeoutMs = 20_000): void {
  const deadline = performance.now() + timeoutMs;
  for (let i = 0; !cond(); i++) {
    if ((i & 1023) === 0 && performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
  }
}

describe("Doorbell across processes", { concurrency: true }, () => {
  test("ring() wakes a process sleeping in FUTEX_WAIT, with one syscall", async () => {
    const { st, db, statePath, dbPath } = setup();
    const child = spawnChild(["consumer", statePath, dbPath, "sync", "0"]);
    await child.waitFor((m) => m.ready === true, "ready");
    await until(() => db.peerSleeping, "the consumer to sleep");
    // Asleep means off the CPU: no spinning while idle.
    const cpu0 = cpuTicks(child.proc.pid);
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(cpuTicks(child.proc.pid) - cpu0 <= 5, "an idle consumer uses (almost) no CPU");
    Atomics.store(st, ST_WORK, 1);
    assert.equal(db.ring(), true, "a sleeping consumer needs the syscall");
    await until(() => Atomics.load(st, ST_ACK) === 1, "the consumer to wake and ack");
    Atomics.store(st, ST_STOP, 1);
    db.ring();
    const done = await child.waitFor((m) => m.done === true, "done");
    assert.equal(done.consumed, 1);
    assert.ok((done.counters as { wakeups: number }).wakeups >= 1);
    assert.ok(db.counters.wakeSyscalls >= 1);
    assert.equal(await child.exited, 0);
  });

  test("an event-loop consumer parked in wait keeps serving its loop and is woken", async () => {
    const { st, db, statePath, dbPath } = setup();
    const child = spawnChild(["consumer", statePath, dbPath, "async", "0"], true);
    await child.waitFor((m) => m.ready === true, "ready");
    await until(() => db.peerSleeping, "the consumer to park");
    const pong = new Promise((resolve) => child.proc.once("message", resolve));
    child.proc.send("ping");
    assert.deepEqual(await pong, { pong: 1 }, "the parked consumer's event loop answers IPC");
    Atomics.store(st, ST_WORK, 1);
    db.ring();
    await until(() => Atomics.load(st, ST_ACK) === 1, "the consumer to wake and ack");
    Atomics.store(st, ST_STOP, 1);
    db.ring();
    assert.equal((await child.waitFor((m) => m.done === true, "done")).consumed, 1);
    assert.equal(await child.exited, 0);
  });

  test("a waiter on this event loop is woken by another process without blocking the loop", async () => {
    const { st, db, statePath, dbPath } = setup();
    const child = spawnChild(["ringer", statePath, dbPath]);
    await child.waitFor((m) => m.ready === true, "ready");
    // The ringer waits for ST_GO, which only a timer on this loop raises: if
    // the wait blocked the loop, the ring would never come.
    setTimeout(() => Atomics.store(st, ST_GO, 1), 5);
    await db.spinThenWait(() => Atomics.load(st, ST_WORK) === 1, { maxSpinUs: 0 });
    const rang = await child.waitFor((m) => m.rang === true, "rang");
    assert.equal(rang.syscall, true);
    assert.ok(db.counters.wakeups >= 1);
    assert.equal(await child.exited, 0);
  });

  test("a busy consumer is never kicked: rings make no syscall", async () => {
    const { st, db, statePath, dbPath } = setup();
    const child = spawnChild(["busy-consumer", statePath, dbPath]);
    await child.waitFor((m) => m.ready === true, "ready");
    const items = 20_000;
    let syscalls = 0;
    for (let i = 1; i <= items; i++) {
      Atomics.store(st, ST_WORK, i);
      if (db.ring()) syscalls++;
      if ((i & 255) === 0) spinUntil(() => Atomics.load(st, ST_ACK) === i, "acks");
    }
    Atomics.store(st, ST_STOP, 1);
    const done = await child.waitFor((m) => m.done === true, "done");
    assert.equal(done.consumed, items);
    assert.equal(syscalls, 0);
    assert.equal(db.counters.rings, items);
    assert.equal(db.counters.wakeSyscalls, 0);
    assert.equal(await child.exited, 0);
  });

  for (const [flavour, spin] of [
    ["sync", "0"],
    ["sync", "20"],
    ["async", "0"],
  ] as const) {
    test(`no lost wake-ups: a ${flavour} consumer (spin ${spin} us) that sleeps whenever idle gets every item`, async () => {
      const { st, db, statePath, dbPath } = setup();
      const child = spawnChild(["consumer", statePath, dbPath, flavour, spin]);
      await child.waitFor((m) => m.ready === true, "ready");
      const items = 10_000;
      for (let i = 1; i <= items; i++) {
        Atomics.store(st, ST_WORK, i);
        db.ring();
        // Mostly lock-step (the consumer goes idle after every item, racing
        // its sleep against the next ring), every 8th item a burst.
        if (i % 8 !== 0) spinUntil(() => Atomics.load(st, ST_ACK) === i, `ack ${i}`);
      }
      spinUntil(() => Atomics.load(st, ST_ACK) === items, "the last ack");
      Atomics.store(st, ST_STOP, 1);
      db.ring();
      const done = await child.waitFor((m) => m.done === true, "done");
      assert.equal(done.consumed, items);
      assert.equal(await child.exited, 0);
      assert.ok(db.counters.wakeSyscalls <= items + 1);
    });
  }
});

describe("Doorbell lifecycle and checks", () => {
  test("close rejects a pending wait, removes the file, and the process exits by itself", async () => {
    const dbPath = join(dir, "closing");
    const child = spawnChild(["close-and-exit", dbPath]);
    const closed = await child.waitFor((m) => m.closed === true, "closed");
    assert.equal(closed.rejected, "wait: doorbell closed");
    assert.equal(await child.exited, 0, "no thread or handle keeps the process alive");
    assert.equal(existsSync(dbPath), false);
  });

  test("close in this process: idempotent, unlinks what it created, unpins an attached mapping", async () => {
    const path = join(dir, "local");
    const db = Doorbell.create(path);
    const peer = Doorbell.open(path);
    const waiting = peer.wait();
    db.ring();
    await waiting;
    assert.equal(peer.counters.wakeups, 1);
    peer.close();
    db.close();
    db.close();
    assert.equal(existsSync(path), false);
    assert.throws(() => db.ring(), /closed/);
    await assert.rejects(db.wait(), /closed/);

    const m = mapFile(join(dir, "region"), 4096, { create: true });
    mappings.push(m);
    const a = Doorbell.attach(m, 64, true);
    assert.throws(() => m.unmap(), /doorbell/);
    const b = Doorbell.attach(m, 64, false);
    assert.equal(b.waitSync(0), false, "nobody rang: times out");
    assert.equal(b.counters.timeouts, 1);
    a.close();
    b.close();
    m.unmap();
    assert.equal(m.mapped, false);
  });

  test("a parked event-loop wait survives garbage collection of every other reference", async () => {
    setFlagsFromString("--expose-gc");
    const gc = runInNewContext("gc") as () => void;
    const path = join(dir, "gc");
    const ringer = Doorbell.create(path);
    doorbells.push(ringer);
    let woke = false;
    (() => {
      // Only the pending promise chain refers to this doorbell.
      const db = Doorbell.open(path);
      void db.wait().then(() => {
        woke = true;
        db.close();
      });
    })();
    for (let i = 0; i < 3; i++) {
      gc();
      await new Promise((r) => setTimeout(r, 5));
    }
    assert.equal(ringer.ring(), true);
    await until(() => woke, "the collected-looking waiter to wake");
  });

  test("bad arguments and uninitialised doorbells are rejected", () => {
    const m = mapFile(join(dir, "checks"), 4096, { create: true });
    mappings.push(m);
    assert.throws(() => Doorbell.attach(m, 8, true), RangeError);
    assert.throws(() => Doorbell.attach(m, 4096 - DOORBELL_BYTES + 16, true), RangeError);
    assert.throws(() => Doorbell.attach(m, -16, true), RangeError);
    assert.throws(() => Doorbell.attach(m, 1.5, true), TypeError);
    assert.throws(() => Doorbell.attach({} as SharedMapping, 0, true), TypeError);
    assert.throws(() => Doorbell.attach(m, 0, false), /no initialised doorbell/);
    assert.throws(() => Doorbell.open(join(dir, "checks")), /no initialised doorbell/);
    assert.throws(() => Doorbell.open(join(dir, "missing")), (e: NodeJS.ErrnoException) => e.code === "ENOENT");
    const db = Doorbell.attach(m, 0, true);
    doorbells.push(db);
    assert.throws(() => db.waitSync("1" as unknown as number), TypeError);
    assert.throws(() => db.spinThenWaitSync(() => true, { maxSpinUs: -1 }), RangeError);
    assert.throws(() => db.spinThenWaitSync(() => true, { maxSpinUs: 0.5 }), TypeError);
    assert.equal(db.spinThenWaitSync(() => false, { maxSpinUs: 0, timeoutMs: 0 }), false);
    assert.equal(db.peerSleeping, false, "a timed-out wait withdraws its sleeping mark");
  });
});
