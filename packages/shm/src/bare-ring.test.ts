// Behaviour of the baseline measurements (not their figures: those come from
// benches): they run end to end with a real peer process, verify the data,
// and leave no files or processes behind.

import assert from "node:assert/strict";
import { readdirSync, rmSync } from "node:fs";
import { after, test } from "node:test";
import { measureBareRing, measureDoorbellPingPong } from "./index";
import { tempShmDir } from "./test-support";

const dir = tempShmDir();

after(() => {
  rmSync(dir, { recursive: true, force: true });
});

test("measureBareRing moves every message through a peer process and cleans up", async () => {
  const r = await measureBareRing({ messages: 200_000, dir });
  assert.equal(r.messages, 200_000);
  assert.ok(r.msgsPerS > 0 && Number.isFinite(r.msgsPerS));
  assert.deepEqual(readdirSync(dir), []);
});

test("measureDoorbellPingPong completes every round in each mode and cleans up", async () => {
  for (const mode of ["futex-sync", "futex-async", "fifo"] as const) {
    const r = await measureDoorbellPingPong({ rounds: 300, mode, dir });
    assert.equal(r.mode, mode);
    assert.ok(r.roundTripUs > 0 && Number.isFinite(r.roundTripUs));
  }
  assert.deepEqual(readdirSync(dir), []);
});

test("the measurements validate their options", async () => {
  await assert.rejects(measureBareRing({ messages: 0 }), RangeError);
  await assert.rejects(measureBareRing({ messages: 1.5 }), TypeError);
  await assert.rejects(measureDoorbellPingPong({ rounds: -1 }), RangeError);
});
