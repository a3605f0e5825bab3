import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { IobandDevice } from "./device";
import { RANGE_BW_MAX_BURST_NS, RANGE_BW_UNIT_BYTES } from "./rangebw";
import { simulateShares } from "./simulate";

interface Req {
  bytes: number;
  cgroupId: number;
}

const KiB = RANGE_BW_UNIT_BYTES;
const MiB = 1024 * 1024;

test("max respected: capped groups on a fast device run at their max, never above", () => {
  const r = simulateShares({
    groups: [
      { name: "a", rangeBw: { minKBps: 1000, maxKBps: 2000 } },
      { name: "b", rangeBw: { minKBps: 0, maxKBps: 1000 } },
      { name: "c", rangeBw: { minKBps: 0, maxKBps: 0 } }, // unlimited
    ],
    deviceBytesPerS: 10 * MiB,
    durationS: 4,
    requestBytes: 4096,
    iodepth: 8,
  });
  for (const [name, max] of [
    ["a", 2000],
    ["b", 1000],
  ] as const) {
    const bw = r.bytesPerS[name]!;
    assert.ok(bw <= max * KiB * 1.01, `${name}: ${bw} B/s above max ${max} KiB/s`);
    assert.ok(bw >= max * KiB * 0.97, `${name}: ${bw} B/s well under max ${max} KiB/s on an idle device`);
  }
  // The unlimited group takes the rest of the device.
  assert.ok(r.bytesPerS.c! > 6 * MiB);
});

test("min respected under contention: a group with min 6000 KiB/s on a 10 MiB/s device shared with two greedy groups", () => {
  const r = simulateShares({
    groups: [
      { name: "a", rangeBw: { minKBps: 6000, maxKBps: 1_000_000 } },
      { name: "b", rangeBw: { minKBps: 0, maxKBps: 0 } },
      { name: "c", rangeBw: { minKBps: 0, maxKBps: 0 } },
    ],
    deviceBytesPerS: 10 * MiB,
    durationS: 4,
    requestBytes: 4096,
    iodepth: 8,
  });
  assert.ok(r.bytesPerS.a! >= 6000 * KiB * 0.99, `a got ${r.bytesPerS.a! / KiB} KiB/s`);
  // The leftover is shared, nobody starves.
  assert.ok(r.bytesPerS.b! > 0.5 * MiB && r.bytesPerS.c! > 0.5 * MiB);
  assert.ok(Math.abs(r.bytesPerS.b! - r.bytesPerS.c!) / r.bytesPerS.b! < 0.05);
});

test("property: every group gets at least its min and at most its max", () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.record({ min: fc.integer({ min: 0, max: 2000 }), extra: fc.integer({ min: 0, max: 4000 }), unlimited: fc.boolean() }),
        { minLength: 1, maxLength: 4 },
      ),
      (specs) => {
        const device = 10 * MiB;
        const r = simulateShares({
          groups: specs.map((s, i) => ({ name: `g${i}`, rangeBw: { minKBps: s.min, maxKBps: s.unlimited && s.min === 0 ? 0 : s.min + s.extra } })),
          deviceBytesPerS: device,
          durationS: 2,
          requestBytes: 4096,
          iodepth: 4,
        });
        specs.forEach((s, i) => {
          const bw = r.bytesPerS[`g${i}`]!;
          const max = s.unlimited && s.min === 0 ? 0 : s.min + s.extra;
          // Sum of mins is at most 8000 KiB/s < 10 MiB/s: every min is feasible, to within
          // one request per window either way (a 4 KiB request at a min of a few KiB/s
          // cannot land exactly on the window's edge).
          assert.ok(bw >= s.min * KiB * 0.97 - 4096 / r.windowS, `g${i} ${bw / KiB} KiB/s under min ${s.min}`);
          // Over the max by at most the burst range-bw allows (HZ/50 of the max) plus one request.
          const burst = (max * KiB * RANGE_BW_MAX_BURST_NS) / 1e9;
          if (max > 0) assert.ok(bw <= max * KiB * 1.01 + (burst + 4096) / r.windowS, `g${i} ${bw / KiB} KiB/s over max ${max}`);
        });
      },
    ),
    { numRuns: 20 },
  );
});

test("the property's counterexamples: a min below one request per window; a max run ahead by its burst", () => {
  const a = simulateShares({ groups: [{ name: "g0", rangeBw: { minKBps: 3, maxKBps: 3 } }], deviceBytesPerS: 10 * MiB, durationS: 2, requestBytes: 4096, iodepth: 4 });
  assert.ok(a.bytesPerS.g0! >= 3 * KiB * 0.97 - 4096 / a.windowS, `${a.bytesPerS.g0! / KiB} KiB/s`);
  const groups = [
    { name: "g0", rangeBw: { minKBps: 0, maxKBps: 3008 } },
    { name: "g1", rangeBw: { minKBps: 1865, maxKBps: 4383 } },
    { name: "g2", rangeBw: { minKBps: 308, maxKBps: 3390 } },
  ];
  const b = simulateShares({ groups, deviceBytesPerS: 10 * MiB, durationS: 2, requestBytes: 4096, iodepth: 4 });
  for (const g of groups) {
    const max = g.rangeBw.maxKBps * KiB;
    assert.ok(b.bytesPerS[g.name]! <= max * 1.01 + ((max * RANGE_BW_MAX_BURST_NS) / 1e9 + 4096) / b.windowS, `${g.name}: ${b.bytesPerS[g.name]! / KiB} KiB/s`);
  }
});

test("groups under their min are served first when the device is busy", () => {
  const clock = { now: 0 };
  const dev = new IobandDevice<Req>({ name: "s", policy: "range-bw", clock: () => clock.now, ioThrottle: 1, ioLimit: 16 });
  const head = dev.addHead("d");
  assert.equal(dev.attachGroup(head, 2, "0:0"), 0);
  assert.equal(dev.attachGroup(head, 3, "1000:2000"), 0);
  const leftover = { bytes: 4096, cgroupId: 2 };
  const owed = { bytes: 4096, cgroupId: 3 };
  assert.equal(dev.submit(leftover, head), "dispatch"); // idle device: straight through
  assert.match(dev.submit(leftover, head), /^queued/);
  assert.match(dev.submit(owed, head), /^queued/);
  // io_throttle (1) is reached: only the group owed its minimum may go.
  assert.equal(dev.nextDispatchable(), owed);
  assert.equal(dev.nextDispatchable(), null);
  dev.complete(leftover);
  dev.complete(owed);
  assert.equal(dev.nextDispatchable(), leftover);
});

test("nextWakeup: a group over its max sleeps until its bucket refills, then goes", () => {
  const clock = { now: 1_000_000_000 };
  const dev = new IobandDevice<Req>({ name: "s", policy: "range-bw", clock: () => clock.now });
  const head = dev.addHead("d");
  assert.equal(dev.attachGroup(head, 2, "0:100"), 0); // 100 KiB/s: a 20 ms bucket of 2048 bytes
  const r = { bytes: 4096, cgroupId: 2 };
  assert.equal(dev.submit(r, head), "dispatch");
  dev.complete(r);
  assert.match(dev.submit(r, head), /^queued/);
  assert.equal(dev.nextDispatchable(), null);
  const wake = dev.nextWakeup()!;
  // 2048 bytes of debt at 102400 B/s: 20 ms.
  assert.ok(wake > clock.now && wake <= clock.now + 20_000_001 + 1, `wake in ${(wake - clock.now) / 1e6} ms`);
  clock.now = wake - 1_000;
  assert.equal(dev.nextDispatchable(), null);
  clock.now = wake;
  assert.equal(dev.nextDispatchable(), r);
  assert.equal(dev.nextWakeup(), null);
});

test("range-bw device text has no token/carryover and groups print range-bw=min:max", () => {
  const dev = new IobandDevice<Req>({ name: "s", policy: "range-bw", clock: () => 0 });
  const head = dev.addHead("d", "10:20");
  assert.equal(dev.showDevice(), "s policy=range-bw io_throttle=4 io_limit=128\n  d\n");
  assert.equal(dev.policy.showGroup(head.defaultGroup), " range-bw=10:20");
});
