// One VM as the guest-driver runs it: the virtio-blk front end and its vCPUs, the
// page allocator, the balloon driver, the dirtying workload's working set. Booted
// fresh, or rebuilt from a migrated state (LoadState) and then paused.
import { status as Status } from "@grpc/grpc-js";
import type { BuddyAllocator } from "@virtmesh/balloon";
import { balloon as balloonApi, callUnary, sidecar } from "@virtmesh/proto";
import { GrpcError, type ServiceContext } from "@virtmesh/runtime";
import { VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID } from "@virtmesh/virtio-blk";
import { createGuestAllocator, startGuestBalloon, type GuestBalloon, type GuestBalloonState } from "./balloon";
import { asBuffer, attachBlk, bootBlk, type BlkConfig, type BlkDevice } from "./boot";
import { DmaDevice, S_DMA_DEVICE, sidecarIommu } from "./dma-device";
import { parseJsonSection, need, S_BALLOON_DEVICE, S_BLK_DEVICE, S_GUEST, S_KERNEL, S_WORKLOADS, EnvelopeError, type GuestSection, type Sections } from "./migrate";
import type { WorkingSet } from "./working-set";

// ---- The VM ----------------------------------------------------------------------------

export interface GuestVm {
  blk: BlkDevice;
  allocator: BuddyAllocator;
  /** null while stopped for a migration's save (and after). */
  balloon: GuestBalloon | null;
  serial: string;
  workingSet: WorkingSet | null;
  /** The assigned device with pinned pages (SetDmaDevice), if any. */
  dma: DmaDevice | null;
}

type Ctx = ServiceContext;

/** The allocator manages guest RAM above the blk driver's fixed areas (issue 6). */
const allocatorFor = (blk: BlkDevice, attach: boolean) => createGuestAllocator(blk.mem, blk.layout, blk.dataBase + blk.slots * blk.guestState().maxBs, attach);

/** Completions are routed per slot owner: the vCPU running a workload's job, or the control slot. */
function routeCompletions(blk: BlkDevice): (type: number, dataLen: number) => Promise<{ status: number; len: number }> {
  const control = blk.slots - 1;
  let controlDone: ((status: number, len: number) => void) | null = null;
  blk.driver.onComplete = (slot, status, len) => {
    if (slot === control) controlDone?.(status, len);
    else blk.vcpus.complete(slot, status);
  };
  return (type, dataLen) =>
    new Promise((resolve, reject) => {
      if (controlDone) return reject(new GrpcError(Status.UNAVAILABLE, "a control request is already in flight"));
      controlDone = (status, len) => {
        controlDone = null;
        resolve({ status, len });
      };
      blk.driver.submit(control, type, 0, blk.dataBase + control * blk.guestState().maxBs, dataLen);
      blk.driver.notify();
    });
}

export async function bootGuestVm(ctx: Ctx, vm: string, cfg: BlkConfig): Promise<GuestVm> {
  const blk = await bootBlk(ctx, vm, cfg);
  // The guest's page allocator manages guest RAM above the blk driver's fixed areas;
  // the balloon (issue 6) takes its pages from it and gives them back.
  const allocator = allocatorFor(blk, false);
  const balloon = await startGuestBalloon({ ctx, vm, memory: blk.mem, allocator, layout: blk.layout });
  const control = routeCompletions(blk);
  const id = await control(VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_ID_BYTES);
  const at = blk.dataBase + (blk.slots - 1) * cfg.maxBs;
  const serial = id.status === VIRTIO_BLK_S_OK ? Buffer.from(blk.mem.bytes.subarray(at, at + VIRTIO_BLK_ID_BYTES)).toString("latin1").replace(/\0+$/, "") : "";
  return { blk, allocator, balloon, serial, workingSet: null, dma: null };
}

/**
 * LoadState: the VM from a migrated state, paused. `sections` is a checked envelope.
 * On failure whatever was set up here is dropped again (the caller's AbortIncoming
 * also destroys the sidecar's VM).
 */
export async function loadGuestVm(ctx: Ctx, vm: string, cfg: BlkConfig, sections: Sections): Promise<GuestVm> {
  const g = parseJsonSection<GuestSection>(sections, S_GUEST);
  if (g.vm !== vm) throw new EnvelopeError(`the state is vm ${g.vm}'s, this guest-driver runs ${vm}`);
  const kernel = need(sections, S_KERNEL);
  const device = need(sections, S_BLK_DEVICE);
  const balloonDevice = need(sections, S_BALLOON_DEVICE);
  // The balloon device attaches from its state while the blk device does (they share
  // nothing but the VM, which the destination sidecar already holds): the downtime is
  // the longer of the two, not their sum.
  const bc = await ctx.client(ctx.config.host, "balloon-host", balloonApi.BalloonServiceClient);
  const balloonAttach = callUnary(bc, bc.loadState, { vm, state: asBuffer(balloonDevice) });
  balloonAttach.catch(() => undefined);
  let blk: BlkDevice;
  try {
    blk = await attachBlk(ctx, vm, cfg, g.blk, kernel, device);
  } catch (e) {
    if (await balloonAttach.then(() => true, () => false)) await callUnary(bc, bc.detachVm, { vm }).catch(() => undefined);
    throw e;
  }
  try {
    const allocator = allocatorFor(blk, true);
    routeCompletions(blk);
    // The assigned device's region, mapped and pinned again in this host's container; it runs from Resume.
    const dmaState = sections.get(S_DMA_DEVICE);
    const dma = dmaState ? await DmaDevice.load(vm, sidecarIommu(await ctx.client(ctx.config.host, "shm-sidecar", sidecar.SharedMemoryServiceClient)), blk.mem.bytes, dmaState) : null;
    const attach = await balloonAttach;
    const balloon = await startGuestBalloon({ ctx, vm, memory: blk.mem, allocator, layout: blk.layout, resume: { attach, saved: balloonGuestState(g) } });
    const workloads = sections.get(S_WORKLOADS);
    if (workloads && workloads.length > 0) await blk.vcpus.restoreWorkloads(workloads);
    // A fio run that came with the VM: its vCPUs take the queue's interrupts, the boot CPU stands aside until it ends.
    const run = blk.vcpus.currentRun();
    if (run) {
      blk.driver.park();
      const unpark = () => blk.driver.unpark();
      run.done.then(unpark, unpark);
    }
    return { blk, allocator, balloon, serial: g.serial, workingSet: g.workingSet, dma };
  } catch (e) {
    await blk.release().catch(() => undefined);
    throw e;
  }
}

export const balloonGuestState = (g: GuestSection): GuestBalloonState => ({ features: g.balloonFeatures, bufPfn: g.balloonBufPfn, blocks: g.balloonBlocks });

/** Restarts the guest's balloon driver after a save (a cancelled migration): the device from its saved state, the driver from its own. */
export async function restartBalloon(ctx: Ctx, vm: string, g: GuestVm, device: Uint8Array, saved: GuestBalloonState): Promise<GuestBalloon> {
  const bc = await ctx.client(ctx.config.host, "balloon-host", balloonApi.BalloonServiceClient);
  await callUnary(bc, bc.detachVm, { vm }).catch(() => undefined);
  const attach = await callUnary(bc, bc.loadState, { vm, state: asBuffer(device) });
  return startGuestBalloon({ ctx, vm, memory: g.blk.mem, allocator: g.allocator, layout: g.blk.layout, resume: { attach, saved } });
}
