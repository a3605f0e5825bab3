// CompletionQueues (the AttachQueue / DetachQueue rules) over real files in a
// private shm directory laid out as the shm-sidecar and vhost-worker lay them out:
// <dir>/<vm>/memory, <dir>/<vm>/<device>.<index>.call, <dir>/vhost-blk.<vm>.<device>.<index>.cring.
// This process is vhost-worker (it pushes completions) and the guest (it reads used->idx).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { status as Status } from "@grpc/grpc-js";
import type { completion } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { COMPLETION_DOORBELL_OFFSET, CompletionRing, completionRingBytes, completionRingFileName } from "@virtmesh/virtio-blk";
import { splitQueueLayout } from "@virtmesh/virtqueue";
import { attachFile, CompletionQueues } from "./queues";

const MEM = 1 << 20;
const QSIZE = 16;
const DEV = "blk0";
let dir = "";
const maps: SharedMapping[] = [];
const bells: Doorbell[] = [];
let queues: CompletionQueues;
const logged: string[] = [];

interface FakeVm {
  vm: string;
  mem: SharedMapping;
  cringMap: SharedMapping;
  ring: CompletionRing;
  bell: Doorbell;
  usedAddr: number;
  req: completion.AttachQueueRequest;
}
const vms = new Map<string, FakeVm>();

function makeVm(vm: string): FakeVm {
  mkdirSync(join(dir, vm), { mode: 0o700 });
  const memoryPath = join(dir, vm, "memory");
  const mem = mapFile(memoryPath, MEM, { create: true });
  maps.push(mem);
  const callPath = join(dir, vm, `${DEV}.0.call`);
  bells.push(Doorbell.create(callPath));
  const deviceDirtyLogPath = join(dir, vm, "dirty-device");
  maps.push(mapFile(deviceDirtyLogPath, Math.ceil(MEM / 4096 / 64) * 8, { create: true }));
  const l = splitQueueLayout(QSIZE, MEM - 4 * 4096, { usedAlign: 4096 });
  const cringPath = join(dir, completionRingFileName(vm, DEV, 0));
  const cringMap = mapFile(cringPath, completionRingBytes(QSIZE), { create: true });
  maps.push(cringMap);
  const ring = CompletionRing.init(cringMap.buffer, { size: QSIZE, descAddr: l.descAddr, availAddr: l.availAddr, usedAddr: l.usedAddr }, 0);
  const bell = Doorbell.attach(cringMap, COMPLETION_DOORBELL_OFFSET, true);
  bells.push(bell);
  const v: FakeVm = {
    vm,
    mem,
    cringMap,
    ring,
    bell,
    usedAddr: l.usedAddr,
    req: { vm, device: DEV, index: 0, completionRingPath: cringPath, eventIdx: false, callPath, memoryPath, deviceDirtyLogPath },
  };
  vms.set(vm, v);
  return v;
}

const usedIdx = (v: FakeVm) => new Uint16Array(v.mem.buffer, v.usedAddr + 2, 1)[0]!;

/** vhost-worker's side: one completion in the ring, then the ring's doorbell; resolves once the used element is published. */
async function complete(v: FakeVm, id: number): Promise<void> {
  const before = usedIdx(v);
  assert.ok(v.ring.push(id, 0, 1, 0x100 + id));
  v.bell.ring();
  await waitFor(() => usedIdx(v) === ((before + 1) & 0xffff));
}

async function refused(p: Promise<unknown>, code: Status, re: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof GrpcError, String(e));
    assert.equal(e.code, code, `${Status[e.code]}: ${e.message}`);
    assert.match(e.message, re);
    return true;
  });
}

before(() => {
  dir = mkdtempSync("/dev/shm/virtmesh-test-ct-");
  queues = new CompletionQueues(dir, { info: () => undefined, warn: (m) => void logged.push(m), error: (m) => void logged.push(m) });
  makeVm("vm1");
  makeVm("vm2");
});

after(async () => {
  await queues?.stopAll();
  for (const b of bells) b.close();
  for (const m of maps) m.unmap();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test("attach, complete, detach", async () => {
  const v = vms.get("vm1")!;
  await queues.attach(v.req);
  assert.ok(existsSync(attachFile(dir, "vm1", DEV, 0)));
  await complete(v, 3);
  assert.equal(queues.list()[0]?.completed, 1);
  assert.equal(await queues.detach(v.req), 1);
  assert.equal(existsSync(attachFile(dir, "vm1", DEV, 0)), false);
  await queues.attach(v.req);
  await queues.attach(vms.get("vm2")!.req);
});

test("a refused re-attach of a live queue (path outside the shm directory) changes nothing: the queue keeps completing", async () => {
  const v = vms.get("vm1")!;
  const live = queues.queues.get("vm1/blk0/0");
  assert.ok(live);
  await refused(queues.attach({ ...v.req, completionRingPath: "/etc/passwd" }), Status.INVALID_ARGUMENT, /completion_ring_path .* is not/);
  await refused(queues.attach({ ...v.req, memoryPath: join(dir, "..", "x", "memory") }), Status.INVALID_ARGUMENT, /memory_path/);
  await refused(queues.attach({ ...v.req, callPath: join(dir, "vm1", "nope.0.call") }), Status.INVALID_ARGUMENT, /call_path/);
  assert.equal(queues.queues.get("vm1/blk0/0"), live, "the live attachment was not replaced");
  assert.ok(existsSync(attachFile(dir, "vm1", DEV, 0)), "its restart record is still there");
  await complete(v, 4);
  await complete(v, 5);
});

test("a re-attach whose files fail to open leaves the live queue attached", async () => {
  const v = vms.get("vm1")!;
  const live = queues.queues.get("vm1/blk0/0");
  // The VM's own doorbell, gone: the names pass, opening fails.
  renameSync(v.req.callPath, `${v.req.callPath}.away`);
  try {
    await refused(queues.attach(v.req), Status.NOT_FOUND, /blk0\.0\.call/);
  } finally {
    renameSync(`${v.req.callPath}.away`, v.req.callPath);
  }
  assert.equal(queues.queues.get("vm1/blk0/0"), live);
  await complete(v, 6);
});

test("another VM's completion ring, doorbell and memory under a new key are refused", async () => {
  const v1 = vms.get("vm1")!;
  const v2 = vms.get("vm2")!;
  const stolen = { ...v1.req, vm: "vm3" };
  await refused(queues.attach(stolen), Status.INVALID_ARGUMENT, /not vm3's/);
  await refused(queues.attach({ ...v1.req, vm: "vm2" }), Status.INVALID_ARGUMENT, /not vm2's/);
  await refused(queues.attach({ ...v1.req, device: "blk1" }), Status.INVALID_ARGUMENT, /completion_ring_path/);
  // vm2's own ring with vm1's memory or doorbell.
  await refused(queues.attach({ ...v2.req, memoryPath: v1.req.memoryPath }), Status.INVALID_ARGUMENT, /memory_path .* not vm2's/);
  await refused(queues.attach({ ...v2.req, callPath: v1.req.callPath }), Status.INVALID_ARGUMENT, /call_path .* not vm2's/);
  await refused(queues.attach({ ...v2.req, deviceDirtyLogPath: v1.req.deviceDirtyLogPath }), Status.INVALID_ARGUMENT, /device_dirty_log_path .* not vm2's/);
  assert.deepEqual(queues.list().map((q) => q.vm).sort(), ["vm1", "vm2"]);
  await complete(v1, 7);
  await complete(v2, 1);
});

test("a symlink named like the VM's file is refused; so is a ring another live process consumes", async () => {
  makeVm("vm4");
  const v4 = vms.get("vm4")!;
  const v1 = vms.get("vm1")!;
  // vm5's ring name, pointing at vm1's ring.
  mkdirSync(join(dir, "vm5"));
  const link = join(dir, completionRingFileName("vm5", DEV, 0));
  symlinkSync(v1.req.completionRingPath, link);
  await refused(queues.attach({ ...v4.req, vm: "vm5", completionRingPath: link, callPath: join(dir, "vm5", `${DEV}.0.call`), memoryPath: join(dir, "vm5", "memory"), deviceDirtyLogPath: "" }), Status.INVALID_ARGUMENT, /symbolic link|not a regular file/);
  // The parent process (alive) is vm4's ring's consumer.
  v4.ring.consumerPid = process.ppid;
  await refused(queues.attach(v4.req), Status.FAILED_PRECONDITION, new RegExp(`consumer: live pid ${process.ppid}`));
  assert.equal(queues.queues.has("vm4/blk0/0"), false);
  v4.ring.consumerPid = 0;
  await queues.attach(v4.req);
  await complete(v4, 2);
});

async function waitFor(f: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!f()) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 5));
  }
}
