// The guest's virtio-balloon driver wired to real queues: the BalloonDriver of
// @virtmesh/balloon (fill/leak, MUST_TELL_HOST, deflate-on-OOM, stats, free
// page reporting) over the VM's balloon virtqueues in shared guest memory,
// following the target the balloon-host writes into the config page.
//
// Contract for the guest-driver's boot (see README.md in this folder):
//   1. CreateVm with `queues: [...yourQueues, ...balloonQueueSpecs()]`.
//   2. Map the memory file, build GuestMemory over it and the guest's page
//      allocator with createGuestAllocator(memory, layout, usedBytes): guest RAM
//      [0, layout.reservedAddr) minus the guest's fixed areas [0, usedBytes).
//   3. `const b = await startGuestBalloon({ ctx, vm, memory, allocator, layout })`
//      once balloon-host@<host> may be up (it retries AttachVm for attachTimeoutMs).
//   4. Guest workloads allocate through `b.allocPages(order)` (deflate-on-OOM).
//   5. On shutdown `await b.stop()` before unmapping guest memory.

import { status as Status, type ServiceError } from "@grpc/grpc-js";
import {
  BalloonDriver,
  type BalloonMode,
  type BalloonQueue,
  type BuddyAllocator,
  PAGE_BITMAP_BUFFER_SIZE,
  PAGE_SIZE,
  STATS_BUFFER_SIZE,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  VIRTIO_BALLOON_F_MUST_TELL_HOST,
  VIRTIO_BALLOON_F_PAGE_BITMAP,
  VIRTIO_BALLOON_F_REPORTING,
  VIRTIO_BALLOON_F_STATS_VQ,
  balloonModeFor,
  featureBit,
  hasFeature,
} from "@virtmesh/balloon";
import { balloon, callUnary, type sidecar } from "@virtmesh/proto";
import type { ServiceContext } from "@virtmesh/runtime";
import { Doorbell } from "@virtmesh/shm";
import { DriverQueue, type GuestMemory } from "@virtmesh/virtqueue";
import { BALLOON_CONFIG_DEVICE, BALLOON_DEVICE, BALLOON_QUEUE_INDEX, GuestBalloonConfig } from "./config-page";
import { VirtqueueBalloonTransport, type GuestQueue } from "./transport";

export { balloonQueueSpecs, BALLOON_CONFIG_DEVICE, BALLOON_DEVICE, BALLOON_QUEUE_INDEX, GuestBalloonConfig } from "./config-page";
export { BalloonRequestRefused, BalloonQueueClosed, VirtqueueBalloonTransport } from "./transport";
export { createGuestAllocator } from "./allocator";

/** Everything this driver can do; the device decides what is negotiated. */
export const DEFAULT_BALLOON_FEATURES =
  featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST) +
  featureBit(VIRTIO_BALLOON_F_STATS_VQ) +
  featureBit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) +
  featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP) +
  featureBit(VIRTIO_BALLOON_F_REPORTING);

/** Pages moved per step while following the target; `actual` is updated after each step. */
const STEP_PAGES = 32768;
/** Order of the guest block holding the driver's buffers: 64 KiB, data then stats. */
const BUFFER_ORDER = 4;
const STATS_OFFSET = 40960;

export interface GuestBalloonOptions {
  /** The guest-driver's service context: finds balloon-host@<ctx.config.host>, logs. Optional if `client` is given. */
  ctx?: ServiceContext;
  /** A BalloonService client to use instead of looking balloon-host up through ctx (tests). */
  client?: balloon.BalloonServiceClient;
  vm: string;
  /** GuestMemory over the whole guest-memory file (queues included), byte 0 = guest-physical 0. */
  memory: GuestMemory;
  /** The guest's page allocator over guest RAM [0, layout.reservedAddr). */
  allocator: BuddyAllocator;
  /** CreateVm's answer; must contain balloonQueueSpecs(). */
  layout: sidecar.VmLayout;
  /** Driver features offered (default DEFAULT_BALLOON_FEATURES); the answer is the intersection with the device's. */
  features?: number;
  /** Free page reporting every this many ms when REPORTING is negotiated; 0 (default) = only on reportFreePages(). */
  reportIntervalMs?: number;
  /** Smallest buddy order reported as free (page_reporting_order; default 9 = 2 MiB). */
  reportMinOrder?: number;
  /** How long to retry AttachVm while balloon-host is not up yet (default 30 s). */
  attachTimeoutMs?: number;
  log?: (level: "info" | "warn", msg: string, fields?: Record<string, unknown>) => void;
  /**
   * Migration: go on with a driver saved by saveGuestBalloon() instead of starting a
   * fresh one. The device was attached from its saved state (balloon-host LoadState,
   * whose answer is `attach`); the rings keep their indexes (read back from guest
   * memory), the balloon keeps its pages and actual, the buffers stay where they were.
   */
  resume?: { attach: balloon.AttachVmResponse; saved: GuestBalloonState };
}

/** The balloon driver's state outside guest memory (migration). */
export interface GuestBalloonState {
  features: number;
  bufPfn: number;
  /** vb_dev_info->pages: the balloon's blocks, [pfn, order], in stack order. */
  blocks: Array<[number, number]>;
}

// BalloonDriver keeps its page stack private; the migration reads and rebuilds it
// through this view (the stack is plain bookkeeping: the pages stay allocated in the
// allocator, whose metadata lives in guest memory and migrates with it).
interface BalloonStackView {
  stackPfn: Int32Array;
  stackOrder: Uint8Array;
  depth: number;
  numPages: number;
}

function balloonStack(driver: BalloonDriver): Array<[number, number]> {
  const v = driver as unknown as BalloonStackView;
  const out: Array<[number, number]> = [];
  for (let i = 0; i < v.depth; i++) out.push([v.stackPfn[i]!, v.stackOrder[i]!]);
  return out;
}

function restoreBalloonStack(driver: BalloonDriver, blocks: Array<[number, number]>, totalPages: number): void {
  const v = driver as unknown as BalloonStackView;
  if (blocks.length > v.stackPfn.length) throw new RangeError(`saved balloon has ${blocks.length} blocks, the driver room for ${v.stackPfn.length}`);
  let pages = 0;
  blocks.forEach(([pfn, order], i) => {
    if (!Number.isInteger(pfn) || !Number.isInteger(order) || order < 0 || order > 10 || pfn < 0 || pfn + 2 ** order > totalPages) throw new RangeError(`saved balloon block ${pfn}/${order} is outside guest RAM`);
    v.stackPfn[i] = pfn;
    v.stackOrder[i] = order;
    pages += 2 ** order;
  });
  v.depth = blocks.length;
  v.numPages = pages;
}

export interface GuestBalloon {
  readonly features: number;
  readonly mode: BalloonMode;
  readonly driver: BalloonDriver;
  /** The driver's transport over the balloon virtqueues (tests, diagnostics). */
  readonly transport: VirtqueueBalloonTransport;
  /** Pages in the balloon (= config actual once a step finished). */
  readonly numPages: number;
  /** Guest allocation that deflates the balloon when out of pages (DEFLATE_ON_OOM); -1 if still out of memory. */
  allocPages(order: number): Promise<number>;
  /** One free page reporting pass now; pages reported. 0 if REPORTING was not negotiated. */
  reportFreePages(): Promise<number>;
  /** Resolves once the balloon has caught up with the current target (or the guest ran out of pages). */
  settled(): Promise<void>;
  /** The driver's state for a migration (call with the guest paused, before stop()). */
  save(): GuestBalloonState;
  stop(): Promise<void>;
}


const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function startGuestBalloon(opts: GuestBalloonOptions): Promise<GuestBalloon> {
  const { memory, allocator, layout, vm } = opts;
  const log =
    opts.log ??
    ((level: "info" | "warn", msg: string, fields?: Record<string, unknown>) => {
      if (opts.ctx) opts.ctx.logger[level](fields ?? {}, msg);
    });
  if (allocator.totalPages * PAGE_SIZE > layout.reservedAddr) {
    throw new RangeError(`the guest allocator manages ${allocator.totalPages} pages, past reserved_addr ${layout.reservedAddr}: it must manage only guest RAM below the queues`);
  }
  const region = (device: string, index: number) => layout.queues.find((q) => q.device === device && q.index === index);
  const cfgRegion = region(BALLOON_CONFIG_DEVICE, 0);
  if (!cfgRegion || !region(BALLOON_DEVICE, 0) || !region(BALLOON_DEVICE, 1)) {
    throw new Error(`vm ${vm} was created without the balloon queues: add balloonQueueSpecs() to CreateVm's queues`);
  }

  // Doorbells and rings first (zeroed: a fresh device, §2.7.10.1), then the handshake.
  const doorbells: Doorbell[] = [];
  const queues = new Map<BalloonQueue, GuestQueue>();
  let bufPfn = -1;
  try {
    const open = (path: string) => {
      const d = Doorbell.open(path);
      doorbells.push(d);
      return d;
    };
    for (const name of ["inflate", "deflate", "stats", "reporting"] as const) {
      const r = region(BALLOON_DEVICE, BALLOON_QUEUE_INDEX[name]);
      if (!r) continue;
      // Resumed: the rings keep their indexes (the device resumes at its saved ones).
      const q = new DriverQueue(memory, { size: r.size, descAddr: r.descAddr, availAddr: r.availAddr, usedAddr: r.usedAddr }, opts.resume ? { initRings: false } : {});
      queues.set(name, { name, q, kick: open(r.kickPath), call: open(r.callPath) });
    }
    const cfgKick = open(cfgRegion.kickPath);
    const cfgCall = open(cfgRegion.callPath);
    const config = new GuestBalloonConfig(memory.buffer, memory.bytes.byteOffset + cfgRegion.descAddr);

    const client = async () => opts.client ?? (await balloonClient(opts));
    const attach = opts.resume ? opts.resume.attach : await attachWithRetry(await client(), vm, opts.features ?? DEFAULT_BALLOON_FEATURES, opts.attachTimeoutMs ?? 30_000);
    const features = attach.features;
    if (attach.configAddr !== cfgRegion.descAddr) throw new Error(`balloon-host uses config page ${attach.configAddr}, the layout says ${cfgRegion.descAddr}`);

    // The driver's buffers live in guest memory (the device reads them by address).
    if (opts.resume) {
      // Still allocated in the migrated allocator.
      const saved = opts.resume.saved;
      if (allocator.allocatedOrder(saved.bufPfn) !== BUFFER_ORDER) throw new Error(`saved balloon buffer at pfn ${saved.bufPfn} is not an allocated order-${BUFFER_ORDER} block`);
    } else {
      bufPfn = allocator.alloc(BUFFER_ORDER);
      if (bufPfn < 0) throw new Error("no guest memory for the balloon buffers");
    }
    const ownBufPfn = opts.resume ? opts.resume.saved.bufPfn : bufPfn;
    const bufAddr = ownBufPfn * PAGE_SIZE;
    const negotiated = [...queues.values()].filter(
      (g) =>
        g.name === "inflate" ||
        g.name === "deflate" ||
        (g.name === "stats" && hasFeature(features, VIRTIO_BALLOON_F_STATS_VQ)) ||
        (g.name === "reporting" && hasFeature(features, VIRTIO_BALLOON_F_REPORTING)),
    );
    const transport = new VirtqueueBalloonTransport(memory, negotiated, config);
    const driver = new BalloonDriver({
      allocator,
      transport,
      features,
      buffer: new Uint8Array(memory.buffer, memory.bytes.byteOffset + bufAddr, PAGE_BITMAP_BUFFER_SIZE),
      statsBuffer: new Uint8Array(memory.buffer, memory.bytes.byteOffset + bufAddr + STATS_OFFSET, STATS_BUFFER_SIZE),
    });

    let stopped = false;
    // A new driver starts with an empty balloon (a rebooted guest's old balloon is gone);
    // a resumed one with the pages it had.
    if (opts.resume) restoreBalloonStack(driver, opts.resume.saved.blocks, allocator.totalPages);
    else config.actual = 0;
    const publishActual = () => {
      if (config.actual !== driver.numPages) {
        config.actual = driver.numPages;
        cfgKick.ring();
      }
    };

    // Configuration change handler (virtballoon_changed -> update_balloon_size_func).
    let settledWaiters: Array<() => void> = [];
    let following = true;
    const configLoop = (async () => {
      let seen = -1;
      while (!stopped) {
        following = true;
        const { target, generation } = config.readTarget();
        seen = generation;
        try {
          while (!stopped && config.generation === seen && driver.numPages !== target) {
            const diff = target - driver.numPages;
            const moved = diff > 0 ? await driver.fill(Math.min(diff, STEP_PAGES)) : await driver.leak(Math.min(-diff, STEP_PAGES));
            publishActual();
            if (moved === 0) {
              log("warn", "balloon cannot reach its target: the guest has no free pages left", { vm, target, actual: driver.numPages });
              break;
            }
          }
        } catch (e) {
          publishActual();
          if (!stopped) log("warn", `balloon ${driver.numPages < target ? "inflate" : "deflate"} failed: ${(e as Error).message}`, { vm, target, actual: driver.numPages });
        }
        if (config.generation !== seen) continue;
        following = false;
        const ws = settledWaiters;
        settledWaiters = [];
        for (const w of ws) w();
        try {
          await cfgCall.spinThenWait(() => stopped || config.generation !== seen);
        } catch {
          break; // doorbell closed: stopping
        }
      }
      following = false;
    })();

    // Stats queue: the device holds our buffer and returns it when it wants fresh figures.
    const statsLoop = hasFeature(features, VIRTIO_BALLOON_F_STATS_VQ)
      ? (async () => {
          while (!stopped) {
            try {
              await driver.sendStats();
            } catch (e) {
              if (stopped) break;
              log("warn", `balloon stats buffer failed: ${(e as Error).message}`, { vm });
              await sleep(1000);
            }
          }
        })()
      : Promise.resolve();

    const reporting = hasFeature(features, VIRTIO_BALLOON_F_REPORTING);
    const reportMinOrder = opts.reportMinOrder ?? 9;
    const reportTimer =
      reporting && (opts.reportIntervalMs ?? 0) > 0
        ? setInterval(() => {
            driver.reportFreePages(reportMinOrder).catch((e: Error) => {
              if (!stopped) log("warn", `free page reporting failed: ${e.message}`, { vm });
            });
          }, opts.reportIntervalMs)
        : undefined;
    reportTimer?.unref();

    log("info", "balloon driver attached", { vm, features, mode: balloonModeFor(features), guestPages: attach.guestPages });

    return {
      features,
      mode: balloonModeFor(features),
      driver,
      transport,
      get numPages() {
        return driver.numPages;
      },
      async allocPages(order: number) {
        const pfn = await driver.allocPages(order);
        publishActual();
        return pfn;
      },
      reportFreePages: () => (reporting ? driver.reportFreePages(reportMinOrder) : Promise.resolve(0)),
      settled: () => (following ? new Promise<void>((r) => settledWaiters.push(r)) : Promise.resolve()),
      save: () => ({ features, bufPfn: ownBufPfn, blocks: balloonStack(driver) }),
      async stop() {
        if (stopped) return;
        stopped = true;
        if (reportTimer) clearInterval(reportTimer);
        transport.close();
        for (const d of doorbells) d.close();
        await Promise.all([configLoop, statsLoop]);
        for (const w of settledWaiters) w();
        settledWaiters = [];
      },
    };
  } catch (e) {
    for (const d of doorbells) d.close();
    if (bufPfn >= 0) allocator.free(bufPfn, BUFFER_ORDER);
    throw e;
  }
}

async function balloonClient(opts: GuestBalloonOptions): Promise<balloon.BalloonServiceClient> {
  const ctx = opts.ctx;
  if (!ctx) throw new Error("startGuestBalloon needs ctx or client");
  const deadline = Date.now() + (opts.attachTimeoutMs ?? 30_000);
  for (;;) {
    try {
      return await ctx.client(ctx.config.host, "balloon-host", balloon.BalloonServiceClient);
    } catch (e) {
      if (Date.now() > deadline) throw new Error(`balloon-host@${ctx.config.host} did not register: ${(e as Error).message}`);
      await sleep(200);
    }
  }
}

async function attachWithRetry(client: balloon.BalloonServiceClient, vm: string, driverFeatures: number, timeoutMs: number): Promise<balloon.AttachVmResponse> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await callUnary(client, client.attachVm, { vm, driverFeatures });
    } catch (e) {
      const se = e as ServiceError;
      if (se.code !== Status.UNAVAILABLE || Date.now() > deadline) throw new Error(`balloon AttachVm(${vm}) failed: ${se.details ?? se.message}`);
      await sleep(200);
    }
  }
}
