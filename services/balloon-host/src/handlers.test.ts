// BalloonService handlers over a real MAP_SHARED guest-memory file and real
// doorbells, without gRPC (the handlers are called with a fake call object):
// AttachVm's feature checks, and the state envelope's refusals.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { status as Status, type ServiceError } from "@grpc/grpc-js";
import { PAGE_SIZE, VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_PAGE_BITMAP, VIRTIO_BALLOON_F_STATS_VQ, balloonQueueSpecs, featureBit } from "@virtmesh/balloon";
import { balloon, type sidecar } from "@virtmesh/proto";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { splitQueueLayout } from "@virtmesh/virtqueue";
import { unknownFeatureBits, type BalloonVm } from "./balloon-vm";
import { balloonService } from "./handlers";
import { BALLOON_STATE_VERSION, decodeBalloonState, encodeBalloonState } from "./state";

const MEM = 4 << 20;
let tmp = "";
let mapping: SharedMapping | undefined;
const doorbells: Doorbell[] = [];
const vms = new Map<string, BalloonVm>();
let layout: sidecar.VmLayout;
let svc: ReturnType<typeof balloonService>;

function makeLayout(): sidecar.VmLayout {
  const specs = balloonQueueSpecs(16);
  const regions = specs.map((s) => Math.ceil(splitQueueLayout(s.size, 0, { usedAlign: PAGE_SIZE }).bytes / PAGE_SIZE) * PAGE_SIZE);
  const reservedBytes = regions.reduce((a, b) => a + b, 0);
  let base = MEM - reservedBytes;
  const queues = specs.map((s, i) => {
    const l = splitQueueLayout(s.size, base, { usedAlign: PAGE_SIZE });
    const stem = join(tmp, `${s.device}.${s.index}`);
    doorbells.push(Doorbell.create(`${stem}.kick`), Doorbell.create(`${stem}.call`));
    base += regions[i]!;
    return { device: s.device, index: s.index, size: s.size, descAddr: l.descAddr, availAddr: l.availAddr, usedAddr: l.usedAddr, kickPath: `${stem}.kick`, callPath: `${stem}.call` };
  });
  return { vm: "unit", host: "h", memoryPath: join(tmp, "memory"), memoryBytes: MEM, pageSize: PAGE_SIZE, queues, dirtyLogPath: "", deviceDirtyLogPath: "", shmDir: tmp, reservedAddr: MEM - reservedBytes, reservedBytes, dirtyLogging: false };
}

type Handler<Req, Res> = (call: { request: Req }, cb: (e: Partial<ServiceError> | null, r?: Res) => void) => void;
function invoke<Req, Res>(h: unknown, request: Req): Promise<Res> {
  return new Promise((resolve, reject) => (h as Handler<Req, Res>)({ request }, (e, r) => (e ? reject(e as Error) : resolve(r!))));
}
async function refused(p: Promise<unknown>, code: Status, re: RegExp): Promise<void> {
  await assert.rejects(p, (e: ServiceError) => {
    assert.equal(e.code, code, `${Status[e.code]}: ${e.details}`);
    assert.match(e.details, re);
    return true;
  });
}

before(() => {
  tmp = mkdtempSync("/dev/shm/virtmesh-test-balloon-h-");
  layout = makeLayout();
  mapping = mapFile(layout.memoryPath, MEM, { create: true });
  svc = balloonService({
    host: "h",
    vms,
    describeVm: (vm) => (vm === "unit" ? Promise.resolve(layout) : Promise.reject(Object.assign(new Error("no"), { code: Status.NOT_FOUND, details: "no such vm" }))),
    events: { ballooned: () => undefined, refused: () => undefined, failed: (_v, _q, e) => assert.fail(e) },
    publishTarget: () => undefined,
    info: () => undefined,
    async detach(vm) {
      const v = vms.get(vm);
      vms.delete(vm);
      await v?.stop();
    },
  });
});

after(async () => {
  for (const v of vms.values()) await v.stop();
  for (const d of doorbells) d.close();
  mapping?.unmap();
  rmSync(tmp, { recursive: true, force: true });
});

const FEATURES = featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST) + featureBit(VIRTIO_BALLOON_F_STATS_VQ) + featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP);

test("unknownFeatureBits names every bit no balloon device has, up to bit 52", () => {
  assert.deepEqual(unknownFeatureBits(FEATURES), []);
  assert.deepEqual(unknownFeatureBits(featureBit(4) + featureBit(6) + 2 ** 40 + 2 ** 52 + 1), [4, 6, 40, 52]);
});

test("AttachVm with unknown feature bits for a running VM is refused, naming them; the attachment is unchanged", async () => {
  const res = await invoke<balloon.AttachVmRequest, balloon.AttachVmResponse>(svc.attachVm, { vm: "unit", driverFeatures: FEATURES });
  assert.equal(res.mode, balloon.BalloonMode.BALLOON_MODE_BITMAP);
  const live = vms.get("unit")!;
  await invoke(svc.setTarget, { vm: "unit", targetBytes: 10 * PAGE_SIZE });
  for (const bad of [2 ** 40, featureBit(4), 2 ** 40 + FEATURES]) {
    await refused(invoke(svc.attachVm, { vm: "unit", driverFeatures: bad }), Status.INVALID_ARGUMENT, /unknown feature bits? (4|40)/);
  }
  assert.equal(vms.get("unit"), live, "the live attachment was not replaced");
  assert.equal(live.features, FEATURES);
  assert.equal(live.mode, "bitmap");
  assert.equal(live.config.numPages, 10, "the config page was not reset");
  assert.equal(live.config.attachedFeatures(), FEATURES);
});

test("SaveState -> LoadState round trip; a refused LoadState (version, checksum, other VM, truncated) changes nothing", async () => {
  const live = vms.get("unit")!;
  const saved = await invoke<balloon.VmRef, balloon.BalloonState>(svc.saveState, { vm: "unit" });
  assert.ok(live.isFrozen);
  await refused(invoke(svc.setTarget, { vm: "unit", targetBytes: 0 }), Status.FAILED_PRECONDITION, /saved for a migration/);
  const st = decodeBalloonState(saved.state);
  assert.equal(st.targetPages, 10);
  assert.equal(st.features, FEATURES);
  assert.deepEqual(st.queues.map((q) => q.name), ["inflate", "deflate", "stats"]);

  const bad = new Uint8Array(saved.state);
  bad[4] = BALLOON_STATE_VERSION + 1;
  await refused(invoke(svc.loadState, { vm: "unit", state: bad }), Status.INVALID_ARGUMENT, /version 2 is not supported/);
  const flipped = new Uint8Array(saved.state);
  flipped[20] = flipped[20]! ^ 1;
  await refused(invoke(svc.loadState, { vm: "unit", state: flipped }), Status.INVALID_ARGUMENT, /checksum mismatch/);
  await refused(invoke(svc.loadState, { vm: "unit", state: saved.state.subarray(0, 30) }), Status.INVALID_ARGUMENT, /do not fill|shorter/);
  await refused(invoke(svc.loadState, { vm: "other", state: saved.state }), Status.INVALID_ARGUMENT, /vm 'unit's balloon, not 'other's/);
  await refused(invoke(svc.loadState, { vm: "unit", state: encodeBalloonState({ ...st, memoryBytes: MEM * 2 }) }), Status.FAILED_PRECONDITION, /does not fit/);
  assert.equal(vms.get("unit"), live, "nothing changed");
  assert.ok(live.isFrozen);

  const res = await invoke<balloon.LoadBalloonStateRequest, balloon.AttachVmResponse>(svc.loadState, { vm: "unit", state: saved.state });
  assert.equal(res.features, FEATURES);
  const v = vms.get("unit")!;
  assert.notEqual(v, live);
  assert.equal(v.config.numPages, 10);
  assert.equal(v.isFrozen, false);

  await invoke(svc.detachVm, { vm: "unit" });
  assert.equal(vms.has("unit"), false);
  await refused(invoke(svc.detachVm, { vm: "unit" }), Status.NOT_FOUND, /no balloon attached/);
});
