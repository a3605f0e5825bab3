import { test } from "node:test";
import assert from "node:assert/strict";
import { vringNeedEvent } from "./event-idx";

// Reference: the same question asked with unbounded integers. old..new is a
// forward move of d = new - old (0 <= d < 65536) entries; the event fires iff
// one of the indexes written, old, old+1, ..., new-1 (mod 2^16), equals event.
function reference(event: number, newIdx: number, oldIdx: number): boolean {
  const d = (newIdx - oldIdx + 65536) % 65536;
  for (let k = 0; k < d; k++) if ((oldIdx + k) % 65536 === event) return true;
  return false;
}

test("vring_need_event: basic cases", () => {
  assert.equal(vringNeedEvent(0, 1, 0), true); // first entry written, driver wants it
  assert.equal(vringNeedEvent(5, 5, 0), false); // entries 0..4 written, event 5 not reached
  assert.equal(vringNeedEvent(5, 6, 0), true);
  assert.equal(vringNeedEvent(5, 6, 5), true);
  assert.equal(vringNeedEvent(5, 7, 6), false); // already passed before this batch
  assert.equal(vringNeedEvent(3, 3, 3), false); // nothing moved
});

test("vring_need_event across the 65535 -> 0 wrap, exhaustive over a window", () => {
  let checked = 0;
  // old and new straddle the wrap; event sweeps a window around it.
  for (let old = 65500; old < 65536 + 20; old++) {
    for (let d = 0; d <= 80; d++) {
      const o = old & 0xffff;
      const n = (old + d) & 0xffff;
      for (let e = 65450; e < 65536 + 120; e++) {
        const ev = e & 0xffff;
        assert.equal(vringNeedEvent(ev, n, o), reference(ev, n, o), `event=${ev} new=${n} old=${o}`);
        checked++;
      }
    }
  }
  assert.ok(checked > 500_000);
});

test("vring_need_event at the 65535 -> 0 boundary exactly", () => {
  assert.equal(vringNeedEvent(65535, 0, 65535), true); // wrote entry 65535, idx wrapped to 0
  assert.equal(vringNeedEvent(0, 0, 65535), false); // entry 0 not written yet
  assert.equal(vringNeedEvent(0, 1, 65535), true);
  assert.equal(vringNeedEvent(65534, 1, 65535), false); // passed in an earlier batch
  assert.equal(vringNeedEvent(65535, 65535, 65534), false);
  // a full-size window (32768 entries at once) across the wrap
  assert.equal(vringNeedEvent(100, (65000 + 32768) & 0xffff, 65000), true);
  assert.equal(vringNeedEvent(64999, (65000 + 32768) & 0xffff, 65000), false);
});

test("vring_need_event: random triples agree with the reference", () => {
  let s = 12345;
  const rnd = () => ((s = (s * 1103515245 + 12345) >>> 0) & 0xffff);
  for (let i = 0; i < 20000; i++) {
    const o = rnd();
    const n = (o + (rnd() & 0x3ff)) & 0xffff;
    const e = (o + (rnd() & 0x7ff) - 0x100) & 0xffff;
    assert.equal(vringNeedEvent(e, n, o), reference(e, n, o));
  }
});
