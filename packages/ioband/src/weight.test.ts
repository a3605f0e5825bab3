import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { IobandDevice } from "./device";
import { simulateShares } from "./simulate";
import { WeightPolicy } from "./weight";

interface Req {
  bytes: number;
  cgroupId: number;
  urgent?: boolean;
}

function weightDevice(opts: { ioThrottle?: number; ioLimit?: number } = {}) {
  const clock = { now: 0 };
  const dev = new IobandDevice<Req>({ name: "share0", policy: "weight", clock: () => clock.now, ...opts });
  const head = dev.addHead("ioband0");
  return { clock, dev, head, policy: dev.policy as WeightPolicy<Req> };
}

test("shares follow weights 40/20/10 within 5% (fake clock, modelled backend)", () => {
  const r = simulateShares({
    groups: [
      { name: "vm1", weight: 40 },
      { name: "vm2", weight: 20 },
      { name: "vm3", weight: 10 },
    ],
    deviceBytesPerS: 100e6,
    durationS: 4,
    requestBytes: 4096,
    iodepth: 8,
  });
  const expected: Record<string, number> = { vm1: 4 / 7, vm2: 2 / 7, vm3: 1 / 7 };
  for (const [name, share] of Object.entries(expected)) {
    const err = Math.abs(r.shares[name]! - share) / share;
    assert.ok(err < 0.05, `${name}: share ${r.shares[name]} vs ${share}`);
  }
});

test("weight-iosize charges by size: a group with 4x larger requests gets the same bytes at equal weight", () => {
  // Two simulations are needed for different sizes; instead drive one device directly.
  const clock = { now: 0 };
  const dev = new IobandDevice<Req>({ name: "s", policy: "weight-iosize", clock: () => clock.now });
  const head = dev.addHead("d");
  assert.equal(dev.attachGroup(head, 2, "50"), 0);
  assert.equal(dev.attachGroup(head, 3, "50"), 0);
  const big = { bytes: 16384, cgroupId: 2 };
  const small = { bytes: 4096, cgroupId: 3 };
  const bytes = new Map<number, number>([
    [2, 0],
    [3, 0],
  ]);
  // Keep both backlogged with io_throttle requests in flight; complete the oldest each step.
  const inflight: Req[] = [];
  for (let step = 0; step < 20000; step++) {
    for (const r of [big, small]) if (dev.shouldBlock(r.cgroupId, head) === false && dev.groups[r.cgroupId - 1]!.queue.length < 4) {
      const res = dev.submit(r, head);
      if (res === "dispatch") inflight.push(r);
    }
    for (let r = dev.nextDispatchable(); r; r = dev.nextDispatchable()) inflight.push(r);
    const done = inflight.shift();
    if (done) {
      dev.complete(done);
      bytes.set(done.cgroupId, bytes.get(done.cgroupId)! + done.bytes);
    }
  }
  const ratio = bytes.get(2)! / bytes.get(3)!;
  assert.ok(ratio > 0.9 && ratio < 1.1, `bytes ratio ${ratio}`);
});

test("property: a larger weight never gets a smaller share, and every group is served", () => {
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: 32767 }), { minLength: 2, maxLength: 4 }), (weights) => {
      const r = simulateShares({
        groups: weights.map((w, i) => ({ name: `g${i}`, weight: w })),
        deviceBytesPerS: 50e6,
        durationS: 1,
        requestBytes: 4096,
        iodepth: 4,
      });
      for (let i = 0; i < weights.length; i++) {
        assert.ok(r.bytes[`g${i}`]! > 0, `group g${i} (weight ${weights[i]}) starved`);
        for (let j = 0; j < weights.length; j++) {
          if (weights[i]! > weights[j]!) assert.ok(r.shares[`g${i}`]! >= r.shares[`g${j}`]! * 0.97, `w${weights[i]} got ${r.shares[`g${i}`]} < w${weights[j]} ${r.shares[`g${j}`]}`);
        }
      }
    }),
    { numRuns: 25 },
  );
});

test("no starvation: weight 1 against 32767 is served every epoch", () => {
  const r = simulateShares({
    groups: [
      { name: "tiny", weight: 1 },
      { name: "huge", weight: 32767 },
    ],
    deviceBytesPerS: 100e6,
    durationS: 2,
    requestBytes: 4096,
    iodepth: 8,
  });
  assert.ok(r.bytes.tiny! > 0);
  // An epoch is ~512 requests of 41 us: the tiny group waits at most a few epochs.
  assert.ok(r.maxGapS.tiny! < 0.2, `tiny waited ${r.maxGapS.tiny}s`);
});

test("carry-over is bounded: an idle group claims at most g_carryover epochs", () => {
  const { dev, head, policy } = weightDevice();
  assert.equal(dev.attachGroup(head, 2, "100"), 0); // idle
  assert.equal(dev.attachGroup(head, 3, "100"), 0); // busy
  const idle = head.find(2)!;
  const busy = { bytes: 4096, cgroupId: 3 };
  const startEpoch = policy.epoch;
  // The busy group runs alone for many epochs (one request in flight, below io_throttle).
  for (let i = 0; i < 20000 && policy.epoch < startEpoch + 3 * policy.carryover; i++) {
    const res = dev.submit(busy, head);
    if (res !== "dispatch") assert.equal(dev.nextDispatchable(), busy);
    dev.complete(busy);
  }
  assert.ok(policy.epoch >= startEpoch + 3 * policy.carryover, "epochs advanced");
  const bound = idle.tokenInitial * (policy.carryover + 1);
  assert.equal(policy.effectiveTokens(idle), bound);
  // A larger token pool raises the bound ("token" message: carryover = pool / bucket).
  assert.equal(dev.message(["token", String(policy.tokenBucket * 8)], head), 0);
  assert.equal(policy.carryover, 8);
});

test("carry-over is used: a group back from idling gets more than one epoch's tokens", () => {
  const { dev, head, policy } = weightDevice();
  assert.equal(dev.attachGroup(head, 2, "100"), 0);
  assert.equal(dev.attachGroup(head, 3, "100"), 0);
  const idle = head.find(2)!;
  const busy = { bytes: 4096, cgroupId: 3 };
  for (let i = 0; i < 5000 && policy.epoch < 2; i++) {
    if (dev.submit(busy, head) !== "dispatch") dev.nextDispatchable();
    dev.complete(busy);
  }
  assert.ok(policy.epoch >= 2);
  assert.ok(policy.effectiveTokens(idle) > idle.tokenInitial);
  assert.ok(policy.effectiveTokens(idle) <= idle.tokenInitial * (policy.carryover + 1));
});

test("io_throttle: at or above it only groups with tokens dispatch; below it a new epoch lets others go", () => {
  const { dev, head, policy } = weightDevice({ ioThrottle: 4, ioLimit: 300 });
  assert.equal(dev.attachGroup(head, 2, "32767"), 0); // rich
  assert.equal(dev.attachGroup(head, 3, "1"), 0); // poor: tokenInitial 1
  const rich = { bytes: 4096, cgroupId: 2 };
  const poor = { bytes: 4096, cgroupId: 3 };
  const poorGp = head.find(3)!;
  assert.equal(poorGp.tokenInitial, 1);
  // Make the rich group dominant and put io_throttle requests in flight.
  for (let i = 0; i < 200; i++) assert.equal(dev.submit(rich, head), "dispatch");
  assert.equal(dev.submit(poor, head), "dispatch"); // spends its single token
  const epoch = policy.epoch;
  assert.match(dev.submit(poor, head), /^queued/);
  assert.equal(dev.nextDispatchable(), null, "no tokens and the device is busy: it waits");
  assert.equal(policy.epoch, epoch, "the dominant group still holds most of its tokens: no new epoch");
  for (let i = 0; i < 201; i++) dev.complete(rich);
  assert.equal(dev.issued, 0);
  assert.equal(dev.nextDispatchable(), poor, "lightly loaded: a new epoch is made and it goes");
  assert.equal(policy.epoch, epoch + 1);
});

test("io_limit: never more than io_limit in flight; a full group queue tells the submitter to block", () => {
  const { dev, head } = weightDevice({ ioThrottle: 2, ioLimit: 8 });
  assert.equal(dev.attachGroup(head, 2, "100"), 0);
  const gp = head.find(2)!;
  const r = { bytes: 4096, cgroupId: 2 };
  const results: string[] = [];
  for (let i = 0; i < 40; i++) results.push(dev.submit(r, head));
  for (let x = dev.nextDispatchable(); x; x = dev.nextDispatchable()) results.push("late");
  assert.ok(dev.issued <= 8, `issued ${dev.issued}`);
  assert.equal(dev.issued, 8);
  assert.ok(results.includes("queued-block"));
  assert.equal(dev.shouldBlock(2, head), gp.queue.length >= gp.limit);
  assert.ok(dev.shouldBlock(2, head));
  // Completions free room: the held requests go, at most io_limit at a time.
  for (let i = 0; i < 8; i++) dev.complete(r);
  let n = 0;
  for (let x = dev.nextDispatchable(); x; x = dev.nextDispatchable()) n++;
  assert.equal(n, 8);
});

test("urgent requests bypass io_limit and held requests", () => {
  const { dev, head } = weightDevice({ ioThrottle: 1, ioLimit: 1 });
  const r = { bytes: 4096, cgroupId: 1 };
  assert.equal(dev.submit(r, head), "dispatch");
  assert.equal(dev.submit(r, head), "queued-block"); // c_limit is 1 at io_limit 1
  const flush = { bytes: 0, cgroupId: 1, urgent: true };
  assert.equal(dev.submit(flush, head), "urgent");
  assert.equal(dev.issued, 2);
  assert.equal(dev.nextDispatchable(), null);
});

test("weight policy needs no timer: nextWakeup is null, held requests go on completion", () => {
  const { dev, head } = weightDevice({ ioThrottle: 1, ioLimit: 1 });
  const r = { bytes: 4096, cgroupId: 1 };
  dev.submit(r, head);
  dev.submit(r, head);
  assert.equal(dev.nextWakeup(), null);
  dev.complete(r);
  assert.equal(dev.nextDispatchable(), r);
});

test("detaching a group hands its held requests to the default group", () => {
  const { dev, head } = weightDevice({ ioThrottle: 1, ioLimit: 1 });
  assert.equal(dev.attachGroup(head, 2, "10"), 0);
  const r = { bytes: 4096, cgroupId: 2 };
  dev.submit(r, head);
  dev.submit(r, head);
  assert.equal(head.find(2)!.queue.length, 1);
  assert.equal(dev.detachGroup(head, 2), 0);
  assert.equal(head.defaultGroup.queue.length, 1);
  dev.complete(r);
  assert.equal(dev.nextDispatchable(), r);
});

test("a group deep in debt from urgent requests still gets its held request out once the device is idle", () => {
  const { dev, head } = weightDevice({ ioThrottle: 4, ioLimit: 8 });
  assert.equal(dev.attachGroup(head, 2, "1"), 0);
  const flush = { bytes: 0, cgroupId: 2, urgent: true };
  for (let i = 0; i < 5000; i++) {
    assert.equal(dev.submit(flush, head), "urgent");
    dev.complete(flush);
  }
  assert.ok(head.find(2)!.token < -1000);
  const r = { bytes: 4096, cgroupId: 2 };
  const res = dev.submit(r, head);
  const out = res === "dispatch" ? r : dev.nextDispatchable();
  assert.equal(out, r);
});
