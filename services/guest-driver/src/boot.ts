// Boots the VM's virtio-blk the way QEMU sets up a vhost backend: guest memory and
// the queue from the host's shm-sidecar, then the vhost ioctls over gRPC
// (SET_OWNER, GET/SET_FEATURES, SET_VRING_NUM/ADDR/BASE/KICK/CALL, SET_LOG_BASE,
// BLK_SET_BACKEND), then the completion ring attached on the completion-thread.
import { balloonQueueSpecs } from "./balloon";
import { status as Status } from "@grpc/grpc-js";
import { closeSync, mkdirSync, openSync, statSync, ftruncateSync } from "node:fs";
import { dirname, join } from "node:path";
import { tmpdir, userInfo } from "node:os";
import { callUnary, completion, sidecar, vhost } from "@virtmesh/proto";
import type { ServiceContext } from "@virtmesh/runtime";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { DirtyLog, DriverQueue, GuestMemory, indirectAreaBytes, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1 } from "@virtmesh/virtqueue";
import {
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_WRITE_ZEROES,
  bit,
  CompletionRing,
  completionRingFileName,
  hasFeature,
} from "@virtmesh/virtio-blk";
import { ConfigError, int, str } from "@virtmesh/config";
import { isLockKind } from "@virtmesh/qspinlock";
import { REQ_AREA_STRIDE, VirtioBlkDriver } from "./blk";
import { GuestKernel, type KernelGeometry } from "./kernel";
import type { SpinlockConfig, VcpuBoot } from "./vcpu-protocol";
import { GuestVcpus } from "./vcpus";

export const BLK_DEVICE = "blk0";
export const MIB = 1 << 20;

export interface BlkConfig {
  memoryBytes: number;
  queueSize: number;
  disk: string;
  diskBytes: number;
  backend: "file" | "null" | "memory";
  mode: "parallel" | "serialized";
  eventIdx: boolean;
  indirect: boolean;
  maxBs: number;
  /** vCPU threads that run workloads (besides the boot CPU). */
  vcpus: number;
  /** The guest's spinlock (vq->lock among others). */
  spinlock: SpinlockConfig;
}

/** The guest-driver's environment (README.md). Bad values stop the service with one line. */
export function blkConfig(env: NodeJS.ProcessEnv, vm: string): BlkConfig {
  const stateDir = env.VIRTMESH_STATE_DIR || join(tmpdir(), `virtmesh-${userInfo().uid}`);
  const backend = str(env, "VIRTMESH_DISK_BACKEND", "file");
  if (backend !== "file" && backend !== "null" && backend !== "memory") throw new ConfigError(`VIRTMESH_DISK_BACKEND=${backend} must be file, null or memory`);
  const mode = str(env, "VIRTMESH_BLK_COMPLETION", "parallel");
  if (mode !== "parallel" && mode !== "serialized") throw new ConfigError(`VIRTMESH_BLK_COMPLETION=${mode} must be parallel or serialized`);
  const disk = str(env, "VIRTMESH_DISK", join(stateDir, "disks", `${vm}.img`));
  if (!disk.startsWith("/")) throw new ConfigError(`VIRTMESH_DISK=${disk} must be an absolute path`);
  const diskBytes = int(env, "VIRTMESH_DISK_BYTES", 1024 * MIB, 512, 2 ** 50);
  if (diskBytes % 512 !== 0) throw new ConfigError(`VIRTMESH_DISK_BYTES=${diskBytes} must be a multiple of 512`);
  const memoryBytes = int(env, "VIRTMESH_GUEST_MEMORY_BYTES", 256 * MIB, 64 * MIB, 2 ** 32);
  if (memoryBytes % 4096 !== 0) throw new ConfigError(`VIRTMESH_GUEST_MEMORY_BYTES=${memoryBytes} must be a multiple of 4096`);
  const queueSize = int(env, "VIRTMESH_BLK_QUEUE_SIZE", 128, 4, 1024);
  if (queueSize & (queueSize - 1)) throw new ConfigError(`VIRTMESH_BLK_QUEUE_SIZE=${queueSize} must be a power of 2`);
  const flag = (k: string, dflt = "1") => {
    const v = str(env, k, dflt);
    if (v !== "0" && v !== "1") throw new ConfigError(`${k}=${v} must be 0 or 1`);
    return v === "1";
  };
  const vcpus = int(env, "VIRTMESH_GUEST_VCPUS", 8, 1, 64);
  const kind = str(env, "VIRTMESH_GUEST_SPINLOCK", "queue");
  if (!isLockKind(kind)) throw new ConfigError(`VIRTMESH_GUEST_SPINLOCK=${kind} must be ticket or queue`);
  const spinlock = { kind, pv: flag("VIRTMESH_GUEST_PV_SPINLOCK"), unfair: flag("VIRTMESH_GUEST_SPINLOCK_UNFAIR", "0") };
  return { memoryBytes, queueSize, disk, diskBytes, backend, mode, eventIdx: flag("VIRTMESH_BLK_EVENT_IDX"), indirect: flag("VIRTMESH_BLK_INDIRECT"), maxBs: MIB, vcpus, spinlock };
}

/** Creates the sparse image if missing (or grows it to diskBytes); returns its size. */
export function ensureDisk(path: string, bytes: number): number {
  mkdirSync(dirname(path), { recursive: true });
  const fd = openSync(path, "a+");
  try {
    const size = statSync(path).size;
    if (size < bytes) ftruncateSync(fd, bytes);
  } finally {
    closeSync(fd);
  }
  return statSync(path).size;
}

/**
 * The guest's virtio-blk front end outside guest memory and the guest kernel's
 * memory: what a destination needs to run the same driver on (migration).
 */
export interface BlkGuestState {
  /** Negotiated features, hex. */
  features: string;
  queueSize: number;
  slots: number;
  reqArea: number;
  dataBase: number;
  maxBs: number;
  indirectArea: { addr: number; maxIndirect: number } | null;
  eventIdx: boolean;
  indirect: boolean;
  diskBytes: number;
  geom: KernelGeometry;
  backend: BlkConfig["backend"];
  mode: BlkConfig["mode"];
  disk: string;
}

export interface BlkDevice {
  cfg: BlkConfig;
  layout: sidecar.VmLayout;
  memMap: SharedMapping;
  mem: GuestMemory;
  driver: VirtioBlkDriver;
  /** The guest's vCPU threads, which run workloads on this queue. */
  vcpus: GuestVcpus;
  features: bigint;
  diskBytes: number;
  /** Slots for workloads: [0, slots - 1); the last one is the control slot. */
  slots: number;
  dataBase: number;
  /** The front end's own state (migration); the kernel memory is vcpus.kernel.sab. */
  guestState(): BlkGuestState;
  /** KVM_MEM_LOG_DIRTY_PAGES for every CPU of the guest: the boot CPU and the vCPU threads. */
  setDirtyLogging(enabled: boolean): void;
  /** The device's state as the vhost-worker reports it (NEEDS_RESET: the virtio status bit). */
  deviceStats(): Promise<vhost.DeviceStats>;
  /**
   * VHOST_GET_VRING_BASE (the worker stops popping; in-flight requests complete
   * first, and in parallel mode the completion-thread drains) then, parallel,
   * DetachQueue. Returns last_avail_idx.
   */
  stopRing(): Promise<number>;
  /** vhost-worker SaveDeviceState (ring stopped). */
  saveDevice(): Promise<Uint8Array>;
  /** A cancelled migration: SET_VRING_BASE at `base`, BLK_SET_BACKEND, AttachQueue: the ring runs on. */
  restartRing(base: number): Promise<void>;
  /** The VM left (or an incoming one is dropped): ResetOwner, DetachQueue, DestroyVm, unmap. No GET_VRING_BASE. */
  release(): Promise<void>;
  shutdown(): Promise<void>;
}

type Grpc = { code?: number; details?: string; message?: string };

/** A proto bytes field over the same memory. */
export const asBuffer = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.length);

interface Clients {
  sc: sidecar.SharedMemoryServiceClient;
  vw: vhost.VhostBlkServiceClient;
  ct: completion.CompletionServiceClient;
}

async function clients(ctx: ServiceContext): Promise<Clients> {
  const host = ctx.config.host;
  const timeout = ctx.config.startTimeoutMs;
  await Promise.all([ctx.registry.waitForService(host, "vhost-worker", timeout), ctx.registry.waitForService(host, "completion-thread", timeout)]);
  return {
    sc: await ctx.client(host, "shm-sidecar", sidecar.SharedMemoryServiceClient),
    vw: await ctx.client(host, "vhost-worker", vhost.VhostBlkServiceClient),
    ct: await ctx.client(host, "completion-thread", completion.CompletionServiceClient),
  };
}

const backendKind = (b: BlkConfig["backend"]) => ({ file: vhost.BackendKind.BACKEND_KIND_FILE, null: vhost.BackendKind.BACKEND_KIND_NULL, memory: vhost.BackendKind.BACKEND_KIND_MEMORY })[b];

function attachCompletion(ctx: ServiceContext, c: Clients, vm: string, layout: sidecar.VmLayout, qr: sidecar.QueueRegion, eventIdx: boolean): Promise<unknown> {
  return callUnary(c.ct, c.ct.attachQueue, {
    vm,
    device: BLK_DEVICE,
    index: 0,
    completionRingPath: join(ctx.config.shmDir, completionRingFileName(vm, BLK_DEVICE, 0)),
    eventIdx,
    callPath: qr.callPath,
    memoryPath: layout.memoryPath,
    deviceDirtyLogPath: layout.deviceDirtyLogPath,
  });
}

export async function bootBlk(ctx: ServiceContext, vm: string, cfg: BlkConfig): Promise<BlkDevice> {
  const c = await clients(ctx);
  const { sc, vw, ct } = c;
  const dev = { vm, device: BLK_DEVICE };

  const diskBytes = cfg.backend === "file" ? ensureDisk(cfg.disk, cfg.diskBytes) : cfg.diskBytes;

  // A guest-driver that restarts boots a fresh VM: drop whatever the last one left.
  await callUnary(vw, vw.resetOwner, dev).catch(() => undefined);
  await callUnary(ct, ct.detachQueue, { vm, device: BLK_DEVICE, index: 0 }).catch(() => undefined);
  await callUnary(sc, sc.destroyVm, { vm }).catch(() => undefined);
  const layout = await callUnary(sc, sc.createVm, { incoming: false, vm, memoryBytes: cfg.memoryBytes, queues: [{ device: BLK_DEVICE, index: 0, size: cfg.queueSize }, ...balloonQueueSpecs()] });
  const qr = layout.queues.find((q) => q.device === BLK_DEVICE && q.index === 0);
  if (!qr) throw new Error(`CreateVm returned no ${BLK_DEVICE} queue`);

  const memMap = mapFile(layout.memoryPath, layout.memoryBytes);
  const mem = new GuestMemory(memMap.buffer, { size: layout.memoryBytes });

  // vhost control sequence (QEMU vhost_dev_start order).
  await callUnary(vw, vw.setOwner, dev);
  const offered = BigInt((await callUnary(vw, vw.getFeatures, dev)).features);
  let want = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_SEG_MAX);
  if (cfg.eventIdx) want |= bit(VIRTIO_F_EVENT_IDX);
  if (cfg.indirect) want |= bit(VIRTIO_F_INDIRECT_DESC);
  const features = offered & want;
  await callUnary(vw, vw.setFeatures, { dev, features: Number(features) });
  const eventIdx = hasFeature(features, VIRTIO_F_EVENT_IDX);
  const indirect = hasFeature(features, VIRTIO_F_INDIRECT_DESC);

  // Guest-physical map below the reserved queue area: 1 MiB request headers/status,
  // then indirect tables, then one data buffer of maxBs per slot.
  const n = qr.size;
  const reqArea = MIB;
  const maxIndirect = 4;
  const indirectAddr = 2 * MIB;
  const dataBase = 4 * MIB;
  const slots = indirect ? n : Math.floor(n / 3);
  const need = dataBase + slots * cfg.maxBs;
  if (reqArea + slots * REQ_AREA_STRIDE > indirectAddr || indirectAddr + indirectAreaBytes(n, maxIndirect) > dataBase || need > layout.reservedAddr) {
    memMap.unmap();
    throw new ConfigError(`guest memory of ${layout.memoryBytes} bytes is too small for ${slots} requests of up to ${cfg.maxBs} bytes (need ${need} below ${layout.reservedAddr})`);
  }
  const qcfg = { size: n, descAddr: qr.descAddr, availAddr: qr.availAddr, usedAddr: qr.usedAddr, eventIdx, indirect };
  const indirectArea = indirect ? { addr: indirectAddr, maxIndirect } : null;
  // The queue's driver state lives in guest kernel memory every vCPU thread shares.
  const kernel = new GuestKernel({ queueSize: n, slots, vcpus: cfg.vcpus });
  const dq = new DriverQueue(mem, qcfg, { ...(indirectArea ? { indirectArea } : {}), sharedState: { buffer: kernel.sab, byteOffset: kernel.driverStateOffset, attach: false } });

  await callUnary(vw, vw.setVringNum, { dev, index: 0, num: n });
  await callUnary(vw, vw.setVringAddr, { dev, index: 0, flags: 0, descUserAddr: qr.descAddr, usedUserAddr: qr.usedAddr, availUserAddr: qr.availAddr, logGuestAddr: qr.usedAddr });
  await callUnary(vw, vw.setVringBase, { dev, index: 0, num: 0 });
  await callUnary(vw, vw.setVringKick, { dev, index: 0, path: qr.kickPath });
  await callUnary(vw, vw.setVringCall, { dev, index: 0, path: qr.callPath });
  await callUnary(vw, vw.setLogBase, { dev, logPath: layout.deviceDirtyLogPath });
  const mode = cfg.mode === "serialized" ? vhost.CompletionMode.COMPLETION_MODE_SERIALIZED : vhost.CompletionMode.COMPLETION_MODE_PARALLEL;
  await callUnary(vw, vw.blkSetBackend, { dev, index: 0, kind: backendKind(cfg.backend), path: cfg.backend === "file" ? cfg.disk : "", capacityBytes: cfg.backend === "file" ? 0 : diskBytes, mode, cgroup: "" });
  if (cfg.mode === "parallel") await attachCompletion(ctx, c, vm, layout, qr, eventIdx);

  const st: BlkGuestState = {
    features: features.toString(16),
    queueSize: n,
    slots,
    reqArea,
    dataBase,
    maxBs: cfg.maxBs,
    indirectArea,
    eventIdx,
    indirect,
    diskBytes,
    geom: kernel.geom,
    backend: cfg.backend,
    mode: cfg.mode,
    disk: cfg.disk,
  };
  return frontEnd(ctx, c, vm, cfg, layout, qr, memMap, mem, kernel, dq, st, false);
}

/**
 * Incoming migration: the destination sidecar already holds the VM (the manager
 * created it with the source's layout and its pages arrived). Map it, rebuild the
 * guest kernel over the saved bytes, attach the queue's driver to the saved shared
 * state, and set the device up from its saved state (vhost-worker SetOwner +
 * LoadDeviceState with this host's doorbells and log: the ring resumes at the saved
 * last_avail_idx), then the completion-thread (parallel mode). The VM stays paused
 * (the boot CPU's interrupt loop frozen) until the caller thaws it.
 */
export async function attachBlk(ctx: ServiceContext, vm: string, cfg: BlkConfig, st: BlkGuestState, kernelBytes: Uint8Array, deviceState: Uint8Array): Promise<BlkDevice> {
  const c = await clients(ctx);
  const { sc, vw, ct } = c;
  const dev = { vm, device: BLK_DEVICE };
  const layout = await callUnary(sc, sc.describeVm, { vm });
  const qr = layout.queues.find((q) => q.device === BLK_DEVICE && q.index === 0);
  if (!qr) throw new Error(`vm ${vm} on this host has no ${BLK_DEVICE} queue`);
  if (qr.size !== st.queueSize) throw new Error(`vm ${vm}'s ${BLK_DEVICE} queue has ${qr.size} entries here, the saved driver ${st.queueSize}`);
  if (st.dataBase + st.slots * st.maxBs > layout.reservedAddr) throw new Error(`the saved ${BLK_DEVICE} driver's buffers end past reserved_addr ${layout.reservedAddr}`);
  const memMap = mapFile(layout.memoryPath, layout.memoryBytes);
  try {
    const mem = new GuestMemory(memMap.buffer, { size: layout.memoryBytes });
    const sab = new SharedArrayBuffer(kernelBytes.length);
    new Uint8Array(sab).set(kernelBytes);
    const kernel = new GuestKernel(st.geom, sab);
    const qcfg = { size: st.queueSize, descAddr: qr.descAddr, availAddr: qr.availAddr, usedAddr: qr.usedAddr, eventIdx: st.eventIdx, indirect: st.indirect };
    const dq = new DriverQueue(mem, qcfg, { ...(st.indirectArea ? { indirectArea: st.indirectArea } : {}), sharedState: { buffer: kernel.sab, byteOffset: kernel.driverStateOffset, attach: true } });
    await callUnary(vw, vw.setOwner, dev);
    await callUnary(vw, vw.loadDeviceState, { dev, state: asBuffer(deviceState), kickPath: qr.kickPath, callPath: qr.callPath, logPath: layout.deviceDirtyLogPath });
    if (st.mode === "parallel") await attachCompletion(ctx, c, vm, layout, qr, st.eventIdx);
    return await frontEnd(ctx, c, vm, { ...cfg, vcpus: st.geom.vcpus, backend: st.backend, mode: st.mode, disk: st.disk, maxBs: st.maxBs }, layout, qr, memMap, mem, kernel, dq, st, true);
  } catch (e) {
    await callUnary(vw, vw.resetOwner, dev).catch(() => undefined);
    await callUnary(ct, ct.detachQueue, { vm, device: BLK_DEVICE, index: 0 }).catch(() => undefined);
    memMap.unmap();
    throw e;
  }
}

/** The part of the boot a fresh and a migrated VM share: the boot CPU's driver, the vCPUs, teardown. */
function frontEnd(
  ctx: ServiceContext,
  c: Clients,
  vm: string,
  cfg: BlkConfig,
  layout: sidecar.VmLayout,
  qr: sidecar.QueueRegion,
  memMap: SharedMapping,
  mem: GuestMemory,
  kernel: GuestKernel,
  dq: DriverQueue,
  st: BlkGuestState,
  paused: boolean,
): BlkDevice {
  const { sc, vw, ct } = c;
  const dev = { vm, device: BLK_DEVICE };
  // The boot CPU's writes (ring entries, request headers, balloon buffers) go to the vCPU
  // dirty log like the vCPU threads' do: off until the sidecar switches logging on.
  const logMap = mapFile(layout.dirtyLogPath, statSync(layout.dirtyLogPath).size);
  mem.vcpu.dirtyLog = new DirtyLog(logMap.buffer, layout.memoryBytes, { enabled: false });
  const kick = Doorbell.open(qr.kickPath);
  const call = Doorbell.open(qr.callPath);
  const qcfg = { size: st.queueSize, descAddr: qr.descAddr, availAddr: qr.availAddr, usedAddr: qr.usedAddr, eventIdx: st.eventIdx, indirect: st.indirect };
  // The per-head trace slots live in the completion ring file vhost-worker made at BlkSetBackend.
  const cringPath = join(ctx.config.shmDir, completionRingFileName(vm, BLK_DEVICE, 0));
  let cringMap: SharedMapping | null = null;
  const mapTraceRing = (): void => {
    cringMap?.unmap();
    cringMap = null;
    driver.traceRing = null;
    try {
      cringMap = mapFile(cringPath, statSync(cringPath).size);
      driver.traceRing = CompletionRing.open(cringMap.buffer);
    } catch (e) {
      ctx.logger.warn(`no trace slots (${cringPath}): ${(e as Error).message}`);
    }
  };
  const cringBytes = (() => {
    try {
      return statSync(cringPath).size;
    } catch {
      return 0;
    }
  })();
  const boot: Omit<VcpuBoot, "cpu"> = {
    kernelSab: kernel.sab,
    geom: kernel.geom,
    memoryPath: layout.memoryPath,
    memoryBytes: layout.memoryBytes,
    kickPath: qr.kickPath,
    callPath: qr.callPath,
    queue: qcfg,
    indirectArea: st.indirectArea,
    reqArea: st.reqArea,
    dataBase: st.dataBase,
    maxBs: st.maxBs,
    slots: st.slots,
    diskBytes: st.diskBytes,
    completionRing: cringBytes > 0 ? { path: cringPath, bytes: cringBytes } : null,
    // vCPU writes land in the VM's vCPU dirty log while the sidecar has logging on (KVM's dirty bitmap).
    vcpuDirtyLogPath: layout.dirtyLogPath,
  };
  const vcpus = new GuestVcpus(kernel, boot, () => call.ring());
  // The boot CPU (cpu 0, this thread) runs the interrupt handler and control requests.
  const driver = new VirtioBlkDriver(mem, dq, kick, call, st.reqArea, st.slots, kernel, 0, vcpus.layOutLock(cfg.spinlock).lock);
  mapTraceRing();
  // A migrated VM stays paused until Resume: its boot CPU takes no interrupt before then.
  if (paused) driver.freeze();
  driver.start();
  // Bring the first vCPU up now (a fio job's home unless numjobs > 1); the rest start on demand.
  vcpus.prestart(1).catch((e: Error) => ctx.logger.warn(`vCPU 1 did not start: ${e.message}`));
  const warn = (what: string) => (e: Grpc) => {
    if (e.code !== Status.NOT_FOUND) ctx.logger.warn(`${what}: ${e.details ?? e.message}`);
  };
  const unmapAll = async (): Promise<void> => {
    await vcpus.close();
    await driver.stop();
    driver.traceRing = null;
    cringMap?.unmap();
    cringMap = null;
  };
  let logMapped = true;
  const releaseDevices = async (): Promise<void> => {
    mem.vcpu.dirtyLog = null;
    if (logMapped) logMap.unmap();
    logMapped = false;
    await callUnary(vw, vw.resetOwner, dev).catch(warn("ResetOwner"));
    if (st.mode === "parallel") await callUnary(ct, ct.detachQueue, { vm, device: BLK_DEVICE, index: 0 }).catch(warn("DetachQueue"));
    kick.close();
    call.close();
    memMap.unmap();
    await callUnary(sc, sc.destroyVm, { vm }).catch(warn("DestroyVm"));
  };

  return {
    cfg,
    layout,
    memMap,
    mem,
    driver,
    vcpus,
    features: BigInt(`0x${st.features}`),
    diskBytes: st.diskBytes,
    slots: st.slots,
    dataBase: st.dataBase,
    guestState: () => ({ ...st }),
    setDirtyLogging(enabled: boolean) {
      if (mem.vcpu.dirtyLog) mem.vcpu.dirtyLog.enabled = enabled;
      vcpus.setDirtyLogging(enabled);
    },
    deviceStats: () => callUnary(vw, vw.getStats, dev),
    async stopRing() {
      const { num } = await callUnary(vw, vw.getVringBase, { dev, index: 0, num: 0 }, 30_000);
      if (st.mode === "parallel") await callUnary(ct, ct.detachQueue, { vm, device: BLK_DEVICE, index: 0 });
      return num;
    },
    async saveDevice() {
      return (await callUnary(vw, vw.saveDeviceState, dev)).state;
    },
    async restartRing(base: number) {
      // vhost_dev_start again: the ring resumes at the base GET_VRING_BASE returned.
      await callUnary(vw, vw.setVringBase, { dev, index: 0, num: base });
      const mode = st.mode === "serialized" ? vhost.CompletionMode.COMPLETION_MODE_SERIALIZED : vhost.CompletionMode.COMPLETION_MODE_PARALLEL;
      await callUnary(vw, vw.blkSetBackend, { dev, index: 0, kind: backendKind(st.backend), path: st.backend === "file" ? st.disk : "", capacityBytes: st.backend === "file" ? 0 : st.diskBytes, mode, cgroup: "" });
      if (st.mode === "parallel") await attachCompletion(ctx, c, vm, layout, qr, st.eventIdx);
      // BLK_SET_BACKEND made a fresh completion ring file: map its trace slots again.
      mapTraceRing();
    },
    async release() {
      await unmapAll();
      await releaseDevices();
    },
    async shutdown() {
      await unmapAll();
      // GET_VRING_BASE stops the ring and waits for what is in flight; then release the device.
      await callUnary(vw, vw.getVringBase, { dev, index: 0, num: 0 }).catch(warn("GetVringBase"));
      await releaseDevices();
    },
  };
}
