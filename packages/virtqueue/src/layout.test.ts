import { test } from "node:test";
import assert from "node:assert/strict";
import { splitQueueLayout, checkQueueAddresses, QueueConfigErrorCode, isValidQueueSize, availRingBytes, usedRingBytes, descTableBytes } from "./layout";
import { DeviceQueue } from "./device";
import { GuestMemory } from "./guest-memory";
import { QueueConfigError } from "./layout";

test("§2.7 sizes: desc 16N, avail 6+2N, used 6+8N", () => {
  assert.equal(descTableBytes(256), 4096);
  assert.equal(availRingBytes(256), 518);
  assert.equal(usedRingBytes(256), 2054);
});

test("layout aligns each part (16 / 2 / 4) and packs them", () => {
  for (const size of [1, 2, 4, 8, 256, 1024, 32768]) {
    for (const base of [0, 1, 3, 17, 4095, 4096]) {
      const l = splitQueueLayout(size, base);
      assert.equal(l.descAddr % 16, 0);
      assert.ok(l.descAddr >= base && l.descAddr < base + 16);
      assert.equal(l.availAddr, l.descAddr + 16 * size);
      assert.equal(l.availAddr % 2, 0);
      assert.equal(l.usedAddr % 4, 0);
      assert.ok(l.usedAddr >= l.availAddr + 6 + 2 * size && l.usedAddr < l.availAddr + 6 + 2 * size + 4);
      assert.equal(l.end, l.usedAddr + 6 + 8 * size);
      assert.equal(l.bytes, l.end - base);
      assert.equal(checkQueueAddresses(l, l.end), null);
    }
  }
  const legacy = splitQueueLayout(256, 0, { usedAlign: 4096 });
  assert.equal(legacy.usedAddr % 4096, 0);
});

test("queue size must be a power of two <= 32768", () => {
  for (const bad of [0, 3, 6, 100, 65536, 32769, -8, 1.5]) {
    assert.equal(isValidQueueSize(bad), false, String(bad));
    assert.throws(() => splitQueueLayout(bad), RangeError);
  }
  for (const good of [1, 2, 32768]) assert.equal(isValidQueueSize(good), true);
});

test("checkQueueAddresses rejects misaligned and out-of-memory rings", () => {
  const l = splitQueueLayout(16, 0);
  assert.equal(checkQueueAddresses({ ...l, descAddr: 8 }, 1 << 16)?.code, QueueConfigErrorCode.Misaligned);
  assert.equal(checkQueueAddresses({ ...l, availAddr: l.availAddr + 1 }, 1 << 16)?.code, QueueConfigErrorCode.Misaligned);
  assert.equal(checkQueueAddresses({ ...l, usedAddr: l.usedAddr + 2 }, 1 << 16)?.code, QueueConfigErrorCode.Misaligned);
  assert.equal(checkQueueAddresses(l, l.end - 1)?.code, QueueConfigErrorCode.OutOfMemory);
  assert.equal(checkQueueAddresses({ ...l, usedAddr: 2 ** 60 }, 1 << 16)?.code, QueueConfigErrorCode.OutOfMemory);
  assert.equal(checkQueueAddresses({ ...l, size: 12 }, 1 << 16)?.code, QueueConfigErrorCode.BadQueueSize);
  const mem = new GuestMemory(new ArrayBuffer(1024));
  assert.throws(() => new DeviceQueue(mem, splitQueueLayout(64, 0)), QueueConfigError);
});
