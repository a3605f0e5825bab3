import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { status as Status } from "@grpc/grpc-js";
import { GrpcError } from "@virtmesh/runtime";
import { checkQueueAddresses, usedRingBytes } from "@virtmesh/virtqueue";
import { checkMemoryBytes, checkVmName, placeQueues } from "./layout";

const PG = 4096;

function code(f: () => unknown): number {
  try {
    f();
  } catch (e) {
    assert.ok(e instanceof GrpcError, String(e));
    return e.code;
  }
  return Status.OK;
}

test("queues are packed page by page at the top of guest memory, each valid per virtio 1.2 §2.7", () => {
  const mem = 1 << 20;
  const p = placeQueues(mem, [
    { device: "blk0", index: 0, size: 256 },
    { device: "balloon", index: 2, size: 1 },
  ]);
  // 256: desc 4096 + avail 518 -> used on the 3rd page; 1: desc+avail on one page, used on the next.
  assert.equal(p.reservedBytes, 3 * PG + 2 * PG);
  assert.equal(p.reservedAddr, mem - p.reservedBytes);
  const [a, b] = p.queues;
  assert.deepEqual([a!.descAddr, a!.availAddr, a!.usedAddr], [p.reservedAddr, p.reservedAddr + 4096, p.reservedAddr + 2 * PG]);
  assert.deepEqual([b!.descAddr, b!.availAddr, b!.usedAddr], [p.reservedAddr + 3 * PG, p.reservedAddr + 3 * PG + 16, p.reservedAddr + 4 * PG]);
  for (const q of p.queues) assert.equal(checkQueueAddresses(q, mem), null);
  assert.deepEqual(placeQueues(mem, []), { reservedAddr: mem, reservedBytes: 0, queues: [] });
});

test("any accepted placement is inside guest memory, page aligned, non-overlapping and leaves the guest a page", () => {
  const spec = fc.record({
    device: fc.constantFrom("blk0", "balloon", "net-1", "Bad", ""),
    index: fc.integer({ min: -1, max: 70000 }),
    size: fc.oneof(fc.integer({ min: 0, max: 15 }).map((k) => 2 ** k), fc.integer({ min: 0, max: 70000 })),
  });
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 512 }).map((p) => p * PG), fc.array(spec, { maxLength: 8 }), (mem, specs) => {
      let p;
      try {
        p = placeQueues(mem, specs);
      } catch (e) {
        assert.ok(e instanceof GrpcError && e.code === Status.INVALID_ARGUMENT, String(e));
        return;
      }
      assert.ok(p.reservedAddr >= PG && p.reservedAddr % PG === 0);
      assert.equal(p.reservedAddr + p.reservedBytes, mem);
      let end = p.reservedAddr;
      for (const q of p.queues) {
        assert.equal(checkQueueAddresses(q, mem), null);
        assert.ok(q.descAddr >= end && q.descAddr % PG === 0);
        end = q.descAddr + q.regionBytes;
        assert.ok(q.usedAddr + usedRingBytes(q.size) <= end);
      }
      assert.equal(end, mem);
    }),
    { numRuns: 300 },
  );
});

test("bad requests name the field, the value and the rule", () => {
  assert.throws(() => checkVmName("vm", "../x"), /vm '\.\.\/x' is not a valid name: use 1-63 lowercase/);
  assert.equal(code(() => checkVmName("vm", "A")), Status.INVALID_ARGUMENT);
  assert.equal(code(() => checkVmName("vm", "vm-1")), Status.OK);
  assert.throws(() => checkMemoryBytes(4097, 1 << 30), /memory_bytes 4097 is not a multiple of the 4096-byte page size/);
  assert.equal(code(() => checkMemoryBytes(-4096, 1 << 30)), Status.INVALID_ARGUMENT);
  assert.equal(code(() => checkMemoryBytes(2 ** 31, 2 ** 30)), Status.RESOURCE_EXHAUSTED);
  assert.equal(code(() => checkMemoryBytes(1 << 30, 1 << 30)), Status.OK);
  assert.throws(() => placeQueues(PG * 8, [{ device: "blk0", index: 65536, size: 8 }]), /queues\[0\]\.index 65536 must be 0\.\.65535/);
  assert.throws(() => placeQueues(PG * 8, [{ device: "blk0", index: 0, size: 0 }]), /queues\[0\]\.size 0 is not a power of 2/);
  assert.throws(() => placeQueues(2 * PG, [{ device: "blk0", index: 0, size: 1 }]), /queues need 8192 bytes .* memory_bytes 8192 must be larger/);
  assert.equal(code(() => placeQueues(3 * PG, [{ device: "blk0", index: 0, size: 1 }])), Status.OK);
  const many = Array.from({ length: 1025 }, (_, i) => ({ device: "q", index: i, size: 1 }));
  assert.throws(() => placeQueues(1 << 30, many), /queues has 1025 entries; at most 1024 per VM/);
});
