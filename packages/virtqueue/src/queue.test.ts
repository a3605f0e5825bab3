import { test } from "node:test";
import assert from "node:assert/strict";
import { harness } from "./test-util";
import { ChainError, ChainErrorCode } from "./chain-error";
import { DescriptorChain, DeviceQueue, readQueuePosition } from "./device";
import { DeviceProtocolError, DriverQueue } from "./driver";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "./constants";

function popOk(dev: DeviceQueue, chain: DescriptorChain): DescriptorChain {
  const r = dev.pop(chain);
  assert.ok(r instanceof DescriptorChain, `expected a chain, got ${String(r)}`);
  return r;
}

test("add / pop / addUsed / popUsed round trip with readable and writable segments", () => {
  const h = harness({ size: 8 });
  const { driver, device, mem, dataAddr } = h;
  const req = new TextEncoder().encode("hello virtio");
  mem.vcpu.write(dataAddr, req);
  const head = driver.add([{ addr: dataAddr, len: 5 }, { addr: dataAddr + 5, len: req.length - 5 }], [{ addr: dataAddr + 4096, len: 64 }]);
  assert.equal(head, 0);
  assert.equal(driver.numFree, 5);
  assert.equal(device.hasPending(), true);

  const chain = device.newChain();
  popOk(device, chain);
  assert.equal(chain.head, head);
  assert.equal(chain.count, 3);
  assert.equal(chain.readableCount, 2);
  assert.equal(chain.writableCount, 1);
  assert.equal(chain.readableBytes, req.length);
  assert.equal(chain.writableBytes, 64);
  assert.equal(chain.indirect, false);
  const got = new Uint8Array(req.length);
  assert.equal(device.readChain(chain, got), req.length);
  assert.deepEqual(got, req);
  const reply = new TextEncoder().encode("HELLO");
  const n = device.writeChain(chain, reply);
  device.addUsed(chain.head, n);
  assert.equal(device.pop(chain), null);

  const used = driver.popUsed();
  assert.deepEqual({ ...used }, { id: head, len: 5 });
  assert.equal(driver.numFree, 8);
  assert.equal(driver.popUsed(), null);
  const back = new Uint8Array(5);
  mem.vcpu.read(dataAddr + 4096, back);
  assert.deepEqual(back, reply);
});

test("ring wraps many times; ids come back in order; free list never leaks", () => {
  const h = harness({ size: 4 });
  const chain = h.device.newChain();
  let next = 0;
  let expect = 0;
  const heads: number[] = [];
  for (let round = 0; round < 40_000; round++) {
    while (h.driver.numFree >= 2) {
      const head = h.driver.add([{ addr: h.dataAddr + (next % 64) * 16, len: 16 }], [{ addr: h.dataAddr + 8192, len: 4 }]);
      heads.push(head);
      next++;
    }
    for (let r = h.device.pop(chain); r !== null; r = h.device.pop(chain)) {
      assert.ok(r instanceof DescriptorChain);
      h.device.addUsed(r.head, 4);
    }
    for (let u = h.driver.popUsed(); u !== null; u = h.driver.popUsed()) {
      assert.equal(u.id, heads[expect]);
      expect++;
    }
  }
  assert.equal(expect, next);
  assert.ok(next > 65536, "crossed the 16-bit index wrap");
  assert.equal(h.driver.numFree, 4);
});

test("indirect descriptors: driver uses one main descriptor, device flattens the table", () => {
  const h = harness({ size: 8, indirect: true, maxIndirect: 8 });
  const segsR = [0, 1, 2].map((i) => ({ addr: h.dataAddr + i * 100, len: 100 }));
  const segsW = [3, 4].map((i) => ({ addr: h.dataAddr + i * 100, len: 50 }));
  const head = h.driver.add(segsR, segsW);
  assert.equal(h.driver.numFree, 7);
  const chain = popOk(h.device, h.device.newChain());
  assert.equal(chain.head, head);
  assert.equal(chain.indirect, true);
  assert.equal(chain.count, 5);
  assert.equal(chain.readableCount, 3);
  assert.equal(chain.readableBytes, 300);
  assert.equal(chain.writableBytes, 100);
  assert.deepEqual(Array.from(chain.addr.subarray(0, 5)), [0, 1, 2, 3, 4].map((i) => h.dataAddr + i * 100));
  h.device.addUsed(head, 100);
  assert.equal(h.driver.popUsed()?.len, 100);
  assert.equal(h.driver.numFree, 8);
});

test("direct descriptors followed by one indirect descriptor are accepted (§2.7.5.3.2)", () => {
  const h = harness({ size: 8, indirect: true });
  const w = h.mem.vcpu;
  const desc = (i: number, addr: number, len: number, flags: number, next: number, base = h.cfg.descAddr) => {
    const d = base + i * 16;
    w.writeU64(d, BigInt(addr));
    w.writeU32(d + 8, len);
    w.writeU16(d + 12, flags);
    w.writeU16(d + 14, next);
  };
  const table = h.dataAddr + 8192;
  desc(0, h.dataAddr, 10, VIRTQ_DESC_F_NEXT, 3);
  desc(3, table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0); // WRITE on it must be ignored
  desc(0, h.dataAddr + 10, 20, VIRTQ_DESC_F_NEXT, 1, table);
  desc(1, h.dataAddr + 30, 40, VIRTQ_DESC_F_WRITE, 0, table);
  w.writeU16(h.cfg.availAddr + 4, 0);
  w.storeU16Atomic(h.cfg.availAddr + 2, 1);
  const c = popOk(h.device, h.device.newChain());
  assert.equal(c.count, 3);
  assert.equal(c.readableCount, 2);
  assert.equal(c.writableBytes, 40);
});

test("bad chain is returned as a typed ChainError; discard() returns it with len 0 and the queue keeps serving", () => {
  const h = harness({ size: 8 });
  const head = h.driver.add([{ addr: h.dataAddr, len: 16 }], []);
  // Corrupt the descriptor the driver wrote: address beyond guest memory.
  h.mem.vcpu.writeU64(h.cfg.descAddr + head * 16, BigInt(h.mem.size - 8));
  const chain = h.device.newChain();
  const r = h.device.pop(chain);
  assert.ok(r instanceof ChainError);
  assert.equal(r.code, ChainErrorCode.AddressOutOfRange);
  assert.equal(r.head, head);
  assert.match(r.section, /§2\.7\.5/);
  assert.match(r.message, /ADDRESS_OUT_OF_RANGE/);
  assert.equal(h.device.discard(r), true);
  assert.deepEqual({ ...h.driver.popUsed() }, { id: head, len: 0 });
  // Next good request still works.
  const h2 = h.driver.add([{ addr: h.dataAddr, len: 16 }], []);
  assert.equal(popOk(h.device, chain).head, h2);
});

test("avail idx jumping past Queue Size is fatal: NEEDS_RESET, pop returns null afterwards", () => {
  const h = harness({ size: 8 });
  h.mem.vcpu.storeU16Atomic(h.cfg.availAddr + 2, 9);
  const chain = h.device.newChain();
  const r = h.device.pop(chain);
  assert.ok(r instanceof ChainError);
  assert.equal(r.code, ChainErrorCode.AvailIdxOutOfRange);
  assert.equal(r.fatal, true);
  assert.equal(h.device.needsReset, r);
  assert.equal(h.device.pop(chain), null);
  assert.equal(h.device.discard(r), false);
  h.device.reset();
  h.mem.vcpu.storeU16Atomic(h.cfg.availAddr + 2, 0);
  assert.equal(h.device.needsReset, null);
});

test("head index out of range is fatal", () => {
  const h = harness({ size: 8 });
  h.mem.vcpu.writeU16(h.cfg.availAddr + 4, 8);
  h.mem.vcpu.storeU16Atomic(h.cfg.availAddr + 2, 1);
  const r = h.device.pop(h.device.newChain());
  assert.ok(r instanceof ChainError && r.code === ChainErrorCode.HeadOutOfRange && r.fatal);
});

test("enterNeedsReset on a non-fatal error stops the queue", () => {
  const h = harness({ size: 8 });
  const head = h.driver.add([{ addr: h.dataAddr, len: 16 }], [{ addr: h.dataAddr, len: 16 }]);
  h.mem.vcpu.writeU16(h.cfg.descAddr + head * 16 + 14, 200); // next out of range
  h.driver.add([{ addr: h.dataAddr, len: 16 }], []);
  const r = h.device.pop(h.device.newChain());
  assert.ok(r instanceof ChainError && r.code === ChainErrorCode.DescIndexOutOfRange && !r.fatal);
  h.device.enterNeedsReset(r);
  assert.equal(h.device.hasPending(), false);
  assert.equal(h.device.pop(h.device.newChain()), null);
});

test("driver detects a device returning a bogus id or len (DeviceProtocolError)", () => {
  const h = harness({ size: 8 });
  h.driver.add([{ addr: h.dataAddr, len: 16 }], [{ addr: h.dataAddr + 16, len: 8 }]);
  popOk(h.device, h.device.newChain());
  h.device.addUsed(5, 0); // 5 was never added
  assert.throws(() => h.driver.popUsed(), DeviceProtocolError);
  const h2 = harness({ size: 8 });
  const id = h2.driver.add([{ addr: h2.dataAddr, len: 16 }], [{ addr: h2.dataAddr + 16, len: 8 }]);
  popOk(h2.device, h2.device.newChain());
  h2.device.addUsed(id, 9);
  assert.throws(() => h2.driver.popUsed(), /exceeds the 8 writable bytes/);
});

test("full ring: add returns -1 when descriptors run out", () => {
  const h = harness({ size: 4 });
  for (let i = 0; i < 4; i++) assert.notEqual(h.driver.add([{ addr: h.dataAddr, len: 1 }], []), -1);
  assert.equal(h.driver.add([{ addr: h.dataAddr, len: 1 }], []), -1);
  assert.throws(() => h.driver.add([], []), RangeError);
  assert.throws(() => h.driver.add([{ addr: h.mem.size, len: 1 }], []), RangeError);
});

// ---- notification suppression -------------------------------------------------

/** Runs `total` requests with `batch` added per kick check; counts kicks and interrupts. */
function countNotifications(eventIdx: boolean, total: number, batch: number, deviceBusy: boolean) {
  const h = harness({ size: 64, eventIdx });
  const chain = h.device.newChain();
  let kicks = 0;
  let interrupts = 0;
  let done = 0;
  let sent = 0;
  if (deviceBusy) h.device.disableNotifications();
  while (done < total) {
    for (let i = 0; i < batch && sent < total && h.driver.numFree > 0; i++, sent++) h.driver.add([{ addr: h.dataAddr, len: 8 }], []);
    if (h.driver.kickPrepare()) kicks++;
    for (let r = h.device.pop(chain); r !== null; r = h.device.pop(chain)) h.device.addUsed((r as DescriptorChain).head, 0);
    if (h.device.needsInterrupt()) interrupts++;
    if (!deviceBusy) assert.equal(h.device.enableNotifications(), false);
    while (h.driver.popUsed()) done++;
  }
  return { kicks, interrupts };
}

test("without EVENT_IDX: NO_NOTIFY suppresses kicks, NO_INTERRUPT suppresses interrupts", () => {
  const on = countNotifications(false, 1000, 10, false);
  assert.equal(on.kicks, 100);
  assert.equal(on.interrupts, 100);
  const busy = countNotifications(false, 1000, 10, true);
  assert.equal(busy.kicks, 0, "device polling with NO_NOTIFY set");

  const h = harness({ size: 8 });
  h.driver.disableCallbacks();
  h.driver.add([{ addr: h.dataAddr, len: 8 }], []);
  const c = popOk(h.device, h.device.newChain());
  h.device.addUsed(c.head, 0);
  assert.equal(h.device.needsInterrupt(), false);
  assert.equal(h.driver.enableCallbacks(), true, "used buffer pending -> poll");
  assert.equal(h.driver.popUsed()?.id, c.head);
  assert.equal(h.driver.enableCallbacks(), false);
});

test("with EVENT_IDX: one kick / interrupt per crossing of avail_event / used_event", () => {
  const r = countNotifications(true, 1000, 10, false);
  // Device consumes everything each round and re-arms avail_event = last_avail,
  // driver re-arms used_event on every popUsed: one of each per batch.
  assert.equal(r.kicks, 100);
  assert.equal(r.interrupts, 100);
  const busy = countNotifications(true, 1000, 10, true);
  assert.ok(busy.kicks <= 1, `device never re-armed avail_event: ${busy.kicks} kicks`);

  // used_event in the future: no interrupt until the device writes that entry.
  const h = harness({ size: 16, eventIdx: true });
  const chain = h.device.newChain();
  h.mem.vcpu.storeU16Atomic(h.cfg.availAddr + 4 + 2 * 16, 3); // used_event = 3
  for (let i = 0; i < 6; i++) h.driver.add([{ addr: h.dataAddr, len: 1 }], []);
  assert.equal(h.device.needsInterrupt(), true, "first call is always a notification (no previous signal)");
  const fired: boolean[] = [];
  for (let i = 0; i < 6; i++) {
    const c = popOk(h.device, chain);
    h.device.addUsed(c.head, 0);
    fired.push(h.device.needsInterrupt());
  }
  assert.deepEqual(fired, [false, false, false, true, false, false]); // entry 3 written -> used idx 4

  // avail_event: driver kicks only when crossing it.
  const k = harness({ size: 16, eventIdx: true });
  k.device.disableNotifications();
  k.mem.device.storeU16Atomic(k.cfg.usedAddr + 4 + 8 * 16, 2); // avail_event = 2
  const kicked: boolean[] = [];
  for (let i = 0; i < 5; i++) {
    k.driver.add([{ addr: k.dataAddr, len: 1 }], []);
    kicked.push(k.driver.kickPrepare());
  }
  assert.deepEqual(kicked, [false, false, true, false, false]);
});

test("EVENT_IDX: enableNotifications writes avail_event and reports a race", () => {
  const h = harness({ size: 8, eventIdx: true });
  h.device.disableNotifications();
  assert.equal(h.device.enableNotifications(), false);
  h.driver.add([{ addr: h.dataAddr, len: 1 }], []);
  assert.equal(h.driver.kickPrepare(), true, "avail_event == 0 == old avail idx");
  h.device.disableNotifications();
  h.driver.add([{ addr: h.dataAddr, len: 1 }], []);
  assert.equal(h.driver.kickPrepare(), false);
  assert.equal(h.device.enableNotifications(), true, "buffers arrived while disabled");
});

test("NOTIFY_ON_EMPTY: interrupt when the avail ring runs dry even if suppressed", () => {
  const h = harness({ size: 8, notifyOnEmpty: true });
  h.driver.disableCallbacks();
  const chain = h.device.newChain();
  h.driver.add([{ addr: h.dataAddr, len: 1 }], []);
  h.driver.add([{ addr: h.dataAddr, len: 1 }], []);
  h.device.addUsed(popOk(h.device, chain).head, 0);
  assert.equal(h.device.needsInterrupt(), false, "one still available");
  h.device.addUsed(popOk(h.device, chain).head, 0);
  assert.equal(h.device.needsInterrupt(), true, "ring empty");
});

// ---- restart / vring base ---------------------------------------------------

test("a restarted device re-derives its position from the rings in guest memory", () => {
  const h = harness({ size: 16 });
  const chain = h.device.newChain();
  for (let i = 0; i < 5; i++) h.driver.add([{ addr: h.dataAddr + i, len: 1 }], [{ addr: h.dataAddr + 100, len: 1 }]);
  const popped: number[] = [];
  for (let i = 0; i < 3; i++) popped.push(popOk(h.device, chain).head);
  h.device.addUsed(popped[0]!, 1); // only the first completes before the "crash"
  assert.deepEqual(h.device.state, { lastAvailIdx: 3, usedIdx: 1 });

  assert.deepEqual(readQueuePosition(h.mem, h.cfg), { availIdx: 5, usedIdx: 1, inFlight: 4 });
  const restarted = new DeviceQueue(h.mem, h.cfg);
  assert.equal(restarted.usedIdx, 1);
  assert.equal(restarted.lastAvailIdx, 1, "in-order completion: resume at used->idx");
  const again: number[] = [];
  for (let r = restarted.pop(chain); r !== null; r = restarted.pop(chain)) {
    const c = r as DescriptorChain;
    again.push(c.head);
    restarted.addUsed(c.head, 1);
  }
  assert.deepEqual(again, [popped[1], popped[2], 6, 8]);
  const ids: number[] = [];
  for (let u = h.driver.popUsed(); u; u = h.driver.popUsed()) ids.push(u.id);
  assert.deepEqual(ids, [0, 1, 2, 3, 4].map((i) => i * 2));

  // SET_VRING_BASE-style explicit state and walkChain for inflight re-submission.
  const q = new DeviceQueue(h.mem, h.cfg, { lastAvailIdx: 5, usedIdx: 5 });
  assert.equal(q.hasPending(), false);
  assert.ok(q.walkChain(2, chain) instanceof DescriptorChain);
  q.lastAvailIdx = 4;
  assert.equal(q.lastAvailIdx, 4);
  assert.equal(q.hasPending(), true);
});

test("DriverQueue can attach to existing rings without clearing them", () => {
  const h = harness({ size: 8 });
  h.driver.add([{ addr: h.dataAddr, len: 1 }], []);
  const d2 = new DriverQueue(h.mem, h.cfg, { initRings: false });
  assert.equal(d2.outstanding, 1);
});
