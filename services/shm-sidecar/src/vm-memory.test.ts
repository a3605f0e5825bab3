import { after, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { status as Status } from "@grpc/grpc-js";
import { sidecar } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { mapFile } from "@virtmesh/shm";
import { placeQueues } from "./layout";
import { VmMemory } from "./vm-memory";
import { VmRegistry } from "./vm-registry";

const PG = 4096;
const dir = mkdtempSync("/dev/shm/virtmesh-sidecar-unit-");
after(() => rmSync(dir, { recursive: true, force: true }));

test("create makes every file, destroy removes them all; a half-made VM is rolled back", () => {
  const p = placeQueues(64 * PG, [{ device: "blk0", index: 0, size: 8 }]);
  const vm = VmMemory.create(dir, "a", 64 * PG, p);
  assert.deepEqual(readdirSync(join(dir, "a")).sort(), ["blk0.0.call", "blk0.0.kick", "dirty-device", "dirty-vcpu", "memory"]);
  assert.deepEqual(vm.destroy(), []);
  assert.ok(!existsSync(join(dir, "a")));
  assert.deepEqual(vm.destroy(), [], "idempotent");

  // Two queues with the same stem: the second doorbell fails with EEXIST after
  // the memory, the logs and the first doorbells exist; nothing may stay.
  const dup = { ...p, queues: [p.queues[0]!, p.queues[0]!] };
  assert.throws(() => VmMemory.create(dir, "b", 64 * PG, dup), (e: unknown) => e instanceof GrpcError && e.code === Status.ALREADY_EXISTS);
  assert.ok(!existsSync(join(dir, "b")));

  // A directory left by someone else is not reused.
  mkdirSync(join(dir, "c"));
  assert.throws(() => VmMemory.create(dir, "c", 64 * PG, p), /cannot create .*\/c: .*left behind by an earlier sidecar/);
  assert.deepEqual(readdirSync(join(dir, "c")), []);
});

test("fetchDirtyLog: bits past the last page are masked; BOTH ors the logs; peek leaves them", () => {
  const reg = new VmRegistry(dir, "h", 1 << 30);
  const vm = reg.create({ incoming: false, vm: "d", memoryBytes: 5 * PG, queues: [] });
  try {
    vm.setDirtyLogging(true);
    const vcpu = mapFile(vm.vcpuLogPath, statSync(vm.vcpuLogPath).size);
    const dev = mapFile(vm.deviceLogPath, statSync(vm.deviceLogPath).size);
    try {
      const w = new Int32Array(vcpu.buffer);
      Atomics.store(w, 0, 0b1100_0001); // pages 0 and (bogus) 6, 7
      Atomics.store(new Int32Array(dev.buffer), 0, 0b10000);
      const K = sidecar.DirtyLogKind;
      const peek = vm.fetchDirtyLog(K.DIRTY_LOG_KIND_BOTH, false);
      assert.deepEqual([peek.pages, peek.dirty, peek.bitmap.length, peek.bitmap[0]], [5, 2, 8, 0b10001]);
      const got = vm.fetchDirtyLog(K.DIRTY_LOG_KIND_VCPU, true);
      assert.equal(got.dirty, 1);
      assert.equal(Atomics.load(w, 0), 0);
      assert.equal(vm.fetchDirtyLog(K.DIRTY_LOG_KIND_DEVICE, true).dirty, 1);
      assert.equal(vm.fetchDirtyLog(K.DIRTY_LOG_KIND_BOTH, true).dirty, 0);
    } finally {
      vcpu.unmap();
      dev.unmap();
    }
  } finally {
    assert.deepEqual(reg.destroyAll(), []);
  }
  assert.equal(reg.size, 0);
});

test("writePages copies pages in pfn order and punches zero batches in runs", () => {
  const reg = new VmRegistry(dir, "h", 1 << 30);
  const vm = reg.create({ incoming: false, vm: "w", memoryBytes: 16 * PG, queues: [] });
  const m = mapFile(vm.memoryPath, 16 * PG);
  try {
    const data = new Uint8Array(2 * PG);
    data.fill(1, 0, PG);
    data.fill(2, PG);
    vm.writePages([9, 3], data, false);
    const ram = new Uint8Array(m.buffer);
    assert.deepEqual([ram[9 * PG], ram[3 * PG + PG - 1], ram[4 * PG]], [1, 2, 0]);
    const before = vm.allocatedBytes();
    vm.writePages([3, 4, 9], new Uint8Array(0), true);
    assert.deepEqual([ram[9 * PG], ram[3 * PG]], [0, 0]);
    assert.ok(vm.allocatedBytes() < before);
  } finally {
    m.unmap();
    reg.destroyAll();
  }
});
