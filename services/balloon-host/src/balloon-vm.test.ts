// BalloonVm (the device) and the guest driver of services/guest-driver/src/balloon
// in one process, over a real MAP_SHARED guest-memory file and real doorbells
// in /dev/shm, without NATS or gRPC (AttachVm is called directly). The full
// multi-process path is e2e/balloon*.test.ts.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { Metadata, type ServiceError } from "@grpc/grpc-js";
import { PAGE_SIZE, VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_PAGE_BITMAP, VIRTIO_BALLOON_F_STATS_VQ, featureBit, writeBmapHead, writeRespHdr } from "@virtmesh/balloon";
import { balloon, type sidecar } from "@virtmesh/proto";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { GuestMemory, splitQueueLayout } from "@virtmesh/virtqueue";
import { BalloonRequestRefused, balloonQueueSpecs, createGuestAllocator, startGuestBalloon, type GuestBalloon } from "@virtmesh/svc-guest-driver/balloon";
import { BalloonVm, type Refusal } from "./balloon-vm";

const MEM = 8 << 20;
let tmp = "";
let mapping: SharedMapping | undefined;
const doorbells: Doorbell[] = [];
let device: BalloonVm | undefined;
let guest: GuestBalloon | undefined;
const refusals: Refusal[] = [];
let layout: sidecar.VmLayout;

/** What the shm-sidecar's CreateVm does: queues packed at the top of memory, a kick and a call doorbell each. */
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
  return {
    vm: "unit",
    host: "h",
    memoryPath: join(tmp, "memory"),
    memoryBytes: MEM,
    pageSize: PAGE_SIZE,
    queues,
    dirtyLogPath: "",
    deviceDirtyLogPath: "",
    shmDir: tmp,
    reservedAddr: MEM - reservedBytes,
    reservedBytes,
    dirtyLogging: false,
  };
}

/** AttachVm without gRPC: the client's method calls the device directly. */
function localClient(): balloon.BalloonServiceClient {
  const attachVm = (req: balloon.AttachVmRequest, _md: Metadata, _o: unknown, cb: (e: ServiceError | null, r?: balloon.AttachVmResponse) => void) => {
    void device?.stop();
    device = new BalloonVm(layout, req.driverFeatures, { ballooned: () => undefined, refused: (_v, r) => void refusals.push(r), failed: (_v, _q, e) => assert.fail(e) });
    cb(null, { vm: layout.vm, deviceFeatures: device.deviceFeatures, features: device.features, mode: 0, guestPages: device.guestPages, configAddr: device.configAddr });
  };
  return { attachVm } as unknown as balloon.BalloonServiceClient;
}

before(() => {
  tmp = mkdtempSync("/dev/shm/virtmesh-test-balloon-");
  layout = makeLayout();
  mapping = mapFile(layout.memoryPath, MEM, { create: true });
});

after(async () => {
  await guest?.stop();
  await device?.stop();
  for (const d of doorbells) d.close();
  mapping?.unmap();
  rmSync(tmp, { recursive: true, force: true });
});

test("the guest follows SetTarget through the config page; the device releases and records the pages", async () => {
  const memory = new GuestMemory(mapping!.buffer);
  const allocator = createGuestAllocator(memory, layout, 0);
  const features = featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST) + featureBit(VIRTIO_BALLOON_F_STATS_VQ) + featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP);
  guest = await startGuestBalloon({ client: localClient(), vm: "unit", memory, allocator, layout, features, log: () => undefined });
  assert.equal(guest.features, features);
  assert.deepEqual(device!.queues, ["inflate", "deflate", "stats"]);
  // Make guest RAM resident without changing it (the allocator's metadata lives there).
  for (let o = PAGE_SIZE - 1; o < layout.reservedAddr; o += PAGE_SIZE) memory.bytes[o] = memory.bytes[o]!;
  const full = mapping!.allocatedBytes();

  device!.setTarget(1000);
  await waitFor(() => device!.config.actual === 1000);
  assert.equal(guest.numPages, 1000);
  assert.equal(device!.device.ballooned.count, 1000);
  assert.equal(full - mapping!.allocatedBytes(), 1000 * PAGE_SIZE);
  assert.ok(await device!.refreshStats(2000), "the guest refilled the stats buffer");
  assert.equal(device!.device.guestStats?.freeMemory, allocator.freePages * PAGE_SIZE);

  device!.setTarget(0);
  await waitFor(() => device!.config.actual === 0);
  assert.equal(device!.device.ballooned.count, 0);
  assert.equal(refusals.length, 0);
});

test("a refused buffer is reported to the guest driver (refused[] in the config page), nothing applied", async () => {
  const g = guest!;
  // The driver's own transport, a buffer in guest memory naming a page past guest RAM.
  const addr = 64 * PAGE_SIZE;
  const buf = new Uint8Array(mapping!.buffer, addr, 32);
  writeBmapHead(buf, 8, 100, 12, 0);
  writeBmapHead(buf, 16, device!.guestPages, 12, 0);
  writeRespHdr(buf, 16);
  const before = mapping!.allocatedBytes();
  const transport = g.transport;
  await assert.rejects(transport.send("inflate", buf, 24), BalloonRequestRefused);
  assert.equal(refusals.at(-1)?.kind, "pfn-beyond-memory");
  assert.equal(device!.refusedRequests, 1);
  assert.equal(device!.device.ballooned.count, 0);
  assert.equal(mapping!.allocatedBytes(), before);
  // And the queue still works.
  writeRespHdr(buf, 8);
  await transport.send("inflate", buf, 16);
  assert.equal(device!.device.ballooned.count, 1);
  await transport.send("deflate", buf, 16);
  assert.equal(device!.device.ballooned.count, 0);
});

async function waitFor(f: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!f()) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 5));
  }
}
