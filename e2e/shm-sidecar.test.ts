// e2e: the real shm-sidecar process against a real nats-server, called over gRPC,
// with its files mapped MAP_SHARED by this process and by a second one.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { credentials, Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { connectNats, Registry, startNatsServer, type NatsServerHandle } from "@virtmesh/nats";
import { sidecar } from "@virtmesh/proto";
import { mapFile, type SharedMapping } from "@virtmesh/shm";
import { DirtyLog } from "@virtmesh/virtqueue";

// Resolved from this file, so the suite tests the clone it lives in, wherever that is.
const ROOT = resolve(__dirname, "..");
const SIDECAR_MAIN = join(ROOT, "services/shm-sidecar/src/main.ts");
const HOST = "t1";
const MIB = 1 << 20;
const PG = 4096;
const MAX_VM_BYTES = 256 * MIB;

let nats: NatsServerHandle | undefined;
let child: ChildProcess | undefined;
let nc: NatsConnection | undefined;
let sub: Subscription | undefined;
let client: sidecar.SharedMemoryServiceClient | undefined;
let tmp = "";
let shmDir = "";
let childStderr = "";
let childExit: Promise<{ code: number | null; signal: NodeJS.Signals | null }> | undefined;
// A second sidecar with a shm directory it cannot create: must stop at start with one line.
let badChild: ChildProcess | undefined;
let badExit: Promise<{ code: number | null; stderr: string }> | undefined;
const events: Array<{ subject: string; body: Record<string, unknown> }> = [];
const mappings: SharedMapping[] = [];

type Unary<Req, Res> = (req: Req, md: Metadata, opts: { deadline: number }, cb: (e: ServiceError | null, r?: Res) => void) => unknown;

function call<Req, Res>(method: Unary<Req, Res>, req: Req): Promise<Res> {
  return new Promise((resolve, reject) =>
    method.call(client, req, new Metadata(), { deadline: Date.now() + 10_000 }, (e, r) => (e ? reject(e) : resolve(r!))),
  );
}

const c = () => client!;

async function rejects(p: Promise<unknown>, code: Status, re: RegExp): Promise<void> {
  await assert.rejects(p, (e: ServiceError) => {
    assert.equal(e.code, code, `expected ${Status[code]}, got ${Status[e.code]}: ${e.details}`);
    assert.match(e.details, re);
    return true;
  });
}

function map(path: string, size: number): SharedMapping {
  const m = mapFile(path, size);
  mappings.push(m);
  return m;
}

async function waitFor<T>(what: string, f: () => T | undefined, ms = 5000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

before(async () => {
  nats = await startNatsServer();
  tmp = mkdtempSync("/dev/shm/virtmesh-test-");
  // A directory that does not exist yet: the sidecar creates it and must remove it.
  shmDir = join(tmp, "shm");
  child = spawn(process.execPath, ["--require", "tsx/cjs", SIDECAR_MAIN], {
    env: {
      ...process.env,
      NATS_URL: nats.url,
      VIRTMESH_HOST: HOST,
      VIRTMESH_SHM_DIR: shmDir,
      VIRTMESH_MAX_VM_BYTES: String(MAX_VM_BYTES),
      OTEL_SDK_DISABLED: "true",
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  child.stderr?.on("data", (d: Buffer) => (childStderr = (childStderr + d.toString()).slice(-8000)));
  const proc = child;
  childExit = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
  badChild = spawn(process.execPath, ["--require", "tsx/cjs", SIDECAR_MAIN], {
    env: { ...process.env, NATS_URL: nats.url, VIRTMESH_HOST: "t2", VIRTMESH_SHM_DIR: "/proc/virtmesh-e2e/shm", OTEL_SDK_DISABLED: "true" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const bad = badChild;
  let badStderr = "";
  bad.stderr?.on("data", (d: Buffer) => (badStderr += d.toString()));
  badExit = new Promise((resolve) => bad.once("exit", (code) => resolve({ code, stderr: badStderr })));
  nc = await connectNats(nats.url, "shm-sidecar-e2e");
  sub = nc.subscribe(`virtmesh.${HOST}.shm-sidecar.>`, {
    callback: (err, msg) => {
      if (err) return;
      try {
        events.push({ subject: msg.subject, body: JSON.parse(msg.string()) as Record<string, unknown> });
      } catch {
        // heartbeats and lifecycle are JSON too; anything else is not ours to check
      }
    },
  });
  const registry = await Registry.open(nc);
  const entry = await registry.waitForService(HOST, "shm-sidecar", 30_000).catch((e: Error) => {
    throw new Error(`${e.message}; sidecar stderr: ${childStderr.slice(-1500)}`);
  });
  assert.equal(entry.meta.shmDir, shmDir);
  client = new sidecar.SharedMemoryServiceClient(entry.grpc, credentials.createInsecure());
});

after(async () => {
  for (const m of mappings) m.unmap();
  client?.close();
  if (child && child.exitCode === null && child.signalCode === null) {
    child.kill("SIGKILL");
    await childExit;
  }
  if (badChild && badChild.exitCode === null && badChild.signalCode === null) {
    badChild.kill("SIGKILL");
    await badExit;
  }
  sub?.unsubscribe();
  await nc?.close();
  await nats?.stop();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

test("a shm directory that cannot be created stops the sidecar at start with one clear line", async () => {
  const { code, stderr } = await badExit!;
  assert.equal(code, 2, stderr);
  assert.equal(
    stderr.trim(),
    "shm-sidecar@t2: bad configuration: VIRTMESH_SHM_DIR=/proc/virtmesh-e2e/shm cannot be created: ENOENT: no such file or directory, mkdir '/proc/virtmesh-e2e'",
  );
});

const QUEUES: sidecar.QueueSpec[] = [
  { device: "blk0", index: 0, size: 256 },
  { device: "balloon", index: 0, size: 64 },
  { device: "balloon", index: 1, size: 64 },
];

let vm1: sidecar.VmLayout;

test("CreateVm lays out memory, rings at the top, doorbells and dirty logs; DescribeVm and ListVms agree", async () => {
  vm1 = await call(c().createVm, { incoming: false, vm: "vm1", memoryBytes: 16 * MIB, queues: QUEUES });
  assert.equal(vm1.vm, "vm1");
  assert.equal(vm1.host, HOST);
  assert.equal(vm1.shmDir, shmDir);
  assert.equal(vm1.memoryPath, join(shmDir, "vm1", "memory"));
  assert.equal(vm1.memoryBytes, 16 * MIB);
  assert.equal(vm1.pageSize, PG);
  assert.equal(statSync(shmDir).mode & 0o777, 0o700);
  assert.equal(statSync(join(shmDir, "vm1")).mode & 0o777, 0o700);
  const st = statSync(vm1.memoryPath);
  assert.equal(st.mode & 0o777, 0o600);
  assert.equal(st.size, 16 * MIB);
  assert.ok(st.blocks * 512 < MIB, "memory file is sparse");
  // Reserved region: the top of guest memory, page aligned, holding every queue.
  assert.equal(vm1.reservedAddr + vm1.reservedBytes, vm1.memoryBytes);
  assert.equal(vm1.reservedAddr % PG, 0);
  assert.ok(vm1.reservedBytes > 0);
  assert.equal(vm1.queues.length, 3);
  let prevEnd = vm1.reservedAddr;
  for (const [i, q] of vm1.queues.entries()) {
    assert.equal(q.device, QUEUES[i]!.device);
    assert.equal(q.index, QUEUES[i]!.index);
    assert.equal(q.size, QUEUES[i]!.size);
    assert.ok(q.descAddr >= prevEnd && q.descAddr % PG === 0);
    assert.equal(q.availAddr, q.descAddr + 16 * q.size); // virtio 1.2 §2.7
    assert.ok(q.usedAddr >= q.availAddr + 6 + 2 * q.size && q.usedAddr % 4 === 0);
    prevEnd = q.usedAddr + 6 + 8 * q.size;
    assert.ok(prevEnd <= vm1.memoryBytes);
    for (const p of [q.kickPath, q.callPath]) {
      assert.ok(p.startsWith(join(shmDir, "vm1") + "/"), p);
      assert.equal(statSync(p).mode & 0o777, 0o600);
    }
  }
  assert.equal(vm1.queues[0]!.kickPath, join(shmDir, "vm1", "blk0.0.kick"));
  for (const p of [vm1.dirtyLogPath, vm1.deviceDirtyLogPath]) assert.equal(statSync(p).size, Math.ceil(16 * MIB / PG / 64) * 8);

  assert.deepEqual(await call(c().describeVm, { vm: "vm1" }), vm1);
  const list = await call(c().listVms, {});
  assert.deepEqual(list.vms.map((v) => v.vm), ["vm1"]);
  const ev = await waitFor("vm-created", () => events.find((e) => e.subject.endsWith(".vm-created")));
  assert.equal(ev.body.vm, "vm1");
  assert.equal(ev.body.memoryPath, vm1.memoryPath);
});

test("another process maps the memory file MAP_SHARED and sees this process's writes", async () => {
  const m = map(vm1.memoryPath, vm1.memoryBytes);
  const ram = new Uint8Array(m.buffer);
  const at = 3 * MIB + 123;
  ram.set(Buffer.from("hello from the guest"), at);
  const code = `const { mapFile } = require("@virtmesh/shm");
    const m = mapFile(${JSON.stringify(vm1.memoryPath)}, ${vm1.memoryBytes});
    const ram = new Uint8Array(m.buffer);
    process.stdout.write(Buffer.from(ram.subarray(${at}, ${at + 20})).toString());
    ram.set(Buffer.from("reply"), ${at + 4096});
    m.unmap();`;
  const r = spawnSync(process.execPath, ["--require", "tsx/cjs", "-e", code], { cwd: ROOT, encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, "hello from the guest");
  assert.equal(Buffer.from(ram.subarray(at + 4096, at + 4096 + 5)).toString(), "reply");
  const u = await call(c().memoryUsage, { vm: "vm1" });
  assert.equal(u.memoryBytes, vm1.memoryBytes);
  assert.ok(u.allocatedBytes >= 2 * PG, `allocated ${u.allocatedBytes}`);
});

test("bad names, sizes, queues and duplicates get INVALID_ARGUMENT / RESOURCE_EXHAUSTED / ALREADY_EXISTS naming the field", async () => {
  for (const vm of ["../x", "A", "", "a/b", "-x", "x".repeat(64)]) {
    await rejects(call(c().createVm, { incoming: false, vm, memoryBytes: MIB, queues: [] }), Status.INVALID_ARGUMENT, /^vm '.*' is not a valid name/);
  }
  await rejects(call(c().describeVm, { vm: "../vm1" }), Status.INVALID_ARGUMENT, /vm '\.\.\/vm1' is not a valid name/);
  await rejects(call(c().createVm, { incoming: false, vm: "v2", memoryBytes: 0, queues: [] }), Status.INVALID_ARGUMENT, /memory_bytes 0 must be a positive multiple of 4096/);
  await rejects(call(c().createVm, { incoming: false, vm: "v2", memoryBytes: 5000, queues: [] }), Status.INVALID_ARGUMENT, /memory_bytes 5000 is not a multiple of the 4096-byte page size/);
  await rejects(
    call(c().createVm, { incoming: false, vm: "v2", memoryBytes: MAX_VM_BYTES + PG, queues: [] }),
    Status.RESOURCE_EXHAUSTED,
    /memory_bytes 268439552 exceeds this sidecar's limit of 268435456 bytes \(VIRTMESH_MAX_VM_BYTES\)/,
  );
  await rejects(call(c().createVm, { incoming: false, vm: "v2", memoryBytes: 2 ** 60, queues: [] }), Status.INVALID_ARGUMENT, /CreateVm: the request cannot be decoded.*2\^53-1/);
  await rejects(
    call(c().createVm, { incoming: false, vm: "v2", memoryBytes: MIB, queues: [{ device: "blk0", index: 0, size: 3 }] }),
    Status.INVALID_ARGUMENT,
    /queues\[0\]\.size 3 is not a power of 2 in \[1, 32768\]/,
  );
  await rejects(
    call(c().createVm, { incoming: false, vm: "v2", memoryBytes: MIB, queues: [{ device: "blk0", index: 0, size: 65536 }] }),
    Status.INVALID_ARGUMENT,
    /queues\[0\]\.size 65536/,
  );
  await rejects(
    call(c().createVm, { incoming: false, vm: "v2", memoryBytes: MIB, queues: [{ device: "Blk", index: 0, size: 8 }] }),
    Status.INVALID_ARGUMENT,
    /queues\[0\]\.device 'Blk' is not a valid name/,
  );
  await rejects(
    call(c().createVm, { incoming: false, vm: "v2", memoryBytes: MIB, queues: [QUEUES[0]!, QUEUES[0]!] }),
    Status.INVALID_ARGUMENT,
    /queues\[1\]: device 'blk0' queue 0 is listed twice/,
  );
  await rejects(
    call(c().createVm, { incoming: false, vm: "v2", memoryBytes: 2 * PG, queues: [{ device: "blk0", index: 0, size: 256 }] }),
    Status.INVALID_ARGUMENT,
    /queues need 12288 bytes at the top of guest memory; memory_bytes 8192 must be larger/,
  );
  await rejects(call(c().createVm, { incoming: false, vm: "vm1", memoryBytes: MIB, queues: [] }), Status.ALREADY_EXISTS, /vm 'vm1' already exists on host t1/);
  await rejects(call(c().describeVm, { vm: "nope" }), Status.NOT_FOUND, /vm 'nope' does not exist on host t1/);
  // Nothing was created by any refused request.
  assert.deepEqual(readdirSync(shmDir), ["vm1"]);
  assert.deepEqual(await call(c().destroyVm, { vm: "nope" }), { existed: false });
});

test("ReleasePages punches pages out of the file and allocated bytes drop", async () => {
  const m = map(vm1.memoryPath, vm1.memoryBytes);
  new Uint8Array(m.buffer, 4 * MIB, 2 * MIB).fill(0xa5);
  const before = (await call(c().memoryUsage, { vm: "vm1" })).allocatedBytes;
  assert.ok(before >= 2 * MIB);
  const r = await call(c().releasePages, { vm: "vm1", guestAddr: 4 * MIB, length: 2 * MIB });
  assert.ok(before - r.allocatedBytes >= 2 * MIB, `allocated ${before} -> ${r.allocatedBytes}`);
  assert.equal((await call(c().memoryUsage, { vm: "vm1" })).allocatedBytes, r.allocatedBytes);
  assert.ok(new Uint8Array(m.buffer, 4 * MIB, 2 * MIB).every((b) => b === 0), "released pages read as zeros");

  await rejects(call(c().releasePages, { vm: "vm1", guestAddr: 100, length: PG }), Status.INVALID_ARGUMENT, /guest_addr 0x64 is not a multiple of the 4096-byte page size/);
  await rejects(call(c().releasePages, { vm: "vm1", guestAddr: 0, length: 0 }), Status.INVALID_ARGUMENT, /length 0 must be a positive multiple/);
  await rejects(call(c().releasePages, { vm: "vm1", guestAddr: 16 * MIB, length: PG }), Status.OUT_OF_RANGE, /ends past guest memory of 16777216 bytes/);
  await rejects(
    call(c().releasePages, { vm: "vm1", guestAddr: vm1.reservedAddr, length: PG }),
    Status.INVALID_ARGUMENT,
    /overlaps the virtqueue region/,
  );
});

test("dirty log: off -> FAILED_PRECONDITION; on; fetch-and-clear sees other processes' bits once", async () => {
  const K = sidecar.DirtyLogKind;
  await rejects(call(c().fetchDirtyLog, { vm: "vm1", kind: K.DIRTY_LOG_KIND_VCPU, clear: true }), Status.FAILED_PRECONDITION, /dirty logging is off for vm 'vm1'/);
  assert.deepEqual(await call(c().setDirtyLogging, { vm: "vm1", enabled: true }), { enabled: true });
  await waitFor("dirty-logging", () => events.find((e) => e.subject.endsWith(".dirty-logging")));
  await rejects(call(c().fetchDirtyLog, { vm: "vm1", kind: K.DIRTY_LOG_KIND_UNSPECIFIED, clear: true }), Status.INVALID_ARGUMENT, /kind 0 must be DIRTY_LOG_KIND_VCPU/);

  const vcpu = new DirtyLog(map(vm1.dirtyLogPath, statSync(vm1.dirtyLogPath).size).buffer, vm1.memoryBytes);
  const dev = new DirtyLog(map(vm1.deviceDirtyLogPath, statSync(vm1.deviceDirtyLogPath).size).buffer, vm1.memoryBytes);
  vcpu.markPage(0);
  vcpu.markRange(40 * PG, 3 * PG); // pages 40, 41, 42
  vcpu.markPage(4095);
  dev.markPage(7);

  const peek = await call(c().fetchDirtyLog, { vm: "vm1", kind: K.DIRTY_LOG_KIND_BOTH, clear: false });
  assert.equal(peek.pages, 4096);
  assert.equal(peek.dirty, 6);
  assert.equal(peek.bitmap.length, 4096 / 8);
  const got = await call(c().fetchDirtyLog, { vm: "vm1", kind: K.DIRTY_LOG_KIND_VCPU, clear: true });
  assert.equal(got.dirty, 5);
  const bit = (b: Uint8Array, n: number) => ((b[n >> 3]! >> (n & 7)) & 1) === 1;
  for (const n of [0, 40, 41, 42, 4095]) assert.ok(bit(got.bitmap, n), `page ${n}`);
  assert.ok(!bit(got.bitmap, 7) && !bit(got.bitmap, 39) && !bit(got.bitmap, 43));
  assert.equal(vcpu.countDirty(), 0, "cleared in the shared file");
  assert.equal((await call(c().fetchDirtyLog, { vm: "vm1", kind: K.DIRTY_LOG_KIND_VCPU, clear: true })).dirty, 0);
  const d = await call(c().fetchDirtyLog, { vm: "vm1", kind: K.DIRTY_LOG_KIND_DEVICE, clear: true });
  assert.equal(d.dirty, 1);
  assert.ok(bit(d.bitmap, 7));
});

test("IOMMU: DMA map, pin, DIRTY_PAGES start/get-bitmap/stop with the seed's checks; unmap feeds the device log", async () => {
  const START = 1, STOP = 2, GET = 4;
  const iova = 0x10_0000;
  await call(c().dmaMap, { vm: "vm1", iova, vaddr: 0x20_0000, size: MIB, flags: 3 });
  await rejects(call(c().dmaMap, { vm: "vm1", iova: 0x1000, vaddr: 100, size: PG, flags: 3 }), Status.INVALID_ARGUMENT, /vaddr/);
  await rejects(call(c().dmaMap, { vm: "vm1", iova: 0x4000_0000, vaddr: 16 * MIB, size: PG, flags: 3 }), Status.OUT_OF_RANGE, /guest memory/);
  const pin = await call(c().pinPages, { vm: "vm1", iovas: [iova, iova + PG] });
  assert.deepEqual(pin.guestPfns, [0x200, 0x201]);

  // Before START: GET_BITMAP is refused.
  const get = { vm: "vm1", argsz: 48, flags: GET, iova, size: MIB, pgsize: PG, bitmapSize: 32, reportMode: 0 };
  await rejects(call(c().dirtyPages, get), Status.FAILED_PRECONDITION, /track/i);
  await call(c().dirtyPages, { ...get, argsz: 8, flags: START });
  let info = await call(c().iommuInfo, { vm: "vm1" });
  assert.equal(info.dirtyTracking, true);
  assert.equal(info.pinnedPages, 2);
  assert.equal(info.mappings, 1);

  // The seed's argument checks, each INVALID_ARGUMENT with the field named.
  await rejects(call(c().dirtyPages, { ...get, argsz: 4 }), Status.INVALID_ARGUMENT, /argsz 4 is smaller than the 8-byte/);
  await rejects(call(c().dirtyPages, { ...get, flags: 8 }), Status.INVALID_ARGUMENT, /flags 0x8 has bits outside START/);
  await rejects(call(c().dirtyPages, { ...get, flags: START | GET }), Status.INVALID_ARGUMENT, /flags 0x5 selects more than one operation/);
  await rejects(call(c().dirtyPages, { ...get, argsz: 40 }), Status.INVALID_ARGUMENT, /argsz 40 is too small for GET_BITMAP/);
  await rejects(call(c().dirtyPages, { ...get, pgsize: 8192 }), Status.INVALID_ARGUMENT, /pgsize 8192 must equal the IOMMU minimum page size 4096/);
  await rejects(call(c().dirtyPages, { ...get, iova: iova + 1 }), Status.INVALID_ARGUMENT, /iova 0x100001 is not a multiple/);
  await rejects(call(c().dirtyPages, { ...get, size: 0 }), Status.INVALID_ARGUMENT, /size 0 covers no page/);
  await rejects(call(c().dirtyPages, { ...get, bitmapSize: 0 }), Status.INVALID_ARGUMENT, /bitmap_size 0 has no room/);
  await rejects(call(c().dirtyPages, { ...get, bitmapSize: 31 }), Status.INVALID_ARGUMENT, /bitmap_size 31 is too small: 256 pages/);
  // iova + size wraps 2^64 (seed L369): the value reaches the check exactly, past 2^53.
  await rejects(call(c().dirtyPages, { ...get, iova: 2 ** 64 - 4096, size: 8192 }), Status.INVALID_ARGUMENT, /iova 0xfffffffffffff000 \+ size 0x2000 overflows 64 bits/);
  await rejects(call(c().dirtyPages, { ...get, reportMode: 9 }), Status.INVALID_ARGUMENT, /report_mode 9/);

  // Valid bitmap_size (the seed returned uninitialised ret here): pinned pages are dirty.
  const all = await call(c().dirtyPages, get);
  assert.equal(all.bitmap.length, 32);
  assert.equal(all.dirty, 2);
  assert.equal(all.bitmap[0], 0b11);
  // Pre-copy without pinned pages vs the pinned set alone (the thread's downtime debate).
  const unpinned = await call(c().dirtyPages, { ...get, reportMode: sidecar.DirtyReport.DIRTY_REPORT_UNPINNED });
  assert.equal(unpinned.dirty, 0);
  const pinned = await call(c().dirtyPages, { ...get, reportMode: sidecar.DirtyReport.DIRTY_REPORT_PINNED });
  assert.equal(pinned.dirty, 2);

  // Unpin one page while tracking: still reported once (seed L139-L140).
  assert.equal((await call(c().unpinPages, { vm: "vm1", iovas: [iova + PG] })).unpinned, 1);
  const after1 = await call(c().dirtyPages, get);
  assert.equal(after1.dirty, 2);
  assert.equal((await call(c().dirtyPages, get)).dirty, 1);

  // Unmap while tracking: the pinned page's gpa lands in the device dirty log.
  await call(c().fetchDirtyLog, { vm: "vm1", kind: sidecar.DirtyLogKind.DIRTY_LOG_KIND_DEVICE, clear: true });
  await rejects(call(c().dmaUnmap, { vm: "vm1", iova, size: PG }), Status.INVALID_ARGUMENT, /would split the mapping/);
  assert.equal((await call(c().dmaUnmap, { vm: "vm1", iova, size: MIB })).unmappedBytes, MIB);
  const devLog = await call(c().fetchDirtyLog, { vm: "vm1", kind: sidecar.DirtyLogKind.DIRTY_LOG_KIND_DEVICE, clear: true });
  assert.equal(devLog.dirty, 1);
  assert.equal(devLog.bitmap[0x200 >> 3]! & 1, 1);
  await rejects(call(c().dirtyPages, get), Status.NOT_FOUND, /iova 0x100000 is not mapped/);
  await call(c().dirtyPages, { ...get, argsz: 8, flags: STOP });
  info = await call(c().iommuInfo, { vm: "vm1" });
  assert.equal(info.dirtyTracking, false);
  assert.equal(info.mappings, 0);
  await rejects(call(c().iommuInfo, { vm: "ghost" }), Status.NOT_FOUND, /vm 'ghost'/);
});

test("ReceivePages writes migrated pages into guest memory; zero batches punch holes; bad pfns refused", async () => {
  const send = (batches: sidecar.PageBatch[]) =>
    new Promise<sidecar.ReceivePagesResponse>((resolve, reject) => {
      const s = c().receivePages((e, r) => (e ? reject(e) : resolve(r!)));
      for (const b of batches) s.write(b);
      s.end();
    });
  const data = Buffer.alloc(2 * PG, 0x5a);
  const r = await send([
    { vm: "vm1", round: 1, pfns: [10, 12], data, zero: false },
    { vm: "vm1", round: 1, pfns: [10], data: Buffer.alloc(0), zero: true },
  ]);
  assert.deepEqual(r, { pages: 3, bytes: 2 * PG });
  const ram = new Uint8Array(map(vm1.memoryPath, vm1.memoryBytes).buffer);
  assert.equal(ram[12 * PG], 0x5a);
  assert.equal(ram[10 * PG], 0);
  await rejects(send([{ vm: "vm1", round: 2, pfns: [4096], data: Buffer.alloc(PG), zero: false }]), Status.OUT_OF_RANGE, /pfns\[0\] 4096 is past guest memory/);
  await rejects(send([{ vm: "vm1", round: 2, pfns: [1], data: Buffer.alloc(10), zero: false }]), Status.INVALID_ARGUMENT, /data has 10 bytes/);
});

test("DestroyVm removes the VM's files; SIGTERM exits 0 and leaves nothing in /dev/shm", async () => {
  await call(c().createVm, { incoming: false, vm: "vm2", memoryBytes: 8 * MIB, queues: [{ device: "blk0", index: 0, size: 128 }] });
  await call(c().createVm, { incoming: false, vm: "vm3", memoryBytes: 4 * MIB, queues: [] });
  assert.deepEqual(await call(c().destroyVm, { vm: "vm3" }), { existed: true });
  assert.ok(!existsSync(join(shmDir, "vm3")));
  await waitFor("vm-destroyed", () => events.find((e) => e.subject.endsWith(".vm-destroyed") && e.body.vm === "vm3"));
  assert.deepEqual(readdirSync(shmDir).sort(), ["vm1", "vm2"]);

  // This process still maps vm1's files: the sidecar must remove them anyway.
  child!.kill("SIGTERM");
  const { code, signal } = await childExit!;
  assert.equal(signal, null, childStderr);
  assert.equal(code, 0, childStderr);
  assert.ok(!existsSync(shmDir), `${shmDir} still exists: ${existsSync(shmDir) ? readdirSync(shmDir).join(",") : ""}`);
  assert.deepEqual(readdirSync(tmp), []);
});
