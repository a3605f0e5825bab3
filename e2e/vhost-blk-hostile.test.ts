// Hostile guests against the real vhost-worker and completion-thread: this test is
// a second VM's driver. It gets guest memory and a queue from the real shm-sidecar,
// sets the device up over the vhost gRPC API, writes descriptor chains straight
// into the mapped guest memory, and checks each gets the right virtio-blk status
// (or puts the device into NEEDS_RESET), while vm1 keeps serving fio --verify.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { credentials, status as Status, type Client, type ServiceError } from "@grpc/grpc-js";
import { completion, sidecar, vhost } from "@virtmesh/proto";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { DriverQueue, GuestMemory, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTIO_F_VERSION_1 } from "@virtmesh/virtqueue";
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VHOST_F_LOG_ALL,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_WRITE_ZEROES,
  bit,
  completionRingFileName,
  writeBlkHeader,
  writeDiscardSegment,
} from "@virtmesh/virtio-blk";
import { virtmesh, pidAlive, until, type RunResult } from "./helpers";

const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-blkh-"));
let env: NodeJS.ProcessEnv;
let pids: number[] = [];
let grpcOf: (instance: string) => string;
let shmDir = "";
const clients: Client[] = [];

type Cb<Res> = (err: ServiceError | null, res?: Res) => void;
function call<Req, Res>(c: Client, m: (req: Req, cb: Cb<Res>) => unknown, req: Req): Promise<Res> {
  return new Promise((ok, fail) => m.call(c, req, (e: ServiceError | null, r?: Res) => (e ? fail(e) : ok(r as Res))));
}
async function refused<Req, Res>(c: Client, m: (req: Req, cb: Cb<Res>) => unknown, req: Req): Promise<ServiceError> {
  try {
    await call(c, m, req);
  } catch (e) {
    return e as ServiceError;
  }
  assert.fail("the call was accepted");
}

function fio(args: string[]): Promise<RunResult> {
  return virtmesh(["fio", ...args], env, 120_000);
}

let sc: sidecar.SharedMemoryServiceClient;
let vw: vhost.VhostBlkServiceClient;
let ct: completion.CompletionServiceClient;

before(async () => {
  env = { ...process.env, VIRTMESH_STATE_DIR: stateDir, VIRTMESH_DISK_BYTES: String(32 << 20) };
  delete env.NATS_URL;
  delete env.VIRTMESH_DISK;
  const r = await virtmesh(["up", "--hosts", "src"], env);
  assert.equal(r.code, 0, `virtmesh up failed: ${r.stderr}`);
  const s = JSON.parse(readFileSync(join(stateDir, "state.json"), "utf8")) as { supervisorPid: number; nats: { pid: number }; shmDirs: string[]; services: { pid: number; instance: string; host: string; grpc: string }[] };
  pids = [s.supervisorPid, s.nats.pid, ...s.services.map((x) => x.pid)];
  shmDir = s.shmDirs[0]!;
  grpcOf = (i) => s.services.find((x) => x.instance === i && x.host === "src")!.grpc;
  sc = new sidecar.SharedMemoryServiceClient(grpcOf("shm-sidecar"), credentials.createInsecure());
  vw = new vhost.VhostBlkServiceClient(grpcOf("vhost-worker"), credentials.createInsecure());
  ct = new completion.CompletionServiceClient(grpcOf("completion-thread"), credentials.createInsecure());
  clients.push(sc, vw, ct);
});

after(async () => {
  for (const c of clients) c.close();
  const r = await virtmesh(["down"], env, 90_000);
  for (const pid of pids) if (pidAlive(pid)) process.kill(pid, "SIGKILL");
  rmSync(stateDir, { recursive: true, force: true });
  assert.equal(r.code, 0, `virtmesh down failed: ${r.stderr}`);
});

const QSIZE = 16;
const CAP = 1 << 20;

/** A hostile VM: its memory, its queue and a vhost-blk device on a 1 MiB memory backend. */
class EvilVm {
  map!: SharedMapping;
  mem!: GuestMemory;
  dq!: DriverQueue;
  kick!: Doorbell;
  q!: sidecar.QueueRegion;
  layout!: sidecar.VmLayout;
  constructor(
    readonly vm: string,
    readonly features = Number(bit(VIRTIO_F_VERSION_1)),
  ) {}
  get dev() {
    return { vm: this.vm, device: "blk0" };
  }
  async boot(): Promise<void> {
    const layout = (await call(sc, sc.createVm, { incoming: false, vm: this.vm, memoryBytes: 4 << 20, queues: [{ device: "blk0", index: 0, size: QSIZE }] })) as sidecar.VmLayout;
    this.q = layout.queues[0]!;
    this.layout = layout;
    this.map = mapFile(layout.memoryPath, layout.memoryBytes);
    this.mem = new GuestMemory(this.map.buffer, { size: layout.memoryBytes });
    this.dq = new DriverQueue(this.mem, { size: QSIZE, descAddr: this.q.descAddr, availAddr: this.q.availAddr, usedAddr: this.q.usedAddr });
    this.kick = Doorbell.open(this.q.kickPath);
    const dev = this.dev;
    await call(vw, vw.setOwner, dev);
    await call(vw, vw.setFeatures, { dev, features: this.features });
    await call(vw, vw.setVringNum, { dev, index: 0, num: QSIZE });
    await call(vw, vw.setVringAddr, { dev, index: 0, flags: 0, descUserAddr: this.q.descAddr, availUserAddr: this.q.availAddr, usedUserAddr: this.q.usedAddr, logGuestAddr: 0 });
    await call(vw, vw.setVringBase, { dev, index: 0, num: 0 });
    await call(vw, vw.setVringKick, { dev, index: 0, path: this.q.kickPath });
    await call(vw, vw.setVringCall, { dev, index: 0, path: this.q.callPath });
    await call(vw, vw.setLogBase, { dev, logPath: layout.deviceDirtyLogPath });
    await call(vw, vw.blkSetBackend, { dev, index: 0, kind: vhost.BackendKind.BACKEND_KIND_MEMORY, path: "", capacityBytes: CAP, mode: vhost.CompletionMode.COMPLETION_MODE_PARALLEL, cgroup: "" });
    await call(ct, ct.attachQueue, {
      vm: this.vm,
      device: "blk0",
      index: 0,
      completionRingPath: join(shmDir, completionRingFileName(this.vm, "blk0", 0)),
      eventIdx: false,
      callPath: this.q.callPath,
      memoryPath: layout.memoryPath,
      deviceDirtyLogPath: layout.deviceDirtyLogPath,
    });
  }
  /** Submits one chain and waits for its used element; returns [status byte, used len]. */
  async request(readable: { addr: number; len: number }[], writable: { addr: number; len: number }[], statusAddr: number): Promise<[number, number]> {
    this.mem.vcpu.writeU8(statusAddr, 0xee);
    const head = this.dq.add(readable, writable, false);
    assert.ok(head >= 0);
    if (this.dq.kickPrepare()) this.kick.ring();
    const u = await until("the used element", () => this.dq.popUsed() ?? undefined, 10_000);
    assert.equal(u.id, head);
    return [this.mem.vcpu.readU8(statusAddr), u.len];
  }
  async stats(): Promise<vhost.DeviceStats> {
    return (await call(vw, vw.getStats, this.dev)) as vhost.DeviceStats;
  }
  async destroy(): Promise<void> {
    await call(vw, vw.resetOwner, this.dev).catch(() => undefined);
    await call(ct, ct.detachQueue, { vm: this.vm, device: "blk0", index: 0 }).catch(() => undefined);
    this.kick?.close();
    this.map?.unmap();
    await call(sc, sc.destroyVm, { vm: this.vm });
  }
}

const HDR = 0x1000;
const DATA = 0x2000;
const STATUS = 0x1800;

test("control plane refuses what the vhost ioctls refuse", async () => {
  const e = new EvilVm("evil-ctl");
  try {
    const dev = e.dev;
    const noOwner = await refused(vw, vw.setFeatures, { dev, features: 0 });
    assert.equal(noOwner.code, Status.FAILED_PRECONDITION);
    assert.match(noOwner.details, /EPERM/);
    await e.boot();
    const f = (await call(vw, vw.getFeatures, dev)) as vhost.Features;
    const bad = await refused(vw, vw.setFeatures, { dev, features: f.features + 2 ** 34 });
    assert.equal(bad.code, Status.INVALID_ARGUMENT);
    assert.match(bad.details, /EOPNOTSUPP/);
    const nobufs = await refused(vw, vw.blkSetBackend, { dev, index: 1, kind: vhost.BackendKind.BACKEND_KIND_NULL, path: "", capacityBytes: CAP, mode: 0, cgroup: "" });
    assert.equal(nobufs.code, Status.OUT_OF_RANGE);
    assert.match(nobufs.details, /ENOBUFS/);
    const busy = await refused(vw, vw.setVringNum, { dev, index: 0, num: 8 });
    assert.equal(busy.code, Status.FAILED_PRECONDITION);
    assert.match(busy.details, /EBUSY/);
    const outside = await refused(vw, vw.setVringKick, { dev, index: 0, path: "/etc/passwd" });
    assert.equal(outside.code, Status.INVALID_ARGUMENT);
    const twice = await refused(vw, vw.setOwner, dev);
    assert.match(twice.details, /EBUSY/);
    // GET_VRING_BASE stops the ring after in-flight requests and returns last_avail_idx.
    await e.request([{ addr: HDR, len: 16 }], [{ addr: STATUS, len: 1 }], STATUS);
    // WRITE_ZEROES without VIRTIO_BLK_F_WRITE_ZEROES negotiated -> UNSUPP (§5.2.6.2).
    writeBlkHeader(e.mem.vcpu, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    writeDiscardSegment(e.mem.vcpu, HDR + 16, 0, 8, 0);
    assert.deepEqual(await e.request([{ addr: HDR, len: 32 }], [{ addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_UNSUPP, 1]);
    const base = (await call(vw, vw.getVringBase, { dev, index: 0, num: 0 })) as vhost.VringState;
    assert.equal(base.num, 2);
  } finally {
    await e.destroy();
  }
});

test("unknown type -> UNSUPP, out-of-range sector -> IOERR, GET_ID -> serial, DISCARD with unmap flag -> UNSUPP; the device keeps serving", async () => {
  const e = new EvilVm("evil-req", Number(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)));
  try {
    await e.boot();
    const v = e.mem.vcpu;
    writeBlkHeader(v, HDR, 99, 0);
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }], [{ addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_UNSUPP, 1]);
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_IN, CAP / 512 - 1); // last sector + 4 KiB crosses the end
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }], [{ addr: DATA, len: 4096 }, { addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_IOERR, 1]);
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_OUT, 2 ** 50); // sector * 512 beyond 2^53
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }, { addr: DATA, len: 512 }], [{ addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_IOERR, 1]);
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_IN, 0); // data not a multiple of 512
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }], [{ addr: DATA, len: 100 }, { addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_IOERR, 1]);
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_DISCARD, 0);
    writeDiscardSegment(v, HDR + 16, 0, 8, 1);
    assert.deepEqual(await e.request([{ addr: HDR, len: 32 }], [{ addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_UNSUPP, 1]);
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_GET_ID, 0);
    const [st, len] = await e.request([{ addr: HDR, len: 16 }], [{ addr: DATA, len: 20 }, { addr: STATUS, len: 1 }], STATUS);
    assert.deepEqual([st, len], [VIRTIO_BLK_S_OK, 21]);
    assert.match(Buffer.from(e.mem.bytes.subarray(DATA, DATA + 20)).toString("latin1"), /^VMMEM-evil-req/);
    // A good write and read back still work on the same device.
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_OUT, 8);
    e.mem.bytes.fill(0x5a, DATA, DATA + 4096);
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }, { addr: DATA, len: 4096 }], [{ addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_OK, 1]);
    e.mem.bytes.fill(0, DATA, DATA + 4096);
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_IN, 8);
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }], [{ addr: DATA, len: 4096 }, { addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_OK, 4097]);
    assert.ok(e.mem.bytes.subarray(DATA, DATA + 4096).every((b) => b === 0x5a));
    // WRITE_ZEROES over the block, FLUSH, read back zeros.
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    writeDiscardSegment(v, HDR + 16, 8, 8, 0);
    assert.deepEqual(await e.request([{ addr: HDR, len: 32 }], [{ addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_OK, 1]);
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }], [{ addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_OK, 1]);
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_IN, 8);
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }], [{ addr: DATA, len: 4096 }, { addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_OK, 4097]);
    assert.ok(e.mem.bytes.subarray(DATA, DATA + 4096).every((b) => b === 0));
    // WRITE_ZEROES past the capacity -> IOERR.
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    writeDiscardSegment(v, HDR + 16, CAP / 512 - 4, 8, 0);
    assert.deepEqual(await e.request([{ addr: HDR, len: 32 }], [{ addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_IOERR, 1]);
    const s = await e.stats();
    assert.equal(s.needsReset, false);
    assert.equal(s.requests, 12);
  } finally {
    await e.destroy();
  }
});

test("VHOST_F_LOG_ALL: the IN data, status byte and used ring pages land in the device dirty log; nothing without it", async () => {
  const e = new EvilVm("evil-log", Number(bit(VIRTIO_F_VERSION_1) | bit(VHOST_F_LOG_ALL)));
  try {
    await e.boot();
    const on = (await call(sc, sc.setDirtyLogging, { vm: e.vm, enabled: true })) as sidecar.SetDirtyLoggingResponse;
    assert.equal(on.enabled, true);
    const DATA2 = 0x9000; // its own page: data pages must be logged by the device
    writeBlkHeader(e.mem.vcpu, HDR, VIRTIO_BLK_T_IN, 0);
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }], [{ addr: DATA2, len: 4096 }, { addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_OK, 4097]);
    const fetch = async () => {
      const r = (await call(sc, sc.fetchDirtyLog, { vm: e.vm, kind: sidecar.DirtyLogKind.DIRTY_LOG_KIND_DEVICE, clear: true })) as sidecar.FetchDirtyLogResponse;
      const dirty = new Set<number>();
      for (let pfn = 0; pfn < Number(r.pages); pfn++) if (r.bitmap[pfn >> 3]! & (1 << (pfn & 7))) dirty.add(pfn);
      return dirty;
    };
    const d1 = await fetch();
    assert.ok(d1.has(DATA2 / 4096), "IN data page");
    assert.ok(d1.has(STATUS >> 12), "status byte page");
    assert.ok(d1.has(Math.floor(e.q.usedAddr / 4096)), "used ring page");
    assert.ok(!d1.has(HDR / 4096 + 100), "nothing else");
    // LOG_ALL off (changed while the device runs): the same request logs nothing.
    await call(vw, vw.setFeatures, { dev: e.dev, features: Number(bit(VIRTIO_F_VERSION_1)) });
    assert.deepEqual(await e.request([{ addr: HDR, len: 16 }], [{ addr: DATA2, len: 4096 }, { addr: STATUS, len: 1 }], STATUS), [VIRTIO_BLK_S_OK, 4097]);
    assert.equal((await fetch()).size, 0);
  } finally {
    await e.destroy();
  }
});

/** Writes a raw two-descriptor chain (header, status) whose header address we choose, bypassing DriverQueue's checks. */
function rawChain(e: EvilVm, hdrAddr: number, hdrLen: number): void {
  const v = e.mem.vcpu;
  const d = e.q.descAddr;
  const desc = (i: number, addr: number, len: number, flags: number, next: number) => {
    v.writeU32(d + 16 * i, addr % 2 ** 32);
    v.writeU32(d + 16 * i + 4, Math.floor(addr / 2 ** 32));
    v.writeU32(d + 16 * i + 8, len);
    v.writeU16(d + 16 * i + 12, flags);
    v.writeU16(d + 16 * i + 14, next);
  };
  desc(0, hdrAddr, hdrLen, VIRTQ_DESC_F_NEXT, 1);
  desc(1, STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
  const idx = v.loadU16Atomic(e.q.availAddr + 2);
  v.writeU16(e.q.availAddr + 4 + 2 * (idx % QSIZE), 0);
  v.storeU16Atomic(e.q.availAddr + 2, (idx + 1) & 0xffff);
  e.kick.ring();
}

for (const [name, addr, len, reason] of [
  ["a request header of 8 bytes", HDR, 8, /request header of 8 bytes/],
  ["a buffer outside guest memory", 2 ** 40, 16, /outside guest memory/],
] as const) {
  test(`${name} puts that device into NEEDS_RESET; vm1 keeps serving fio --verify`, async () => {
    const e = new EvilVm(name.includes("header") ? "evil-hdr" : "evil-oob");
    try {
      await e.boot();
      writeBlkHeader(e.mem.vcpu, HDR, VIRTIO_BLK_T_IN, 0);
      rawChain(e, addr, len);
      const s = await until("NEEDS_RESET", async () => ((await e.stats()).needsReset ? e.stats() : undefined), 10_000);
      assert.match(s.needsResetReason, reason);
      assert.equal(e.mem.vcpu.loadU16Atomic(e.q.usedAddr + 2), 0, "nothing was completed");
      const f = await fio(["--rw", "randrw", "--bs", "4k", "--iodepth", "16", "--size", "4m", "--verify", "crc32c", "--json"]);
      assert.equal(f.code, 0, f.stdout + f.stderr);
      assert.equal((JSON.parse(f.stdout) as { result: { verifyErrors: number } }).result.verifyErrors, 0);
      assert.equal(((await call(vw, vw.getStats, { vm: "vm1", device: "blk0" })) as vhost.DeviceStats).needsReset, false);
    } finally {
      await e.destroy();
    }
  });
}
