// e2e: the migration page stream between two real shm-sidecar processes (hosts t1
// and t2) on one real nats-server: an incoming VM on t2, the migration bitmap on
// t1, a bulk round, a dirty round from the vCPU and device logs, and the memory
// checksums of both sides.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { credentials, Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";
import type { NatsConnection } from "@nats-io/transport-node";
import { connectNats, Registry, startNatsServer, type NatsServerHandle } from "@virtmesh/nats";
import { sidecar } from "@virtmesh/proto";
import { mapFile, type SharedMapping } from "@virtmesh/shm";
import { DirtyLog } from "@virtmesh/virtqueue";

// Resolved from this file, so the suite tests the clone it lives in, wherever that is.
const ROOT = resolve(__dirname, "..");
const SIDECAR_MAIN = join(ROOT, "services/shm-sidecar/src/main.ts");
const MIB = 1 << 20;
const PG = 4096;
const SRC_MAX = 256 * MIB;
const DST_MAX = 32 * MIB;
const VM_BYTES = 16 * MIB;
const PAGES = VM_BYTES / PG;
const QUEUES: sidecar.QueueSpec[] = [
  { device: "blk0", index: 0, size: 256 },
  { device: "balloon", index: 0, size: 64 },
];

interface Sidecar {
  host: string;
  shmDir: string;
  child: ChildProcess;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr: () => string;
  client?: sidecar.SharedMemoryServiceClient;
}

let nats: NatsServerHandle | undefined;
let nc: NatsConnection | undefined;
let tmp = "";
const sidecars: Sidecar[] = [];
const mappings: SharedMapping[] = [];
let src: Sidecar;
let dst: Sidecar;

type Unary<Req, Res> = (req: Req, md: Metadata, opts: { deadline: number }, cb: (e: ServiceError | null, r?: Res) => void) => unknown;

function call<Req, Res>(s: Sidecar, method: (c: sidecar.SharedMemoryServiceClient) => Unary<Req, Res>, req: Req): Promise<Res> {
  const c = s.client!;
  return new Promise((res, rej) =>
    method(c).call(c, req, new Metadata(), { deadline: Date.now() + 30_000 }, (e, r) => (e ? rej(e) : res(r!))),
  );
}

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

function bitmapOf(pages: number, set: Iterable<number>): Buffer {
  const b = Buffer.alloc(Math.ceil(pages / 64) * 8);
  for (const n of set) b[n >> 3]! |= 1 << (n & 7);
  return b;
}

function startSidecar(host: string, maxVmBytes: number): Sidecar {
  const shmDir = join(tmp, host);
  const child = spawn(process.execPath, ["--require", "tsx/cjs", SIDECAR_MAIN], {
    env: {
      ...process.env,
      NATS_URL: nats!.url,
      VIRTMESH_HOST: host,
      VIRTMESH_SHM_DIR: shmDir,
      VIRTMESH_MAX_VM_BYTES: String(maxVmBytes),
      OTEL_SDK_DISABLED: "true",
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-8000)));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.once("exit", (code, signal) => r({ code, signal })));
  const s: Sidecar = { host, shmDir, child, exit, stderr: () => stderr };
  sidecars.push(s);
  return s;
}

async function stopSidecar(s: Sidecar): Promise<void> {
  if (s.child.exitCode !== null || s.child.signalCode !== null) return;
  s.child.kill("SIGTERM");
  const t = setTimeout(() => s.child.kill("SIGKILL"), 20_000);
  await s.exit;
  clearTimeout(t);
}

before(async () => {
  nats = await startNatsServer();
  tmp = mkdtempSync("/dev/shm/virtmesh-migration-test-");
  src = startSidecar("t1", SRC_MAX);
  dst = startSidecar("t2", DST_MAX);
  nc = await connectNats(nats.url, "migration-pages-e2e");
  const registry = await Registry.open(nc);
  for (const s of sidecars) {
    const entry = await registry.waitForService(s.host, "shm-sidecar", 30_000).catch((e: Error) => {
      throw new Error(`${e.message}; sidecar ${s.host} stderr: ${s.stderr().slice(-1500)}`);
    });
    s.client = new sidecar.SharedMemoryServiceClient(entry.grpc, credentials.createInsecure());
  }
});

after(async () => {
  for (const m of mappings) {
    try {
      m.unmap();
    } catch {
      // already unmapped
    }
  }
  for (const s of sidecars) s.client?.close();
  await Promise.all(sidecars.map(stopSidecar));
  await nc?.close();
  await nats?.stop();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

const ZERO = (p: number) => p % 5 === 0;
/** The source's pattern: every fifth page zero, the others a page-specific fill. */
function fillPattern(ram: Uint8Array): void {
  for (let p = 0; p < PAGES; p++) {
    if (ZERO(p)) continue;
    ram.fill((p * 31 + 7) & 0xff || 1, p * PG, (p + 1) * PG);
    ram[p * PG] = p & 0xff;
    ram[p * PG + 1] = p >> 8;
  }
}
// Ballooned pages the source never sends: a run of nonzero and zero pages.
const SKIP = Array.from({ length: 20 }, (_, i) => 1000 + i);
const SKIP_BITMAP = bitmapOf(PAGES, SKIP);
const SKIP_ZERO = SKIP.filter(ZERO).length;

let layout: sidecar.VmLayout;
let ram: Uint8Array;

test("an incoming VM gets the source's layout, empty memory and no dirty logging; above the limit it is refused at setup", async () => {
  layout = await call(src, (c) => c.createVm, { vm: "vm1", memoryBytes: VM_BYTES, queues: QUEUES, incoming: false });
  ram = new Uint8Array(map(layout.memoryPath, VM_BYTES).buffer);
  fillPattern(ram);

  const incoming = await call(dst, (c) => c.createVm, { vm: "vm1", memoryBytes: VM_BYTES, queues: QUEUES, incoming: true });
  assert.equal(incoming.host, "t2");
  assert.equal(incoming.dirtyLogging, false);
  const addrs = (l: sidecar.VmLayout) => ({
    memoryBytes: l.memoryBytes,
    pageSize: l.pageSize,
    reservedAddr: l.reservedAddr,
    reservedBytes: l.reservedBytes,
    queues: l.queues.map((q) => [q.device, q.index, q.size, q.descAddr, q.availAddr, q.usedAddr]),
  });
  assert.deepEqual(addrs(incoming), addrs(layout));
  assert.ok(statSync(incoming.memoryPath).blocks * 512 < MIB, "the incoming memory file is empty (sparse)");
  const usage = await call(dst, (c) => c.memoryUsage, { vm: "vm1" });
  assert.ok(usage.allocatedBytes < MIB);

  await rejects(
    call(dst, (c) => c.createVm, { vm: "big", memoryBytes: DST_MAX + PG, queues: QUEUES, incoming: true }),
    Status.RESOURCE_EXHAUSTED,
    /^incoming vm 'big' refused on host t2: memory_bytes 33558528 exceeds this sidecar's limit of 33554432 bytes \(VIRTMESH_MAX_VM_BYTES\)$/,
  );
  assert.deepEqual(readdirSync(dst.shmDir), ["vm1"]);
});

test("StartMigrationBitmap: every page but the skipped ones; bad skip bitmaps and a second start are refused", async () => {
  await rejects(
    call(src, (c) => c.startMigrationBitmap, { vm: "vm1", skipBitmap: Buffer.alloc(8) }),
    Status.INVALID_ARGUMENT,
    /^skip_bitmap has 8 bytes; 4096 guest pages need exactly 512/,
  );
  await rejects(call(src, (c) => c.startMigrationBitmap, { vm: "nope", skipBitmap: Buffer.alloc(0) }), Status.NOT_FOUND, /vm 'nope' does not exist on host t1/);
  await rejects(call(src, (c) => c.syncDirty, { vm: "vm1", vcpuLog: false, deviceLog: false, vfioReport: 0 }), Status.FAILED_PRECONDITION, /no migration bitmap/);
  const r = await call(src, (c) => c.startMigrationBitmap, { vm: "vm1", skipBitmap: SKIP_BITMAP });
  assert.deepEqual(r, { pages: PAGES, dirty: PAGES - SKIP.length, skipped: SKIP.length });
  await rejects(
    call(src, (c) => c.startMigrationBitmap, { vm: "vm1", skipBitmap: Buffer.alloc(0) }),
    Status.FAILED_PRECONDITION,
    /already has a migration bitmap \(4076 pages to send\); call StopMigrationBitmap first/,
  );
  // The refused start changed nothing.
  const s = await call(src, (c) => c.syncDirty, { vm: "vm1", vcpuLog: false, deviceLog: false, vfioReport: 0 });
  assert.equal(s.remaining, PAGES - SKIP.length);
});

const remaining = async () => (await call(src, (c) => c.syncDirty, { vm: "vm1", vcpuLog: false, deviceLog: false, vfioReport: 0 })).remaining;
const send = (req: Partial<sidecar.SendDirtyRequest>) =>
  call(src, (c) => c.sendDirty, { vm: "vm1", destinationHost: "t2", round: 0, bandwidthBytesPerS: 0, batchPages: 0, ...req });

test("SendDirty refuses bad requests, fails cleanly to an unknown host and to a host without the VM, and the bitmap stays intact", async () => {
  await rejects(send({ destinationHost: "T2" }), Status.INVALID_ARGUMENT, /destination_host 'T2' is not a valid host name/);
  await rejects(send({ destinationHost: "t1" }), Status.INVALID_ARGUMENT, /destination_host 't1' is this host/);
  await rejects(send({ batchPages: 5000 }), Status.INVALID_ARGUMENT, /batch_pages 5000 must be 0 \(256\) to 4096/);
  await rejects(send({ bandwidthBytesPerS: 100 }), Status.INVALID_ARGUMENT, /bandwidth_bytes_per_s 100 must be 0 \(unlimited\) or at least 4096/);
  await rejects(send({ destinationHost: "t9" }), Status.UNAVAILABLE, /destination host 't9' has no shm-sidecar in the registry/);
  assert.equal(await remaining(), PAGES - SKIP.length);
  // t2 is there but has no vm2: the stream fails with the destination's answer.
  await call(src, (c) => c.createVm, { vm: "vm2", memoryBytes: MIB, queues: [], incoming: false });
  await call(src, (c) => c.startMigrationBitmap, { vm: "vm2", skipBitmap: Buffer.alloc(0) });
  await rejects(
    call(src, (c) => c.sendDirty, { vm: "vm2", destinationHost: "t2", round: 0, bandwidthBytesPerS: 0, batchPages: 16 }),
    Status.UNAVAILABLE,
    /SendDirty round 0 of vm 'vm2' to shm-sidecar@t2 \(.*\) failed: .*NOT_FOUND: vm 'vm2' does not exist on host t2.*back in the migration bitmap \(256 to send\)/,
  );
  const s2 = await call(src, (c) => c.syncDirty, { vm: "vm2", vcpuLog: false, deviceLog: false, vfioReport: 0 });
  assert.equal(s2.remaining, 256);
  // DestroyVm drops the bitmap with the VM: a new vm2 starts without one.
  assert.deepEqual(await call(src, (c) => c.destroyVm, { vm: "vm2" }), { existed: true });
  await call(src, (c) => c.createVm, { vm: "vm2", memoryBytes: MIB, queues: [], incoming: false });
  await rejects(call(src, (c) => c.sendDirty, { vm: "vm2", destinationHost: "t2", round: 0, bandwidthBytesPerS: 0, batchPages: 0 }), Status.FAILED_PRECONDITION, /no migration bitmap/);
  await call(src, (c) => c.destroyVm, { vm: "vm2" });
});

test("bulk round, dirty round from the vCPU and device logs, and the checksums of both sides match", async () => {
  await call(src, (c) => c.setDirtyLogging, { vm: "vm1", enabled: true });

  const bulk = await send({ round: 0, bandwidthBytesPerS: 0, batchPages: 0 });
  const zeroPages = Array.from({ length: PAGES }, (_, p) => p).filter(ZERO).length - SKIP_ZERO;
  assert.equal(bulk.pages, PAGES - SKIP.length);
  assert.equal(bulk.zeroPages, zeroPages);
  assert.equal(bulk.bytes, (PAGES - SKIP.length - zeroPages) * PG);
  assert.ok(bulk.elapsedUs > 0);
  assert.equal(await remaining(), 0);

  const exclude = { excludeBitmap: SKIP_BITMAP };
  const srcSum = () => call(src, (c) => c.checksumMemory, { vm: "vm1", ...exclude });
  const dstSum = () => call(dst, (c) => c.checksumMemory, { vm: "vm1", ...exclude });
  const first = await srcSum();
  assert.deepEqual(await dstSum(), first);
  assert.equal(first.pages, PAGES - SKIP.length);

  // The guest writes through its vCPUs (the vCPU log) and a device writes a used ring page (the device log).
  const vcpuLog = new DirtyLog(map(layout.dirtyLogPath, statSync(layout.dirtyLogPath).size).buffer, VM_BYTES);
  const devLog = new DirtyLog(map(layout.deviceDirtyLogPath, statSync(layout.deviceDirtyLogPath).size).buffer, VM_BYTES);
  const write = (log: DirtyLog, p: number, v: number) => {
    ram.fill(v, p * PG, (p + 1) * PG);
    log.markPage(p);
  };
  write(vcpuLog, 3, 0xab);
  write(vcpuLog, 10, 0xcd); // was a zero page
  write(vcpuLog, 11, 0); // becomes a zero page
  write(vcpuLog, 1005, 0x11); // skipped (ballooned) at the start, written since: sent after all
  write(vcpuLog, 2000, 0x22);
  const usedPage = Math.floor(layout.queues[0]!.usedAddr / PG);
  write(devLog, usedPage, 0x33);
  write(devLog, 3, 0xab); // both logs
  assert.notEqual((await srcSum()).digest, (await dstSum()).digest);
  // A VFIO device has page 0x200 pinned while the container tracks: GET_BITMAP (ALL) reports it.
  await call(src, (c) => c.dmaMap, { vm: "vm1", iova: 0x10_0000, vaddr: 0x20_0000, size: 16 * PG, flags: 3 });
  assert.deepEqual((await call(src, (c) => c.pinPages, { vm: "vm1", iovas: [0x10_0000] })).guestPfns, [0x200]);
  const unspecified = await call(src, (c) => c.syncDirty, { vm: "vm1", vcpuLog: false, deviceLog: false, vfioReport: 0 });
  assert.equal(unspecified.dirtyVfio, 0, "not tracking yet, and UNSPECIFIED skips VFIO anyway");
  await call(src, (c) => c.dirtyPages, { vm: "vm1", argsz: 8, flags: 1, iova: 0, size: 0, pgsize: 0, bitmapSize: 0, reportMode: 0 });
  const unpinned = await call(src, (c) => c.syncDirty, { vm: "vm1", vcpuLog: false, deviceLog: false, vfioReport: sidecar.DirtyReport.DIRTY_REPORT_UNPINNED });
  assert.equal(unpinned.dirtyVfio, 0, "stop-only reporting leaves the pinned page out");

  const sync = await call(src, (c) => c.syncDirty, { vm: "vm1", vcpuLog: true, deviceLog: true, vfioReport: sidecar.DirtyReport.DIRTY_REPORT_ALL });
  assert.deepEqual(sync, { dirtyVcpu: 5, dirtyDevice: 2, dirtyVfio: 1, newDirty: 7, remaining: 7 });
  assert.equal(vcpuLog.countDirty(), 0, "fetch-and-clear");

  // Round 1 under max-bandwidth, two pages a batch: only the seven pages the logs named.
  const round1 = await send({ round: 1, bandwidthBytesPerS: 64 * 1024, batchPages: 2 });
  assert.equal(round1.pages, 7);
  assert.equal(round1.zeroPages, 1);
  assert.equal(round1.bytes, 6 * PG);
  assert.equal(await remaining(), 0);
  const last = await srcSum();
  assert.notEqual(last.digest, first.digest);
  assert.deepEqual(await dstSum(), last);
  const dstRam = new Uint8Array(map(join(dst.shmDir, "vm1", "memory"), VM_BYTES).buffer);
  assert.equal(dstRam[3 * PG + 100], 0xab);
  assert.equal(dstRam[usedPage * PG], 0x33);
  assert.ok(dstRam.subarray(11 * PG, 12 * PG).every((b) => b === 0), "the page zeroed on the source is zero on the destination");
  assert.ok(dstRam.subarray(1000 * PG, 1005 * PG).every((b) => b === 0) && dstRam.subarray(1006 * PG, 1020 * PG).every((b) => b === 0), "skipped pages were never sent");
  assert.equal(dstRam[1005 * PG], 0x11, "a skipped page the guest wrote later was sent");
  // Without the exclusion the skipped pages differ: the sums do too.
  const whole = await call(src, (c) => c.checksumMemory, { vm: "vm1", excludeBitmap: Buffer.alloc(0) });
  assert.equal(whole.pages, PAGES);
  assert.notEqual(whole.digest, (await call(dst, (c) => c.checksumMemory, { vm: "vm1", excludeBitmap: Buffer.alloc(0) })).digest);

  await rejects(send({ round: 0 }), Status.FAILED_PRECONDITION, /round 0 is before round 1, already sent for vm 'vm1'/);
  await rejects(call(src, (c) => c.checksumMemory, { vm: "vm1", excludeBitmap: Buffer.alloc(3) }), Status.INVALID_ARGUMENT, /exclude_bitmap has 3 bytes/);
  await rejects(
    call(src, (c) => c.syncDirty, { vm: "vm1", vcpuLog: false, deviceLog: false, vfioReport: 7 }),
    Status.INVALID_ARGUMENT,
    /vfio_report 7 must be/,
  );
  assert.deepEqual(await call(src, (c) => c.stopMigrationBitmap, { vm: "vm1" }), { existed: true });
  assert.deepEqual(await call(src, (c) => c.stopMigrationBitmap, { vm: "vm1" }), { existed: false });
  await rejects(send({ round: 2 }), Status.FAILED_PRECONDITION, /no migration bitmap/);
});

test("one SendDirty at a time per VM; StopMigrationBitmap stops one in flight (ABORTED)", async () => {
  await call(src, (c) => c.startMigrationBitmap, { vm: "vm1", skipBitmap: Buffer.alloc(0) });
  // 1 MiB/s for 16 MiB of pages: the first call streams for seconds, far longer than the steps below.
  const slow = send({ round: 0, bandwidthBytesPerS: MIB, batchPages: 16 });
  const outcome = slow.then(
    () => null,
    (e: ServiceError) => e,
  );
  await new Promise((r) => setTimeout(r, 300));
  await rejects(send({ round: 0 }), Status.FAILED_PRECONDITION, /a SendDirty for vm 'vm1' is already streaming pages/);
  assert.deepEqual(await call(src, (c) => c.stopMigrationBitmap, { vm: "vm1" }), { existed: true });
  const e = await outcome;
  assert.ok(e, "the slow SendDirty must fail");
  assert.equal(e.code, Status.ABORTED, e.details);
  assert.match(e.details, /the migration bitmap of vm 'vm1' was stopped during SendDirty round 0/);
});

test("SIGTERM: both sidecars exit 0 and leave nothing in /dev/shm", async () => {
  for (const m of mappings.splice(0)) m.unmap();
  for (const s of sidecars) {
    s.child.kill("SIGTERM");
    const { code, signal } = await s.exit;
    assert.equal(signal, null, s.stderr());
    assert.equal(code, 0, s.stderr());
    assert.ok(!existsSync(s.shmDir), `${s.shmDir} still exists`);
  }
  assert.deepEqual(readdirSync(tmp), []);
});
