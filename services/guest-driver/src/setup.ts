// The guest-driver as its VM's VMM: boots the VM (or, with VIRTMESH_INCOMING=1, waits
// for one to migrate in), serves GuestService, and takes the VM through a live
// migration's steps (MIGRATION.md): Pause, SaveState, Release on the source;
// LoadState, Resume on the destination; Resume or AbortIncoming when it fails.
import { status as Status, type ServerUnaryCall } from "@grpc/grpc-js";
import type { Msg } from "@nats-io/transport-node";
import { BuddyAllocator, PAGE_SIZE } from "@virtmesh/balloon";
import { ConfigError, int, str } from "@virtmesh/config";
import { serviceSubject } from "@virtmesh/nats";
import { balloon as balloonApi, callUnary, completion, guest, sidecar, vhost } from "@virtmesh/proto";
import { GrpcError, unary, type ServiceContext, type ServiceHooks } from "@virtmesh/runtime";
import { asBuffer, BLK_DEVICE, blkConfig, type BlkConfig } from "./boot";
import { FioRunner } from "./fio-rpc";
import { bootGuestVm, loadGuestVm, restartBalloon, type GuestVm } from "./guest-vm";
import { GuestVcpus, type StressSnapshot } from "./vcpus";
import type { GuestBalloonState } from "./balloon";
import { decodeEnvelope, encodeEnvelope, EnvelopeError, jsonSection, S_BALLOON_DEVICE, S_BLK_DEVICE, S_GUEST, S_KERNEL, S_WORKLOADS, type GuestSection, type Sections } from "./migrate";
import { allocWorkingSet, freePageHint, freeWorkingSet } from "./working-set";
import { checkDmaRequest, DmaDevice, encodeDmaState, noDmaDevice, S_DMA_DEVICE, sidecarIommu } from "./dma-device";

const R = guest.RunState;

/** What a (non-dry) SaveState stopped on the source, to restart it if the migration fails. */
interface Stopped {
  ringBase?: number;
  balloonDevice?: Uint8Array;
  balloonGuest?: GuestBalloonState;
}

/** Warm vCPU threads an incoming guest keeps (a migrated VM with more busy vCPUs starts the rest cold). */
const WARM_VCPUS = 3;

export async function setupGuestDriver(ctx: ServiceContext, vm: string): Promise<ServiceHooks> {
  const cfg: BlkConfig = blkConfig(process.env, vm);
  const incomingMode = str(process.env, "VIRTMESH_INCOMING", "0");
  if (incomingMode !== "0" && incomingMode !== "1") throw new ConfigError(`VIRTMESH_INCOMING=${incomingMode} must be 0 or 1`);
  // Sampled I/O: one request in VIRTMESH_BLK_TRACE_EVERY of a sampled RunFio call carries its trace through the ring.
  const traceEvery = int(process.env, "VIRTMESH_BLK_TRACE_EVERY", 1000, 0, 2 ** 31);
  const host = ctx.config.host;

  let g: GuestVm | null = null;
  let state: guest.RunState = R.RUN_STATE_INCOMING;
  let stopped: Stopped | null = null;
  /** A VM came in by LoadState and was not resumed yet (AbortIncoming may drop it). */
  let incomingLoaded = false;
  // One state-changing call at a time (Pause, Resume, SaveState, LoadState, Release, AbortIncoming, stress start/stop).
  let busy: Promise<unknown> = Promise.resolve();
  const serial = <T>(fn: () => Promise<T>): Promise<T> => {
    const run = busy.then(fn, fn);
    busy = run.catch(() => undefined);
    return run;
  };
  const fio = new FioRunner(ctx, vm, traceEvery, () => state === R.RUN_STATE_STOPPED);

  const describe = (): guest.GuestState => ({
    vm,
    host,
    state,
    memoryBytes: g?.blk.layout.memoryBytes ?? 0,
    vcpus: (g?.blk.cfg.vcpus ?? cfg.vcpus) + 1,
    devices: g ? [`${BLK_DEVICE} virtio-blk ${g.blk.cfg.backend}:${g.blk.cfg.backend === "file" ? g.blk.cfg.disk : g.blk.diskBytes} serial=${g.serial} completion=${g.blk.cfg.mode}`] : [],
  });
  const setState = async (s: guest.RunState, placement = true): Promise<guest.GuestState> => {
    state = s;
    if (placement) await ctx.registry.putVm({ vm, host, state: guest.runStateToJSON(s) });
    ctx.publish("lifecycle", { event: "state", vm, state: guest.runStateToJSON(s) });
    return describe();
  };
  /** The VM, in one of `states`, or FAILED_PRECONDITION saying why not. */
  const vmIn = (...states: guest.RunState[]): GuestVm => {
    if (state === R.RUN_STATE_INCOMING || !g) throw new GrpcError(Status.FAILED_PRECONDITION, `${vm} is waiting for an incoming migration`);
    if (!states.includes(state)) throw new GrpcError(Status.FAILED_PRECONDITION, `${vm} is ${guest.runStateToJSON(state).replace("RUN_STATE_", "").toLowerCase()}, not ${states.map((s) => guest.runStateToJSON(s).replace("RUN_STATE_", "").toLowerCase()).join(" or ")}`);
    return g;
  };
  const setDirtyLogging = (enabled: boolean): void => {
    g?.blk.setDirtyLogging(enabled);
  };

  // The sidecar turns dirty logging on and off for a migration (SetDirtyLogging): the
  // vCPUs then record their writes in the vCPU log, as KVM_MEM_LOG_DIRTY_PAGES makes them.
  const dirtySub = ctx.nc.subscribe(serviceSubject(host, "shm-sidecar", "dirty-logging"), {
    callback: (err: Error | null, msg: Msg) => {
      if (err) return;
      try {
        const e = JSON.parse(msg.string()) as { vm?: unknown; enabled?: unknown };
        if (e.vm === vm && typeof e.enabled === "boolean") setDirtyLogging(e.enabled);
      } catch {
        /* not ours */
      }
    },
  });

  const clients = async () => ({
    sc: await ctx.client(host, "shm-sidecar", sidecar.SharedMemoryServiceClient),
    vw: await ctx.client(host, "vhost-worker", vhost.VhostBlkServiceClient),
    ct: await ctx.client(host, "completion-thread", completion.CompletionServiceClient),
    bc: await ctx.client(host, "balloon-host", balloonApi.BalloonServiceClient),
  });
  const quiet = () => undefined;

  /** Drops a VM (released source, aborted destination): devices, balloon, the sidecar's VM, the mapping. */
  const dropVm = async (): Promise<void> => {
    const old = g;
    g = null;
    stopped = null;
    const c = await clients();
    if (old) {
      // The assigned device stops; its pins and mapping go before the sidecar's VM does.
      await old.dma?.release().catch((e: Error) => ctx.logger.warn(`DMA device release: ${e.message}`));
      await old.balloon?.stop();
      await old.blk.release();
    } else {
      // Nothing was loaded, but the manager created the incoming VM and devices may hold bits of it.
      await callUnary(c.vw, c.vw.resetOwner, { vm, device: BLK_DEVICE }).catch(quiet);
      await callUnary(c.ct, c.ct.detachQueue, { vm, device: BLK_DEVICE, index: 0 }).catch(quiet);
      await callUnary(c.sc, c.sc.destroyVm, { vm }).catch(quiet);
    }
    await callUnary(c.bc, c.bc.detachVm, { vm }).catch(quiet);
  };

  const stress = (s: StressSnapshot): guest.StressStatus => ({
    running: s.running,
    workingSetBytes: s.bytes,
    vcpus: s.vcpus,
    pagesWritten: s.pagesWritten,
    passes: s.passes,
    dirtyRateBytesPerS: s.dirtyRateBytesPerS,
    throttlePct: s.throttlePct,
    workingSetAddr: s.addr,
  });

  /** The guest's own sections; `full` on a paused, stopped guest (workloads and balloon driver saved). */
  const guestSections = async (v: GuestVm, full: boolean, out: Sections): Promise<void> => {
    const bs = v.balloon?.save() ?? stopped?.balloonGuest ?? { features: 0, bufPfn: -1, blocks: [] };
    const section: GuestSection = {
      vm,
      sourceHost: host,
      serial: v.serial,
      blk: v.blk.guestState(),
      balloonBlocks: bs.blocks,
      balloonFeatures: bs.features,
      balloonBufPfn: bs.bufPfn,
      workingSet: v.workingSet,
      fioRun: fio.inFlight,
    };
    out.set(S_GUEST, jsonSection(section));
    // The guest kernel's memory (queue driver state, request maps, mailboxes): a copy.
    out.set(S_KERNEL, new Uint8Array(v.blk.vcpus.kernel.sab.slice(0)));
    if (v.dma) out.set(S_DMA_DEVICE, encodeDmaState(v.dma.save()));
    if (full) out.set(S_WORKLOADS, await v.blk.vcpus.saveWorkloads());
  };

  /**
   * What the guest kernel writes without going through the logged accessors (the page
   * allocator's metadata, the balloon config page, ring indexes written with Atomics),
   * marked dirty once the vCPUs are paused so the final sync sends its last contents.
   */
  const markRawWrites = (v: GuestVm): void => {
    const log = v.blk.mem.vcpu.dirtyLog;
    if (!log || !log.enabled) return;
    const { layout } = v.blk;
    log.markRange(layout.reservedAddr, layout.reservedBytes); // every ring, the balloon config page
    log.markRange(0, v.blk.dataBase); // request headers, status bytes, indirect tables
    const used = v.blk.dataBase + v.blk.slots * v.blk.guestState().maxBs;
    const metaOffset = Math.ceil(used / PAGE_SIZE) * PAGE_SIZE;
    log.markRange(metaOffset, BuddyAllocator.metadataBytes(Math.floor(layout.reservedAddr / PAGE_SIZE)));
  };

  const saveState = async (req: guest.SaveStateRequest): Promise<guest.VmState> => {
    const t0 = process.hrtime.bigint();
    const sections: Sections = new Map();
    if (req.dryRun) {
      // What a running guest can serialize without stopping anything: its size and time.
      const v = vmIn(R.RUN_STATE_RUNNING, R.RUN_STATE_PAUSED);
      sections.set(S_BLK_DEVICE, new Uint8Array(0));
      sections.set(S_BALLOON_DEVICE, new Uint8Array(0));
      await guestSections(v, false, sections);
    } else {
      const v = vmIn(R.RUN_STATE_PAUSED);
      const st: Stopped = stopped ?? {};
      stopped = st;
      // QEMU vhost_dev_stop(): GET_VRING_BASE stops the ring once in-flight requests
      // completed (parallel: the completion-thread drained), then the device's state.
      if (st.ringBase === undefined) st.ringBase = await v.blk.stopRing();
      sections.set(S_BLK_DEVICE, await v.blk.saveDevice());
      const c = await clients();
      if (st.balloonDevice === undefined) {
        st.balloonDevice = (await callUnary(c.bc, c.bc.saveState, { vm })).state;
        st.balloonGuest = v.balloon?.save();
        await v.balloon?.stop();
        v.balloon = null;
      }
      sections.set(S_BALLOON_DEVICE, st.balloonDevice);
      markRawWrites(v);
      await guestSections(v, true, sections);
    }
    const bytes = encodeEnvelope(sections);
    const saveUs = Number((process.hrtime.bigint() - t0) / 1000n);
    return { state: asBuffer(bytes), saveUs, fioRun: fio.inFlight };
  };

  const resume = async (): Promise<guest.GuestState> => {
    const v = vmIn(R.RUN_STATE_PAUSED);
    const st = stopped;
    if (st) {
      // A failed or cancelled migration after SaveState: the devices run again first.
      if (st.ringBase !== undefined) await v.blk.restartRing(st.ringBase);
      st.ringBase = undefined;
      if (st.balloonDevice !== undefined && st.balloonGuest) v.balloon = await restartBalloon(ctx, vm, v, st.balloonDevice, st.balloonGuest);
      stopped = null;
    }
    // The boot CPU checks the used ring at once (completions that arrived while paused).
    v.blk.driver.thaw();
    v.blk.vcpus.resume();
    v.dma?.start();
    incomingLoaded = false;
    return setState(R.RUN_STATE_RUNNING);
  };

  const loadState = async (req: guest.LoadStateRequest): Promise<guest.GuestState> => {
    if (state !== R.RUN_STATE_INCOMING || g) throw new GrpcError(Status.FAILED_PRECONDITION, `${vm} is ${guest.runStateToJSON(state)}: LoadState needs RUN_STATE_INCOMING`);
    let sections: Sections;
    try {
      sections = decodeEnvelope(req.state);
    } catch (e) {
      throw new GrpcError(Status.INVALID_ARGUMENT, (e as Error).message);
    }
    try {
      g = await loadGuestVm(ctx, vm, cfg, sections);
    } catch (e) {
      if (e instanceof EnvelopeError) throw new GrpcError(Status.INVALID_ARGUMENT, e.message);
      throw new GrpcError(Status.FAILED_PRECONDITION, `LoadState from ${req.sourceHost || "?"}: ${(e as Error).message}`);
    }
    incomingLoaded = true;
    if (g.blk.layout.dirtyLogging) setDirtyLogging(true);
    ctx.logger.info({ vm, source: req.sourceHost, bytes: req.state.length }, "VM state loaded: paused until Resume");
    return setState(R.RUN_STATE_PAUSED, false);
  };

  ctx.addService("virtmesh.guest.v1.GuestService", guest.GuestServiceService, {
    getState: unary(() => describe()),
    pause: unary(() =>
      serial(async () => {
        const v = vmIn(R.RUN_STATE_RUNNING);
        // Every vCPU parks between two steps; the boot CPU takes no interrupt.
        await v.blk.vcpus.pause();
        // The assigned device is quiesced too: no DMA write after Pause (stop-and-copy).
        v.dma?.pause();
        v.blk.driver.freeze();
        return setState(R.RUN_STATE_PAUSED);
      }),
    ),
    resume: unary(() => serial(resume)),
    runFio: unary((req: guest.FioRequest, call: ServerUnaryCall<guest.FioRequest, guest.FioResult>) => fio.run(vmIn(R.RUN_STATE_RUNNING), req, call)),
    startStress: unary((req: guest.StressRequest) =>
      serial(async () => {
        const v = vmIn(R.RUN_STATE_RUNNING);
        const bytes = req.workingSetBytes;
        if (!(bytes > 0 && bytes % PAGE_SIZE === 0 && Number.isSafeInteger(bytes))) throw new GrpcError(Status.INVALID_ARGUMENT, `working_set_bytes ${bytes} must be a positive multiple of ${PAGE_SIZE}`);
        const vcpus = req.vcpus || 1;
        if (vcpus > v.blk.vcpus.count) throw new GrpcError(Status.INVALID_ARGUMENT, `vcpus ${vcpus}: the guest has ${v.blk.vcpus.count} vCPUs for workloads`);
        if (v.workingSet) throw new GrpcError(Status.FAILED_PRECONDITION, "the dirtying workload is already running (StopStress first)");
        const ws = allocWorkingSet(v.allocator, bytes / PAGE_SIZE);
        if (!ws) {
          throw new GrpcError(Status.RESOURCE_EXHAUSTED, `no ${bytes / 2 ** 20} MiB contiguous free in the guest (${v.allocator.freePages * PAGE_SIZE} bytes free in all; guest RAM ${v.blk.layout.reservedAddr} bytes)`);
        }
        try {
          await v.blk.vcpus.startStress({ addr: ws.pfn * PAGE_SIZE, bytes, rateBytesPerS: req.dirtyRateBytesPerS, vcpus });
        } catch (e) {
          freeWorkingSet(v.allocator, ws);
          throw e instanceof RangeError ? new GrpcError(Status.INVALID_ARGUMENT, e.message) : e;
        }
        v.workingSet = ws;
        return stress(v.blk.vcpus.stressStatus());
      }),
    ),
    stopStress: unary(() =>
      serial(async () => {
        const v = vmIn(R.RUN_STATE_RUNNING, R.RUN_STATE_PAUSED);
        const snap = await v.blk.vcpus.stopStress();
        if (v.workingSet) freeWorkingSet(v.allocator, v.workingSet);
        v.workingSet = null;
        return stress(snap);
      }),
    ),
    getStress: unary(() => {
      const v = vmIn(R.RUN_STATE_RUNNING, R.RUN_STATE_PAUSED);
      return stress(v.blk.vcpus.stressStatus());
    }),
    // check_guests_ram reads a still walk: a running guest's vCPUs stand still for the
    // check (between two steps, as for a pause) and go on afterwards.
    verifyStress: unary(() =>
      serial(async () => {
        const v = vmIn(R.RUN_STATE_RUNNING, R.RUN_STATE_PAUSED);
        const hold = state === R.RUN_STATE_RUNNING && v.blk.vcpus.stressStatus().running;
        if (hold) await v.blk.vcpus.pause();
        try {
          return v.blk.vcpus.verifyStress(v.blk.mem.bytes);
        } finally {
          if (hold) v.blk.vcpus.resume();
        }
      }),
    ),
    setThrottle: unary((req: guest.ThrottleRequest) => {
      const v = vmIn(R.RUN_STATE_RUNNING, R.RUN_STATE_PAUSED);
      if (!(req.pct >= 0 && req.pct <= 99)) throw new GrpcError(Status.INVALID_ARGUMENT, `pct ${req.pct} must be 0..99`);
      v.blk.vcpus.setThrottle(req.pct);
      return describe();
    }),
    getFreePageHint: unary(() => {
      const v = vmIn(R.RUN_STATE_RUNNING, R.RUN_STATE_PAUSED);
      return freePageHint(v.allocator, Math.floor(v.blk.layout.memoryBytes / PAGE_SIZE));
    }),
    saveState: unary((req: guest.SaveStateRequest) => (req.dryRun ? saveState(req) : serial(() => saveState(req)))),
    loadState: unary((req: guest.LoadStateRequest) => serial(() => loadState(req))),
    release: unary((req: guest.ReleaseRequest) =>
      serial(async () => {
        vmIn(R.RUN_STATE_PAUSED);
        if (!stopped || stopped.ringBase === undefined) throw new GrpcError(Status.FAILED_PRECONDITION, `${vm} was not saved (SaveState first): Release would lose its state`);
        if (req.destinationHost === host) throw new GrpcError(Status.INVALID_ARGUMENT, `destination_host ${host} is this host`);
        // A RunFio caller still waiting here gets the destination's AwaitFio result.
        if (req.destinationHost) fio.handOff(req.destinationHost);
        // The workloads go on at the destination: the vCPUs forget them, touching nothing.
        await g?.blk.vcpus.dropWorkloads();
        await dropVm();
        ctx.logger.info({ vm, destination: req.destinationHost }, "VM released after migration: waiting for an incoming one");
        warmVcpus();
        return setState(R.RUN_STATE_INCOMING, false);
      }),
    ),
    abortIncoming: unary(() =>
      serial(async () => {
        // Only what came in: nothing yet, or a VM loaded here and never resumed.
        if (state !== R.RUN_STATE_INCOMING && !(state === R.RUN_STATE_PAUSED && incomingLoaded)) {
          throw new GrpcError(Status.FAILED_PRECONDITION, `${vm} is ${guest.runStateToJSON(state)}: nothing incoming to abort`);
        }
        await dropVm();
        incomingLoaded = false;
        warmVcpus();
        return setState(R.RUN_STATE_INCOMING, false);
      }),
    ),
    setDmaDevice: unary((req: guest.DmaDeviceRequest) =>
      serial(async () => {
        const v = vmIn(R.RUN_STATE_RUNNING);
        if (req.regionBytes === 0) {
          const d = v.dma;
          if (!d) return noDmaDevice();
          v.dma = null;
          await d.detach(v.allocator);
          return { ...noDmaDevice(), dmaWrites: d.dmaWrites };
        }
        const rate = checkDmaRequest(req, v.blk.layout.reservedAddr);
        if (v.dma) throw new GrpcError(Status.FAILED_PRECONDITION, `a DMA device is already attached (${v.dma.regionBytes} bytes at iova 0x${v.dma.iova.toString(16)}): detach it first (region_bytes 0)`);
        // The manager decides at setup whether the container is tracked (IommuInfo mappings): a device attached later would go unseen.
        if (v.blk.mem.vcpu.dirtyLog?.enabled) throw new GrpcError(Status.FAILED_PRECONDITION, `${vm} is migrating (dirty logging on): attach the DMA device before or after the migration`);
        const { sc } = await clients();
        const d = await DmaDevice.attach({ vm, iommu: sidecarIommu(sc), mem: v.blk.mem.bytes, allocator: v.allocator, regionBytes: req.regionBytes, writeRateBytesPerS: rate });
        v.dma = d;
        d.start();
        return d.status();
      }),
    ),
    getDmaDevice: unary(() => vmIn(R.RUN_STATE_RUNNING, R.RUN_STATE_PAUSED).dma?.status() ?? noDmaDevice()),
    awaitFio: unary((req: guest.AwaitFioRequest) => fio.awaitMigrated(vmIn(R.RUN_STATE_RUNNING, R.RUN_STATE_PAUSED), req.run)),
  });

  // An incoming guest keeps warm vCPU threads, so a migrated VM's vCPUs start within the downtime.
  // ... and its connections to this host's services up, so that no channel is set up
  // within the downtime either.
  const warmVcpus = (): void => {
    GuestVcpus.warm(Math.min(cfg.vcpus, WARM_VCPUS));
    clients().then((c) => {
      for (const x of [c.sc, c.vw, c.ct, c.bc]) x.getChannel().getConnectivityState(true);
    }, quiet);
  };
  if (incomingMode === "1") {
    ctx.logger.info({ vm }, "incoming mode: no VM created, waiting for a migration");
    warmVcpus();
  } else {
    g = await bootGuestVm(ctx, vm, cfg);
    ctx.meta.blkSerial = g.serial;
    ctx.logger.info({ disk: cfg.disk, diskBytes: g.blk.diskBytes, backend: cfg.backend, mode: cfg.mode, features: `0x${g.blk.features.toString(16)}`, serial: g.serial, slots: g.blk.slots }, `${BLK_DEVICE} ready`);
    if (g.blk.layout.dirtyLogging) setDirtyLogging(true);
    await setState(R.RUN_STATE_RUNNING);
  }

  return {
    quiesce() {
      // A running fio stops issuing, drains what it has in flight and answers ABORTED
      // while the server still lets calls in flight finish.
      state = R.RUN_STATE_STOPPED;
      g?.dma?.pause();
      g?.blk.vcpus.abandon();
    },
    async stop() {
      state = R.RUN_STATE_STOPPED;
      dirtySub.unsubscribe();
      await GuestVcpus.coolDown();
      const v = g;
      g = null;
      if (!v) return;
      v.blk.vcpus.abandon();
      await v.dma?.release().catch(quiet);
      v.blk.driver.thaw();
      await v.balloon?.stop();
      await v.blk.shutdown();
      await ctx.registry.putVm({ vm, host, state: "RUN_STATE_STOPPED" }).catch(quiet);
    },
  };
}
