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
import { DriverQueue, GuestMemory, indirectAreaBytes, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1 } from "@virtmesh/virtqueue";
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
import { GuestKernel } from "./kernel";
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
  /** The device's state as the vhost-worker reports it (NEEDS_RESET: the virtio status bit). */
  deviceStats(): Promise<vhost.DeviceStats>;
  shutdown(): Promise<void>;
}

type Grpc = { code?: number; details?: string; message?: string };

export async function bootBlk(ctx: ServiceContext, vm: string, cfg: BlkConfig): Promise<BlkDevice> {
  const host = ctx.config.host;
  const timeout = ctx.config.startTimeoutMs;
  await Promise.all([ctx.registry.waitForService(host, "vhost-worker", timeout), ctx.registry.waitForService(host, "completion-thread", timeout)]);
  const sc = await ctx.client(host, "shm-sidecar", sidecar.SharedMemoryServiceClient);
  const vw = await ctx.client(host, "vhost-worker", vhost.VhostBlkServiceClient);
  const ct = await ctx.client(host, "completion-thread", completion.CompletionServiceClient);
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
  const kick = Doorbell.open(qr.kickPath);
  const call = Doorbell.open(qr.callPath);

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
  const kind = { file: vhost.BackendKind.BACKEND_KIND_FILE, null: vhost.BackendKind.BACKEND_KIND_NULL, memory: vhost.BackendKind.BACKEND_KIND_MEMORY }[cfg.backend];
  const mode = cfg.mode === "serialized" ? vhost.CompletionMode.COMPLETION_MODE_SERIALIZED : vhost.CompletionMode.COMPLETION_MODE_PARALLEL;
  await callUnary(vw, vw.blkSetBackend, { dev, index: 0, kind, path: cfg.backend === "file" ? cfg.disk : "", capacityBytes: cfg.backend === "file" ? 0 : diskBytes, mode, cgroup: "" });
  if (cfg.mode === "parallel") {
    await callUnary(ct, ct.attachQueue, {
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

  // The per-head trace slots live in the completion ring file vhost-worker made at BlkSetBackend.
  const cringPath = join(ctx.config.shmDir, completionRingFileName(vm, BLK_DEVICE, 0));
  const cringBytes = statSync(cringPath).size;
  const cringMap = mapFile(cringPath, cringBytes);
  const boot: Omit<VcpuBoot, "cpu"> = {
    kernelSab: kernel.sab,
    geom: kernel.geom,
    memoryPath: layout.memoryPath,
    memoryBytes: layout.memoryBytes,
    kickPath: qr.kickPath,
    callPath: qr.callPath,
    queue: qcfg,
    indirectArea,
    reqArea,
    dataBase,
    maxBs: cfg.maxBs,
    slots,
    diskBytes,
    completionRing: { path: cringPath, bytes: cringBytes },
  };
  const vcpus = new GuestVcpus(kernel, boot, () => call.ring());
  // The boot CPU (cpu 0, this thread) runs the interrupt handler and control requests.
  const driver = new VirtioBlkDriver(mem, dq, kick, call, reqArea, slots, kernel, 0, vcpus.layOutLock(cfg.spinlock).lock);
  driver.traceRing = CompletionRing.open(cringMap.buffer);
  driver.start();
  // Bring the first vCPU up now (a fio job's home unless numjobs > 1); the rest start on demand.
  vcpus.prestart(1).catch((e: Error) => ctx.logger.warn(`vCPU 1 did not start: ${e.message}`));

  return {
    cfg,
    layout,
    memMap,
    mem,
    driver,
    vcpus,
    features,
    diskBytes,
    slots,
    dataBase,
    deviceStats: () => callUnary(vw, vw.getStats, dev),
    async shutdown() {
      await vcpus.close();
      await driver.stop();
      driver.traceRing = null;
      cringMap.unmap();
      // GET_VRING_BASE stops the ring and waits for what is in flight; then release the device.
      await callUnary(vw, vw.getVringBase, { dev, index: 0, num: 0 }).catch((e: Grpc) => ctx.logger.warn(`GetVringBase: ${e.details ?? e.message}`));
      await callUnary(vw, vw.resetOwner, dev).catch((e: Grpc) => ctx.logger.warn(`ResetOwner: ${e.details ?? e.message}`));
      if (cfg.mode === "parallel") {
        await callUnary(ct, ct.detachQueue, { vm, device: BLK_DEVICE, index: 0 }).catch((e: Grpc) => {
          if (e.code !== Status.NOT_FOUND) ctx.logger.warn(`DetachQueue: ${e.details ?? e.message}`);
        });
      }
      kick.close();
      call.close();
      memMap.unmap();
      await callUnary(sc, sc.destroyVm, { vm }).catch((e: Grpc) => ctx.logger.warn(`DestroyVm: ${e.details ?? e.message}`));
    },
  };
}
