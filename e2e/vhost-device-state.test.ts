// Migration device state against the real vhost-worker: SaveDeviceState only after
// GET_VRING_BASE, LoadDeviceState on a second VM's device (its memory a copy of the
// first's, as after the memory rounds) resumes the ring at the saved last_avail_idx,
// refusals of a bad checksum / unknown version change nothing, and the source restarts
// after a cancelled migration with SET_VRING_BASE + SET_VRING_KICK.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { credentials, status as Status, type Client, type ServiceError } from "@grpc/grpc-js";
import { completion, sidecar, vhost } from "@virtmesh/proto";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { GuestMemory, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTIO_F_VERSION_1 } from "@virtmesh/virtqueue";
import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, bit, completionRingFileName, writeBlkHeader } from "@virtmesh/virtio-blk";
import { virtmesh, pidAlive, until } from "./helpers";

const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-devstate-"));
let env: NodeJS.ProcessEnv;
let pids: number[] = [];
let shmDir = "";
const clients: Client[] = [];
let sc: sidecar.SharedMemoryServiceClient;
let vw: vhost.VhostBlkServiceClient;
let ct: completion.CompletionServiceClient;

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

before(async () => {
  env = { ...process.env, VIRTMESH_STATE_DIR: stateDir, VIRTMESH_DISK_BYTES: String(32 << 20) };
  delete env.NATS_URL;
  delete env.VIRTMESH_DISK;
  const r = await virtmesh(["up", "--hosts", "src"], env);
  assert.equal(r.code, 0, `virtmesh up failed: ${r.stderr}`);
  const s = JSON.parse(readFileSync(join(stateDir, "state.json"), "utf8")) as { supervisorPid: number; nats: { pid: number }; shmDirs: string[]; services: { pid: number; instance: string; host: string; grpc: string }[] };
  pids = [s.supervisorPid, s.nats.pid, ...s.services.map((x) => x.pid)];
  shmDir = s.shmDirs[0] ?? "";
  const grpcOf = (i: string) => s.services.find((x) => x.instance === i && x.host === "src")?.grpc ?? "";
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
const HDR = 0x1000;
const STATUS = 0x1800;

/** One VM of the sidecar with its mapped memory and doorbells (its vhost device is set up by the test). */
class Vm {
  map!: SharedMapping;
  mem!: GuestMemory;
  kick!: Doorbell;
  q!: sidecar.QueueRegion;
  layout!: sidecar.VmLayout;
  constructor(readonly vm: string) {}
  get dev() {
    return { vm: this.vm, device: "blk0" };
  }
  async create(): Promise<void> {
    this.layout = (await call(sc, sc.createVm, { incoming: false, vm: this.vm, memoryBytes: 4 << 20, queues: [{ device: "blk0", index: 0, size: QSIZE }] })) as sidecar.VmLayout;
    const q = this.layout.queues[0];
    assert.ok(q);
    this.q = q;
    this.map = mapFile(this.layout.memoryPath, this.layout.memoryBytes);
    this.mem = new GuestMemory(this.map.buffer, { size: this.layout.memoryBytes });
    this.kick = Doorbell.open(this.q.kickPath);
  }
  async attachCompletion(): Promise<void> {
    await call(ct, ct.attachQueue, {
      vm: this.vm,
      device: "blk0",
      index: 0,
      completionRingPath: join(shmDir, completionRingFileName(this.vm, "blk0", 0)),
      eventIdx: false,
      callPath: this.q.callPath,
      memoryPath: this.layout.memoryPath,
      deviceDirtyLogPath: this.layout.deviceDirtyLogPath,
    });
  }
  usedIdx(): number {
    return this.mem.vcpu.loadU16Atomic(this.q.usedAddr + 2);
  }
  /** A FLUSH chain written straight into the rings (descriptors 0 and 1, avail slot idx): the ring state after a copy is the source's. */
  rawFlush(): void {
    const v = this.mem.vcpu;
    const d = this.q.descAddr;
    writeBlkHeader(v, HDR, VIRTIO_BLK_T_FLUSH, 0);
    v.writeU8(STATUS, 0xee);
    const desc = (i: number, addr: number, len: number, flags: number, next: number) => {
      v.writeU32(d + 16 * i, addr);
      v.writeU32(d + 16 * i + 4, 0);
      v.writeU32(d + 16 * i + 8, len);
      v.writeU16(d + 16 * i + 12, flags);
      v.writeU16(d + 16 * i + 14, next);
    };
    desc(0, HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    desc(1, STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    const idx = v.loadU16Atomic(this.q.availAddr + 2);
    v.writeU16(this.q.availAddr + 4 + 2 * (idx % QSIZE), 0);
    v.storeU16Atomic(this.q.availAddr + 2, (idx + 1) & 0xffff);
    this.kick.ring();
  }
  async destroy(): Promise<void> {
    await call(vw, vw.resetOwner, this.dev).catch(() => undefined);
    await call(ct, ct.detachQueue, { vm: this.vm, device: "blk0", index: 0 }).catch(() => undefined);
    this.kick?.close();
    this.map?.unmap();
    await call(sc, sc.destroyVm, { vm: this.vm }).catch(() => undefined);
  }
}

test("SaveDeviceState after GET_VRING_BASE, LoadDeviceState on a second VM resumes at the saved base; bad checksum and version refused; the source restarts", async () => {
  const a = new Vm("mig-a");
  const b = new Vm("mig-b");
  try {
    await a.create();
    const dev = a.dev;
    await call(vw, vw.setOwner, dev);
    await call(vw, vw.setFeatures, { dev, features: Number(bit(VIRTIO_F_VERSION_1)) });
    await call(vw, vw.setVringNum, { dev, index: 0, num: QSIZE });
    await call(vw, vw.setVringAddr, { dev, index: 0, flags: 0, descUserAddr: a.q.descAddr, availUserAddr: a.q.availAddr, usedUserAddr: a.q.usedAddr, logGuestAddr: 0 });
    await call(vw, vw.setVringBase, { dev, index: 0, num: 0 });
    await call(vw, vw.setVringKick, { dev, index: 0, path: a.q.kickPath });
    await call(vw, vw.setVringCall, { dev, index: 0, path: a.q.callPath });
    await call(vw, vw.setLogBase, { dev, logPath: a.layout.deviceDirtyLogPath });
    // Issue 16: the VM's memory file is not a dirty log.
    const memLog = await refused(vw, vw.setLogBase, { dev, logPath: a.layout.memoryPath });
    assert.equal(memLog.code, Status.INVALID_ARGUMENT);
    await call(vw, vw.blkSetBackend, { dev, index: 0, kind: vhost.BackendKind.BACKEND_KIND_MEMORY, path: "", capacityBytes: 1 << 20, mode: vhost.CompletionMode.COMPLETION_MODE_PARALLEL, cgroup: "" });
    await a.attachCompletion();

    // Issue 16: an image outside the image directories is refused.
    const img = await refused(vw, vw.blkSetBackend, { dev, index: 0, kind: vhost.BackendKind.BACKEND_KIND_FILE, path: "/etc/hostname", capacityBytes: 0, mode: 0, cgroup: "" });
    assert.equal(img.code, Status.INVALID_ARGUMENT);
    assert.match(img.details, /image director/);

    const running = await refused(vw, vw.saveDeviceState, dev);
    assert.equal(running.code, Status.FAILED_PRECONDITION);

    a.rawFlush();
    await until("the source's FLUSH completes", () => (a.usedIdx() === 1 ? true : undefined), 10_000);
    assert.equal(a.mem.vcpu.readU8(STATUS), VIRTIO_BLK_S_OK);
    const base = (await call(vw, vw.getVringBase, { dev, index: 0, num: 0 })) as vhost.VringState;
    assert.equal(base.num, 1);
    const saved = ((await call(vw, vw.saveDeviceState, dev)) as vhost.DeviceState).state;
    assert.ok(saved.length > 16 && saved.length < 4096);

    // The destination: memory copied (the migration's rounds), a device owned, no backend.
    await b.create();
    assert.deepEqual([b.q.descAddr, b.q.availAddr, b.q.usedAddr], [a.q.descAddr, a.q.availAddr, a.q.usedAddr]);
    new Uint8Array(b.map.buffer).set(new Uint8Array(a.map.buffer, 0, a.layout.memoryBytes));
    await call(vw, vw.setOwner, b.dev);
    const files = { kickPath: b.q.kickPath, callPath: b.q.callPath, logPath: b.layout.deviceDirtyLogPath };
    const flipped = Buffer.from(saved);
    flipped[20] = flipped[20]! ^ 0x01;
    const crc = await refused(vw, vw.loadDeviceState, { dev: b.dev, state: flipped, ...files });
    assert.equal(crc.code, Status.INVALID_ARGUMENT);
    assert.match(crc.details, /checksum/);
    const v99 = Buffer.from(saved);
    v99.writeUInt16LE(99, 4);
    const ver = await refused(vw, vw.loadDeviceState, { dev: b.dev, state: v99, ...files });
    assert.equal(ver.code, Status.INVALID_ARGUMENT);
    assert.match(ver.details, /version/);
    // Nothing changed: the good state loads.
    await call(vw, vw.loadDeviceState, { dev: b.dev, state: saved, ...files });
    await b.attachCompletion();
    const again = await refused(vw, vw.loadDeviceState, { dev: b.dev, state: saved, ...files });
    assert.equal(again.code, Status.FAILED_PRECONDITION);

    // The destination pops from slot 1 (the saved base), not slot 0 again.
    b.rawFlush();
    await until("the destination's FLUSH completes", () => (b.usedIdx() === 2 ? true : undefined), 10_000);
    assert.equal(b.mem.vcpu.readU8(STATUS), VIRTIO_BLK_S_OK);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(b.usedIdx(), 2, "nothing popped twice");
    const sb = (await call(vw, vw.getStats, b.dev)) as vhost.DeviceStats;
    assert.equal(sb.requests, 1);
    assert.equal(sb.needsReset, false);

    // Cancelled migration: the source restarts at its base with SET_VRING_BASE + SET_VRING_KICK.
    await call(vw, vw.setVringBase, { dev, index: 0, num: base.num });
    await call(vw, vw.setVringKick, { dev, index: 0, path: a.q.kickPath });
    a.rawFlush();
    await until("the restarted source's FLUSH completes", () => (a.usedIdx() === 2 ? true : undefined), 10_000);
    assert.equal(a.mem.vcpu.readU8(STATUS), VIRTIO_BLK_S_OK);
  } finally {
    await b.destroy();
    await a.destroy();
  }
});
