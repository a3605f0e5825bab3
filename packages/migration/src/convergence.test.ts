import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  AutoConverge,
  MigrationLimitError,
  dirtyRate,
  expectedDowntimeMs,
  measuredBandwidth,
  pastMaxTotal,
  resolveLimits,
  shouldSwitchover,
  throttleSteps,
} from "./convergence";

test("expected downtime = remaining * page size / bandwidth + device-state time", () => {
  // 25 600 pages = 100 MiB at 1 GiB/s = 97.66 ms, plus 40 ms of device state.
  assert.ok(Math.abs(expectedDowntimeMs(25_600, 2 ** 30, 40) - (100 * 1000) / 1024 - 40) < 1e-9);
  assert.equal(expectedDowntimeMs(0, 0, 12), 12);
  assert.equal(expectedDowntimeMs(1, 0, 12), Infinity);
  // The device state alone can miss the limit: memory is not the only cost.
  assert.ok(!shouldSwitchover(expectedDowntimeMs(0, 1e9, 301), 300));
  assert.ok(shouldSwitchover(expectedDowntimeMs(0, 1e9, 300), 300));
});

test("expected downtime grows with remaining and falls with bandwidth", () => {
  fc.assert(
    fc.property(fc.nat(1e6), fc.nat(1e6), fc.integer({ min: 1, max: 1e10 }), fc.nat(1000), (r1, r2, bw, dev) => {
      const [lo, hi] = r1 <= r2 ? [r1, r2] : [r2, r1];
      assert.ok(expectedDowntimeMs(lo, bw, dev) <= expectedDowntimeMs(hi, bw, dev));
      assert.ok(expectedDowntimeMs(hi, bw * 2, dev) <= expectedDowntimeMs(hi, bw, dev));
    }),
  );
});

test("bandwidth and dirty rate", () => {
  assert.equal(measuredBandwidth(1_000_000, 500_000), 2_000_000);
  assert.equal(measuredBandwidth(0, 10), 0);
  assert.equal(measuredBandwidth(10, 0), 0);
  assert.equal(dirtyRate(256, 1000), 256 * 4096);
  assert.equal(dirtyRate(5, 0), 0);
  assert.ok(pastMaxTotal(601, 600));
  assert.ok(!pastMaxTotal(600, 600));
});

test("limits: zero means QEMU's default, out of range is refused", () => {
  const d = resolveLimits({});
  assert.deepEqual(d, {
    bandwidthBytesPerS: 0,
    downtimeLimitMs: 300,
    maxTotalMs: 600_000,
    autoConverge: false,
    throttleInitialPct: 20,
    throttleIncrementPct: 10,
    throttleMaxPct: 99,
  });
  assert.throws(() => resolveLimits({ throttleMaxPct: 100 }), MigrationLimitError);
  assert.throws(() => resolveLimits({ throttleInitialPct: 50, throttleMaxPct: 40 }), MigrationLimitError);
  assert.throws(() => resolveLimits({ downtimeLimitMs: 2_000_001 }), MigrationLimitError);
  assert.throws(() => resolveLimits({ bandwidthBytesPerS: 100 }), /below one page/);
  assert.throws(() => resolveLimits({ maxTotalMs: 3_600_001 }), MigrationLimitError);
});

test("throttle steps: 20, 30, ... 90, 99", () => {
  assert.deepEqual(throttleSteps(20, 10, 99), [20, 30, 40, 50, 60, 70, 80, 90, 99]);
  assert.deepEqual(throttleSteps(50, 30, 60), [50, 60]);
});

test("auto-converge: the second period dirtying more than half of what was sent throttles", () => {
  const ac = new AutoConverge({ initialPct: 20, incrementPct: 10, maxPct: 99 });
  ac.start(0);
  // Syncs inside one period only accumulate.
  assert.equal(ac.onSync(400, 600, 1000).periodEnded, false);
  // Period 1 ends: 1200 dirtied > 50 % of 2000 sent: first strike, no throttle yet.
  let d = ac.onSync(1000, 600, 1000);
  assert.equal(d.periodEnded, true);
  assert.equal(d.bytesDirtiedPeriod, 1200);
  assert.equal(d.bytesTransferredPeriod, 2000);
  assert.equal(d.pct, 0);
  assert.equal(ac.dirtyRateHighCount, 1);
  // Period 2 below the threshold: no strike, and (as QEMU) the count is not reset.
  d = ac.onSync(2000, 100, 1000);
  assert.equal(d.pct, 0);
  assert.equal(ac.dirtyRateHighCount, 1);
  // Period 3 above: second strike, throttle at the initial 20 %.
  d = ac.onSync(3000, 900, 1000);
  assert.deepEqual([d.pct, d.changed, ac.dirtyRateHighCount], [20, true, 0]);
  // Two more strikes: +10 %.
  ac.onSync(4000, 900, 1000);
  d = ac.onSync(5000, 900, 1000);
  assert.deepEqual([d.pct, d.changed], [30, true]);
});

test("auto-converge: throttle follows the steps up to the cap and stays there", () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 99 }), fc.integer({ min: 1, max: 99 }), fc.integer({ min: 1, max: 99 }), (init, inc, max) => {
      fc.pre(init <= max);
      const ac = new AutoConverge({ initialPct: init, incrementPct: inc, maxPct: max, periodMs: 10 });
      ac.start(0);
      const seen: number[] = [];
      for (let i = 1; i <= 400; i++) {
        const d = ac.onSync(i * 10, 1000, 1000);
        if (d.changed) seen.push(d.pct);
        assert.ok(d.pct <= max);
      }
      assert.deepEqual(seen, throttleSteps(init, inc, max));
      assert.equal(ac.pct, max);
    }),
  );
});

test("auto-converge: a guest dirtying at most half of what is sent is never throttled", () => {
  fc.assert(
    fc.property(fc.array(fc.tuple(fc.nat(1e6), fc.nat(3000)), { maxLength: 50 }), (periods) => {
      const ac = new AutoConverge({ initialPct: 20, incrementPct: 10, maxPct: 99 });
      ac.start(0);
      let t = 0;
      for (const [sent, dt] of periods) {
        t += dt;
        ac.onSync(t, Math.floor(sent / 2), sent);
      }
      assert.equal(ac.pct, 0);
    }),
  );
});
