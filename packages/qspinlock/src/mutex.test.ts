// Mutual exclusion: vCPU threads bump a shared counter with a plain
// read-modify-write under the lock; any overlap of critical sections loses
// increments. Heavy contention: 3x more vCPUs than the machine has cores.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { availableParallelism } from "node:os";
import { VcpuPool, runLockWorkload } from "./workload";
import { createGuestLock, guestLockBytes } from "./guest-lock";
import { MAX_NODES, _Q_LOCKED_VAL, encodeTail, lockWordIndex, tailToNode } from "./layout";
import { LockSpace } from "./lockspace";
import type { LockKind } from "./ticket";

const VCPUS = Math.max(4, 3 * availableParallelism());

describe("mutual exclusion under heavy contention", () => {
  let pool: VcpuPool;
  before(async () => {
    pool = await VcpuPool.start(VCPUS);
  });
  after(async () => {
    await pool.terminate();
  });

  const modes: Array<{ lock: LockKind; pv: boolean; unfair?: boolean }> = [
    { lock: "ticket", pv: false },
    { lock: "ticket", pv: true },
    { lock: "queue", pv: false },
    { lock: "queue", pv: true },
    { lock: "queue", pv: false, unfair: true },
    { lock: "queue", pv: true, unfair: true },
  ];
  for (const m of modes) {
    it(`${m.lock} lock, PV ${m.pv ? "on" : "off"}${m.unfair ? ", unfair" : ""}: the counter ends exact`, async () => {
      // Time-bounded: each vCPU stops after its current round once the budget
      // is spent, so the count of rounds varies but must match the counter.
      const r = await runLockWorkload({ pool, ...m, vcpus: VCPUS, iterations: 50_000, criticalSectionWork: 20, budgetMs: 800, timeoutMs: 20_000 });
      assert.equal(r.error, null);
      assert.ok(r.ok);
      assert.ok(r.ops > VCPUS, `only ${r.ops} rounds`);
      assert.equal(r.counter, r.ops);
      assert.equal(r.stats.acquired, r.ops);
      assert.ok(r.stats.lockSlowpath > 0, "the run was contended");
      if (!m.pv) assert.equal(r.stats.hvBlocks + r.stats.haltQhead + r.stats.haltQnode + r.stats.ticketHalt, 0, "no halts with PV off");
      assert.equal(pool.mainLock().isLocked(), false, "lock released at the end");
    });
  }

  it("reports the steady state: rounds after every vCPU had its first turn, to the end of the run", async () => {
    for (const pv of [false, true]) {
      const r = await runLockWorkload({ pool, lock: "queue", pv, vcpus: VCPUS, iterations: 50_000, budgetMs: 300, timeoutMs: 20_000 });
      assert.equal(r.error, null);
      if (!r.acquiredPerVcpu.every((n) => n > 0)) {
        // A vCPU thread that got no host core before the budget ran out never contended.
        assert.equal(r.steadyOps, 0);
        assert.equal(r.steadyMs, 0);
        continue;
      }
      assert.ok(r.steadyMs > 0 && r.steadyMs <= r.elapsedMs + 1, `steady ${r.steadyMs} ms of ${r.elapsedMs}`);
      assert.ok(r.steadyOps >= 0 && r.steadyOps <= r.ops, `steady ops ${r.steadyOps} of ${r.ops}`);
      // The first turns of all vCPUs but the last fall before the steady state.
      assert.ok(r.ops - r.steadyOps >= VCPUS, `${r.ops - r.steadyOps} start-up rounds`);
    }
  });

  it("every vCPU runs all its rounds when there is no budget (2 vCPUs per core)", async () => {
    for (const lock of ["ticket", "queue"] as const) {
      const r = await runLockWorkload({ pool, lock, pv: true, vcpus: 2 * availableParallelism(), iterations: 300, timeoutMs: 20_000 });
      assert.equal(r.error, null);
      assert.equal(r.counter, r.vcpus * 300);
      assert.deepEqual(r.acquiredPerVcpu, new Array(r.vcpus).fill(300));
    }
  });
});

describe("vCPU runner", () => {
  it("pins vCPU threads to fewer host cores and validates its options", async () => {
    const pool = await VcpuPool.start(4);
    try {
      const r = await runLockWorkload({ pool, lock: "queue", pv: true, vcpus: 4, hostCores: 1, iterations: 200, timeoutMs: 20_000 });
      assert.equal(r.error, null);
      assert.equal(r.hostCores, 1);
      assert.equal(r.overcommit, 4);
      assert.equal(r.counter, 800);
      await assert.rejects(runLockWorkload({ pool, lock: "queue", pv: true, vcpus: 2, hostCores: 0, iterations: 1 }), /hostCores/);
      await assert.rejects(runLockWorkload({ pool, lock: "mcs" as LockKind, pv: true, vcpus: 2, iterations: 1 }), /ticket.*queue/);
      await assert.rejects(runLockWorkload({ pool, lock: "queue", pv: true, vcpus: 0, iterations: 1 }), /vcpus/);
    } finally {
      await pool.terminate();
    }
  });
});

describe("lock API", () => {
  it("encodes the tail as (cpu + 1, idx) like the kernel", () => {
    assert.equal(encodeTail(0, 0), 1 << 18);
    assert.equal(encodeTail(3, 2), (4 << 18) | (2 << 16));
    for (const [cpu, idx] of [[0, 0], [5, 3], [16382, 1]] as const) assert.equal(tailToNode(encodeTail(cpu, idx)), cpu * MAX_NODES + idx);
  });

  it("createGuestLock lays out the region once and attaches afterwards", () => {
    const sab = new SharedArrayBuffer(128 + guestLockBytes(4));
    const a = createGuestLock("queue", true, sab, 128, { maxCpus: 4 });
    a.lock(0);
    const b = createGuestLock("queue", true, sab, 128);
    assert.equal(b.space.maxCpus, 4);
    assert.ok(b.isLocked());
    assert.equal(b.trylock(1), false);
    a.unlock(0);
    assert.equal(b.trylock(1), true);
    assert.equal(Atomics.load(a.space.i32, lockWordIndex(0)), _Q_LOCKED_VAL);
    b.unlock(1);
    assert.equal(a.isLocked(), false);
    assert.equal(a.space.stats().acquired, 2);
  });

  it("ticket lock hands out tickets in order and wraps the 16-bit head", () => {
    for (const pv of [false, true]) {
      const sab = new SharedArrayBuffer(guestLockBytes(2));
      const l = createGuestLock("ticket", pv, sab, 0, { maxCpus: 2 });
      for (let i = 0; i < 70_000; i++) {
        l.lock(i & 1);
        assert.ok(l.isLocked());
        l.unlock(i & 1);
      }
      assert.equal(l.isLocked(), false);
      assert.equal(l.space.stats().lockSlowpath, 0);
    }
  });

  it("rejects bad arguments with clear errors", () => {
    const sab = new SharedArrayBuffer(guestLockBytes(2));
    assert.throws(() => createGuestLock("mcs" as LockKind, false, sab, 0), /ticket.*queue/);
    assert.throws(() => LockSpace.init(sab, 4, { maxCpus: 2 }), /aligned/);
    assert.throws(() => LockSpace.init(sab, 0, { maxCpus: 3 }), /needs/);
    assert.throws(() => LockSpace.attach(new SharedArrayBuffer(4096), 0), /bad magic/);
    assert.throws(() => LockSpace.init(sab, 0, { maxCpus: 0 }), /maxCpus/);
  });
});
