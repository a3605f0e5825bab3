// VhostBlkDevice without the stack: a driver in this process, real MAP_SHARED files
// under /dev/shm, a real image file. Covers the worker's crash recovery
// deterministically: the test leaves behind exactly the shared state a worker killed
// mid-flight would (inflight region, completion ring, device state file) and checks the
// restarted device re-submits only what never reached the ring.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, ftruncateSync, openSync, closeSync } from "node:fs";
import { join } from "node:path";
import { Doorbell, mapFile } from "@virtmesh/shm";
import { DriverQueue, GuestMemory, splitQueueLayout, VIRTIO_F_VERSION_1 } from "@virtmesh/virtqueue";
import {
  CompletionRing,
  completionRingBytes,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_OUT,
  bit,
  writeBlkHeader,
} from "@virtmesh/virtio-blk";
import { DeviceTable } from "./table";
import { writeStateFile, type PersistedDevice } from "./persist";

const dir = mkdtempSync("/dev/shm/virtmesh-test-vhost-");
after(() => rmSync(dir, { recursive: true, force: true }));

const MEM = 1 << 20;
const N = 16;

for (const racy of [false, true]) {
test(`a restarted worker re-submits exactly the heads whose completion never reached the ring${racy ? " (killed between marking a head and storing last_avail_idx)" : ""}`, async () => {
  const sub = mkdtempSync(join(dir, "t-"));
  const memPath = join(sub, "memory");
  const mem = mapFile(memPath, MEM, { create: true });
  const g = new GuestMemory(mem.buffer);
  const q = splitQueueLayout(N, 0x80000, { usedAlign: 4096 });
  const dq = new DriverQueue(g, { size: N, descAddr: q.descAddr, availAddr: q.availAddr, usedAddr: q.usedAddr });
  const kick = Doorbell.create(join(sub, "kick"));
  const call = Doorbell.create(join(sub, "call"));
  const img = join(sub, "disk.img");
  const fd = openSync(img, "w");
  ftruncateSync(fd, 1 << 20);
  closeSync(fd);

  // The guest put four writes in flight: block i gets bytes of value 0x10 + i.
  const status = (i: number) => 0x1000 + i * 64 + 32;
  for (let i = 0; i < 4; i++) {
    writeBlkHeader(g.vcpu, 0x1000 + i * 64, VIRTIO_BLK_T_OUT, i * 8);
    g.bytes.fill(0x10 + i, 0x10000 + i * 4096, 0x10000 + (i + 1) * 4096);
    g.vcpu.writeU8(status(i), 0xff);
    assert.equal(dq.add([{ addr: 0x1000 + i * 64, len: 16 }, { addr: 0x10000 + i * 4096, len: 4096 }], [{ addr: status(i), len: 1 }]), i * 3);
  }

  // What the killed worker left: it popped all four (heads 0, 3, 6, 9), the
  // completion of the second (head 3) is in the ring, the others were still in I/O.
  const heads = [0, 3, 6, 9];
  const cringPath = join(sub, "vhost-blk.vm9.blk0.0.cring");
  const cmap = mapFile(cringPath, completionRingBytes(N), { create: true });
  const ring = CompletionRing.init(cmap.buffer, { size: N, descAddr: q.descAddr, availAddr: q.availAddr, usedAddr: q.usedAddr }, 0);
  Doorbell.attach(cmap, 64, true).close();
  // racy: the last head is marked but last_avail_idx still says 3, so the restarted
  // worker pops avail[3] (head 9) again and must not submit it twice.
  heads.forEach((h, i) => ring.markSubmitted(h, racy && i === 3 ? 3 : i + 1));
  ring.push(3, VIRTIO_BLK_S_OK, 1, status(1));
  const st: PersistedDevice = {
    vm: "vm9",
    device: "blk0",
    memoryPath: memPath,
    memoryBytes: MEM,
    kickPath: kick.path,
    callPath: call.path,
    logPath: "",
    setup: {
      features: bit(VIRTIO_F_VERSION_1),
      num: N,
      descAddr: q.descAddr,
      availAddr: q.availAddr,
      usedAddr: q.usedAddr,
      addrFlags: 0,
      logGuestAddr: 0,
      base: 0,
      backend: { kind: "file", path: img, capacityBytes: 1 << 20 },
      mode: "parallel",
      cgroup: "",
      serial: new Uint8Array(20).fill(0x41),
    },
  };
  writeStateFile(join(sub, "vhost-blk.vm9.blk0.dev.json"), st);

  const errors: string[] = [];
  const table = new DeviceTable({ shmDir: sub, describeVm: () => Promise.reject(new Error("not used")), warn: (m) => errors.push(m) });
  const logged: Record<string, unknown>[] = [];
  assert.equal(table.restoreAll((_m, f) => logged.push(f)), 1);
  const dev = table.devices.get("vm9/blk0");
  assert.ok(dev, "the device is served again");
  const resubmitted = logged[0]!.resubmitted;
  try {
    assert.equal(resubmitted, 3);
    assert.equal(dev.recovered?.pushedNotMarked, 1, "head 3 was in the ring: moved to PUSHED, not re-submitted");
    // Consume as the completion-thread would: every head exactly once.
    const deadline = Date.now() + 5000;
    while (ring.pending < 4 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    assert.equal(ring.pending, 4);
    const ids = [];
    for (let i = ring.head; i !== ring.tail; i++) {
      ids.push(ring.entryId(i));
      assert.equal(ring.entryStatus(i), VIRTIO_BLK_S_OK);
    }
    assert.deepEqual(ids.sort((a, b) => a - b), [0, 3, 6, 9]);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(ring.pending, 4, "nothing completed twice (the avail ring was not re-popped)");
    const disk = readFileSync(img);
    for (const i of [0, 2, 3]) assert.ok(disk.subarray(i * 4096, (i + 1) * 4096).every((b) => b === 0x10 + i), `block ${i} written`);
    assert.deepEqual(errors, []);
  } finally {
    await dev.close(2000, true).catch(() => undefined);
    kick.close();
    call.close();
    cmap.unmap();
    mem.unmap();
  }
});
}
