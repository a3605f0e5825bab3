import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { CompletionRing, completionRingBytes, crc32c, fillVerifyBlock, checkVerifyBlock, VHOST_BLK_FEATURES, VHOST_F_LOG_ALL, hasFeature } from "./index";

test("crc32c matches the standard check value", () => {
  assert.equal(crc32c(new TextEncoder().encode("123456789")), 0xe3069283);
  assert.equal(crc32c(new Uint8Array(32)), 0x8a9136aa);
});

test("offered features are the seed's VHOST_BLK_FEATURES plus the blk request features", () => {
  for (const b of [24, 28, 29, VHOST_F_LOG_ALL, 32, 9]) assert.ok(hasFeature(VHOST_BLK_FEATURES, b), `bit ${b}`);
  assert.ok(!hasFeature(VHOST_BLK_FEATURES, 34), "no packed ring");
});

test("completion ring: push/consume round trip keeps order, len, status and address; full ring refuses", () => {
  const buf = new SharedArrayBuffer(completionRingBytes(8));
  const p = CompletionRing.init(buf, { size: 8, descAddr: 4096, availAddr: 8192, usedAddr: 12288 }, 1);
  const c = CompletionRing.open(buf);
  assert.deepEqual(c.queue, { size: 8, descAddr: 4096, availAddr: 8192, usedAddr: 12288 });
  assert.equal(c.flags, 1);
  for (let round = 0; round < 5; round++) {
    for (let i = 0; i < 8; i++) assert.ok(p.push(i, i % 3, 512 * i, 2 ** 40 + i));
    assert.equal(p.push(9, 0, 0, 0), false);
    assert.equal(c.pending, 8);
    const h = c.head;
    for (let k = 0; k < 8; k++) {
      const idx = h + k;
      assert.equal(c.entryId(idx), k);
      assert.equal(c.entryStatus(idx), k % 3);
      assert.equal(c.entryLen(idx), 512 * k);
      assert.equal(c.entryStatusAddr(idx), 2 ** 40 + k);
    }
    c.consumeTo(h + 8);
    assert.equal(p.pending, 0);
  }
});

test("open refuses an uninitialised file", () => {
  assert.throws(() => CompletionRing.open(new SharedArrayBuffer(completionRingBytes(4))), /bad magic/);
});

test("verify blocks: good blocks pass; any corruption, misplacement or stale generation is named", () => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 2 ** 40 }), fc.constantFrom(512, 4096, 8192), fc.integer({ min: 1, max: 1000 }), fc.nat(), (sectors, bs, gen, flip) => {
      const off = sectors * 512;
      const buf = new Uint8Array(bs * 2);
      fillVerifyBlock(buf, bs, bs, off, { generation: gen, run: 7, job: 0 });
      assert.equal(checkVerifyBlock(buf, bs, bs, off, { generation: gen, run: 7 }), null);
      assert.equal(checkVerifyBlock(buf, bs, bs, off, { generation: 0, run: 0 }), null);
      assert.match(checkVerifyBlock(buf, bs, bs, off + bs, { generation: 0, run: 0 })!, /misplaced/);
      assert.match(checkVerifyBlock(buf, bs, bs, off, { generation: gen + 1, run: 7 })!, /write lost/);
      const i = bs + 8 + (flip % (bs - 8));
      buf[i]! ^= 1;
      assert.match(checkVerifyBlock(buf, bs, bs, off, { generation: 0, run: 0 })!, /crc32c mismatch/);
      assert.match(checkVerifyBlock(new Uint8Array(bs), 0, bs, off, { generation: 0, run: 0 })!, /all zeros/);
    }),
    { numRuns: 200 },
  );
});

test("trace slots carry a span context per head and clear", () => {
  const buf = new SharedArrayBuffer(completionRingBytes(8));
  const p = CompletionRing.init(buf, { size: 8, descAddr: 0, availAddr: 256, usedAddr: 512 }, 0);
  const c = CompletionRing.open(buf);
  for (let h = 0; h < 8; h++) assert.equal(c.traceState(h), 0);
  p.writeGuestTrace(3, "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", 1);
  assert.equal(c.traceState(3), 1);
  p.writeWorkerSpan(3, "00f067aa0ba902b7");
  assert.equal(c.traceState(3), 2);
  assert.deepEqual(c.readTrace(3), { traceId: "0af7651916cd43dd8448eb211c80319c", traceFlags: 1, guestSpanId: "b7ad6b7169203331", workerSpanId: "00f067aa0ba902b7" });
  p.push(3, 0, 1, 100);
  assert.equal(c.entryId(0), 3, "trace slots do not overlap entries");
  c.clearTrace(3);
  assert.equal(c.traceState(3), 0);
});

test("inflight region: submitted/pushed/free transitions, pending lookup and the consumer's commit record", () => {
  const buf = new SharedArrayBuffer(completionRingBytes(8));
  const p = CompletionRing.init(buf, { size: 8, descAddr: 0, availAddr: 256, usedAddr: 512 }, 0);
  const c = CompletionRing.open(buf);
  p.markSubmitted(5, 1);
  assert.equal(c.inflightState(5), 1);
  assert.equal(c.lastAvailIdx, 1);
  assert.equal(c.hasPendingCompletion(5), false);
  p.push(5, 0, 1, 100);
  assert.equal(c.hasPendingCompletion(5), true);
  c.markFree(5); // the consumer got there first
  p.markPushed(5);
  assert.equal(c.inflightState(5), 0, "markPushed never resurrects a freed head");
  p.markSubmitted(6, 2);
  p.push(6, 0, 1, 100);
  p.markPushed(6);
  assert.equal(c.inflightState(6), 2);
  assert.equal(c.recoverHead(40), 0, "no batch recorded: the ring's head");
  c.beginBatch(0, 40);
  assert.equal(c.recoverHead(41), 1, "one element committed");
  assert.equal(c.recoverHead(40), 0);
  c.beginBatch(2 ** 32 - 1, 65535);
  assert.equal(c.recoverHead(1), 1, "wraps in both index spaces");
});
