// Pause-loop exiting (LockSpaceInit.pleWindow): the host's kvm_vcpu_on_spin()
// model, and the locks with PLE on: mutual exclusion, no lost wake-up, exits
// counted. Behaviour only; the yield's length is never asserted.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { availableParallelism } from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import { VcpuPool, runLockWorkload } from "./workload";
import { PC_HV_HALTED, PLE_WINDOW_SPINS, QSPIN_THRESHOLD, TICKET_SPIN_THRESHOLD, _Q_PENDING_VAL, lockSpaceBytes, percpuBase } from "./layout";
import { LockSpace } from "./lockspace";
import type { LockKind } from "./ticket";

const VCPUS = Math.max(4, 3 * availableParallelism());

describe("LockSpace PLE model (kvm_vcpu_on_spin)", () => {
  const mk = (pleWindow?: number): LockSpace => LockSpace.init(new SharedArrayBuffer(lockSpaceBytes(3)), 0, { maxCpus: 3, pleWindow });

  it("is off by default and validates the window", () => {
    const s = mk();
    assert.equal(s.pleMask, -1);
    s.pleExit(0);
    s.vcpuRan(0);
    assert.equal(s.stats().pleExits, 0);
    assert.equal(mk(PLE_WINDOW_SPINS).pleMask, PLE_WINDOW_SPINS - 1);
    for (const bad of [3, 100, -1, 1.5, 2 ** 31]) assert.throws(() => mk(bad), RangeError, String(bad));
    // An attaching thread sees the same window.
    const s2 = mk(64);
    assert.equal(LockSpace.attach(s2.sab, 0).pleMask, 63);
  });

  it("yields only to a kicked or apparently preempted vCPU, else returns at once", async () => {
    const s = mk(PLE_WINDOW_SPINS);
    const exits = (): number => s.statsOf(0).pleExits;
    const yields = (): number => s.statsOf(0).pleYields;
    // Idle vCPUs (in HLT on KVM) are never targets.
    s.setVcpuIdle(1, true);
    s.setVcpuIdle(2, true);
    s.pleExit(0);
    await sleep(5);
    s.pleExit(0);
    assert.equal(exits(), 2);
    assert.equal(yields(), 0);

    // vCPU 1 runs guest code. Just seen running: no target.
    s.setVcpuIdle(1, false);
    s.pleExit(0);
    assert.equal(yields(), 0);
    // It keeps reporting that it runs: still no target.
    await sleep(5);
    s.vcpuRan(1);
    s.pleExit(0);
    assert.equal(yields(), 0);
    // Not seen running for longer than PLE_PREEMPTED_US: taken as preempted, yielded to.
    await sleep(5);
    s.pleExit(0);
    assert.equal(yields(), 1);

    // Halted without a kick: not runnable, no target.
    const i32 = s.i32;
    Atomics.store(i32, percpuBase(s, 1) + PC_HV_HALTED, 1);
    await sleep(5);
    s.pleExit(0);
    assert.equal(yields(), 1);
    // Kicked while halted (vcpu->ready): a target at once.
    s.kick(2, 1);
    s.pleExit(0);
    assert.equal(yields(), 2);
    assert.equal(exits(), 7);
    assert.equal(s.statsOf(1).pleExits, 0);
  });
});

describe("locks with pause-loop exiting", () => {
  let pool: VcpuPool;
  before(async () => {
    pool = await VcpuPool.start(VCPUS);
  });
  after(async () => {
    await pool.terminate();
  });

  const modes: Array<{ lock: LockKind; pv: boolean }> = [
    { lock: "ticket", pv: false },
    { lock: "ticket", pv: true },
    { lock: "queue", pv: false },
    { lock: "queue", pv: true },
  ];
  for (const m of modes) {
    it(`${m.lock} lock, PV ${m.pv ? "on" : "off"}: mutual exclusion and PLE exits at ${VCPUS} vCPUs`, async () => {
      const r = await runLockWorkload({ pool, ...m, vcpus: VCPUS, iterations: 50_000, criticalSectionWork: 20, budgetMs: 500, timeoutMs: 20_000, pleWindow: PLE_WINDOW_SPINS });
      assert.equal(r.error, null);
      assert.equal(r.pleWindow, PLE_WINDOW_SPINS);
      assert.ok(r.ops > VCPUS, `only ${r.ops} rounds`);
      assert.equal(r.counter, r.ops);
      assert.ok(r.stats.pleExits > 0, "overcommitted spinners took pause-loop exits");
      assert.ok(r.stats.pleYields <= r.stats.pleExits);
      assert.equal(pool.mainLock().isLocked(), false);
    });

    it(`${m.lock} lock, PV ${m.pv ? "on" : "off"}: every vCPU finishes all rounds (no lost wake-up) under random preemption`, async () => {
      const iterations = 60;
      const r = await runLockWorkload({ pool, ...m, vcpus: VCPUS, iterations, criticalSectionWork: 10, random: { maxSpin: 2000, sleepOneIn: 8, maxSleepMs: 2 }, timeoutMs: 20_000, pleWindow: 32 });
      assert.equal(r.error, null);
      assert.deepEqual(r.acquiredPerVcpu, new Array(VCPUS).fill(iterations));
      assert.equal(r.counter, VCPUS * iterations);
      assert.equal(r.stats.hvTimerWakes, 0);
    });
  }

  for (const lock of ["ticket", "queue"] as const) {
    for (const pv of [false, true]) {
      it(`${lock} lock, PV ${pv ? "on" : "off"}: a waiter behind a held lock takes PLE exits and yields to the holder`, async () => {
        await pool.prepare({ kind: lock, pv, pleWindow: PLE_WINDOW_SPINS }, [
          { cpu: 0, mode: "hold" },
          { cpu: 1, mode: "loop", iterations: 1 },
        ]);
        const space = pool.space;
        pool.go(0);
        assert.ok(await pool.until(() => pool.holder() === 0, 10_000), "vCPU 0 holds the lock");
        pool.go(1);
        try {
          // The holder waits for releaseHold without running: to the host it
          // looks preempted, so the spinning waiter's exits yield to it.
          assert.ok(await pool.until(() => space.statsOf(1).pleYields > 0, 10_000), `no directed yield: ${JSON.stringify(space.statsOf(1))}`);
          if (pv) {
            // PLE does not stop the PV slow path: the waiter still halts after its spin threshold.
            assert.ok(await pool.until(() => space.isHalted(1), 10_000), "the PV waiter halted");
            const threshold = lock === "queue" ? 2 * QSPIN_THRESHOLD : TICKET_SPIN_THRESHOLD;
            assert.ok(space.statsOf(1).pleExits >= Math.floor((threshold - 1) / PLE_WINDOW_SPINS), `${space.statsOf(1).pleExits} exits before the halt`);
          }
        } finally {
          pool.releaseHold(0);
        }
        assert.ok(await pool.waitDone(10_000), "both vCPUs finished");
        assert.equal(pool.acquired(1), 1);
        const s = space.statsOf(1);
        assert.ok(s.pleYields <= s.pleExits);
        assert.equal(space.statsOf(0).pleExits, 0, "the holder never spun");
      });
    }
  }

  it("PLE off: no exits, however long a waiter spins", async () => {
    await pool.prepare({ kind: "queue", pv: false }, [
      { cpu: 0, mode: "hold" },
      { cpu: 1, mode: "loop", iterations: 1 },
    ]);
    const space = pool.space;
    pool.go(0);
    assert.ok(await pool.until(() => pool.holder() === 0, 10_000));
    pool.go(1);
    // Wait until the waiter is in the slow path (PV off: it set the pending bit), then let it spin.
    assert.ok(await pool.until(() => (Atomics.load(space.i32, space.lockWord(0)) & _Q_PENDING_VAL) !== 0, 10_000));
    await sleep(20);
    pool.releaseHold(0);
    assert.ok(await pool.waitDone(10_000));
    const s = space.stats();
    assert.ok(s.spins > PLE_WINDOW_SPINS, `the waiter spun ${s.spins} times`);
    assert.equal(s.pleExits, 0);
    assert.equal(s.pleYields, 0);
  });
});
