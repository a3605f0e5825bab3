// guest-driver: one VM (its vCPUs, virtio drivers, page allocator, workloads); see README.md.
import { status as Status } from "@grpc/grpc-js";
import { availableParallelism } from "node:os";
import { context, trace, SpanKind, TraceFlags } from "@opentelemetry/api";
import { isLockKind } from "@virtmesh/qspinlock";
import { startSpanWithId } from "@virtmesh/telemetry";
import { checkName, int, str } from "@virtmesh/config";
import { guest } from "@virtmesh/proto";
import { runService, unary, GrpcError } from "@virtmesh/runtime";
import { VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID } from "@virtmesh/virtio-blk";
import { blkConfig, bootBlk, BLK_DEVICE, type BlkDevice } from "./boot";
import { checkFioParams, mergeOutcome, newRunId, type FioParams, type RwMode, type SampledRequest, type TraceParent } from "./fio";
import type { SpinlockConfig } from "./vcpu-protocol";
import { VcpuRunError } from "./vcpus";
import { createGuestAllocator, startGuestBalloon } from "./balloon";

/** The guest span of a sampled request, under the span id its vCPU already gave the host. */
function recordRequestSpan(rec: SampledRequest, parent: ReturnType<typeof context.active>, vm: string): void {
  if (rec.endMs === 0) return; // never completed (abandoned run)
  startSpanWithId(
    rec.spanId,
    rec.name,
    { kind: SpanKind.CLIENT, startTime: rec.startMs, attributes: { "virtio.vm": vm, "virtio_blk.offset": rec.offset, "virtio_blk.bytes": rec.bytes, "fio.job": rec.job, "virtio_blk.status": rec.status } },
    parent,
  ).end(rec.endMs);
}

void runService({
  name: "guest-driver",
  hostScoped: true,
  instance: (env) => `guest-driver-${checkName("VIRTMESH_VM", str(env, "VIRTMESH_VM", "vm1"))}`,
  async setup(ctx) {
    const vm = checkName("VIRTMESH_VM", str(process.env, "VIRTMESH_VM", "vm1"));
    ctx.meta.vm = vm;
    const cfg = blkConfig(process.env, vm);
    // Sampled I/O: one request in VIRTMESH_BLK_TRACE_EVERY of a sampled RunFio call carries its trace through the ring.
    const traceEvery = int(process.env, "VIRTMESH_BLK_TRACE_EVERY", 1000, 0, 2 ** 31);
    const blk: BlkDevice = await bootBlk(ctx, vm, cfg);
    // The guest's page allocator manages guest RAM above the blk driver's fixed areas;
    // the balloon (issue 6) takes its pages from it and gives them back.
    const allocator = createGuestAllocator(blk.mem, blk.layout, blk.dataBase + blk.slots * cfg.maxBs);
    const balloon = await startGuestBalloon({ ctx, vm, memory: blk.mem, allocator, layout: blk.layout });

    // Completions are routed per slot owner: the vCPU running a workload's job, or the control slot.
    const control = blk.slots - 1;
    let controlDone: ((status: number, len: number) => void) | null = null;
    blk.driver.onComplete = (slot, status, len) => {
      if (slot === control) controlDone?.(status, len);
      else blk.vcpus.complete(slot, status);
    };
    const controlRequest = (type: number, dataLen: number): Promise<{ status: number; len: number }> =>
      new Promise((resolve, reject) => {
        if (controlDone) return reject(new GrpcError(Status.UNAVAILABLE, "a control request is already in flight"));
        controlDone = (status, len) => {
          controlDone = null;
          resolve({ status, len });
        };
        blk.driver.submit(control, type, 0, blk.dataBase + control * cfg.maxBs, dataLen);
        blk.driver.notify();
      });
    const id = await controlRequest(VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_ID_BYTES);
    const idBytes = blk.mem.bytes.subarray(blk.dataBase + control * cfg.maxBs, blk.dataBase + control * cfg.maxBs + VIRTIO_BLK_ID_BYTES);
    const serial = id.status === VIRTIO_BLK_S_OK ? Buffer.from(idBytes).toString("latin1").replace(/\0+$/, "") : "";
    ctx.meta.blkSerial = serial;
    ctx.logger.info({ disk: cfg.disk, diskBytes: blk.diskBytes, backend: cfg.backend, mode: cfg.mode, features: `0x${blk.features.toString(16)}`, serial, slots: blk.slots }, `${BLK_DEVICE} ready`);

    let state = guest.RunState.RUN_STATE_RUNNING;
    let fioBusy = false;
    let broken = "";
    const describe = (): guest.GuestState => ({
      vm,
      host: ctx.config.host,
      state,
      memoryBytes: blk.layout.memoryBytes,
      vcpus: cfg.vcpus + 1,
      devices: [`${BLK_DEVICE} virtio-blk ${cfg.backend}:${cfg.backend === "file" ? cfg.disk : blk.diskBytes} serial=${serial} completion=${cfg.mode}`],
    });
    const setState = async (s: guest.RunState) => {
      state = s;
      await ctx.registry.putVm({ vm, host: ctx.config.host, state: guest.runStateToJSON(s) });
      ctx.publish("lifecycle", { event: "state", vm, state: guest.runStateToJSON(s) });
      return describe();
    };
    ctx.addService("virtmesh.guest.v1.GuestService", guest.GuestServiceService, {
      getState: unary(() => describe()),
      pause: unary(() => {
        if (state !== guest.RunState.RUN_STATE_RUNNING) throw new GrpcError(Status.FAILED_PRECONDITION, `vm ${vm} is not running`);
        return setState(guest.RunState.RUN_STATE_PAUSED);
      }),
      resume: unary(() => {
        if (state !== guest.RunState.RUN_STATE_PAUSED) throw new GrpcError(Status.FAILED_PRECONDITION, `vm ${vm} is not paused`);
        return setState(guest.RunState.RUN_STATE_RUNNING);
      }),
      runFio: unary(async (req: guest.FioRequest): Promise<guest.FioResult> => {
        if (state !== guest.RunState.RUN_STATE_RUNNING) throw new GrpcError(Status.FAILED_PRECONDITION, `vm ${vm} is not running`);
        if (blk.driver.failure) throw new GrpcError(Status.FAILED_PRECONDITION, `${BLK_DEVICE} is broken: ${blk.driver.failure.message}`);
        if (broken) throw new GrpcError(Status.FAILED_PRECONDITION, `${BLK_DEVICE} needs a reset: ${broken}`);
        const p: FioParams = {
          rw: req.rw as RwMode,
          bs: req.blockSize || 4096,
          iodepth: req.iodepth || 1,
          numjobs: req.numjobs || 1,
          size: req.sizeBytes,
          runtimeMs: req.runtimeMs,
          verify: req.verify as FioParams["verify"],
          rwmixRead: req.rwmixRead,
        };
        const env = { driver: blk.driver, dataBase: blk.dataBase, maxBs: cfg.maxBs, slots: blk.slots - 1, diskBytes: blk.diskBytes, traceEvery };
        if (!p.size) p.size = Math.min(64 * 1024 * 1024, Math.floor(blk.diskBytes / p.numjobs / p.bs) * p.bs);
        const bad = checkFioParams(p, env);
        if (bad) throw new GrpcError(Status.INVALID_ARGUMENT, bad);
        if (req.spinlock !== "" && !isLockKind(req.spinlock)) throw new GrpcError(Status.INVALID_ARGUMENT, `spinlock '${req.spinlock}' must be ticket or queue (or empty for the guest's ${cfg.spinlock.kind})`);
        if (req.pvSpinlock !== "" && req.pvSpinlock !== "on" && req.pvSpinlock !== "off") throw new GrpcError(Status.INVALID_ARGUMENT, `pv_spinlock '${req.pvSpinlock}' must be on or off (or empty for the guest's setting)`);
        const lockCfg: SpinlockConfig = {
          kind: req.spinlock === "" ? cfg.spinlock.kind : req.spinlock,
          pv: req.pvSpinlock === "" ? cfg.spinlock.pv : req.pvSpinlock === "on",
          unfair: cfg.spinlock.unfair,
        };
        if (fioBusy) throw new GrpcError(Status.FAILED_PRECONDITION, "a fio run is already in progress");
        fioBusy = true;
        // Watchdog: when requests stop completing, ask the device whether it entered
        // NEEDS_RESET (§2.1.2; a real guest gets a config-change interrupt) and fail the run.
        let watch: NodeJS.Timeout | undefined;
        const stalled = new Promise<never>((_, reject) => {
          let seen = -1;
          watch = setInterval(() => {
            if (blk.driver.failure) {
              // The interrupt handler stopped on a device that broke the used ring protocol.
              reject(new GrpcError(Status.FAILED_PRECONDITION, `${BLK_DEVICE} is broken: ${blk.driver.failure.message}`));
              return;
            }
            const now = blk.driver.completed;
            if (now !== seen) {
              seen = now;
              return;
            }
            blk.deviceStats().then(
              (s) => {
                if (s.needsReset) {
                  broken = s.needsResetReason;
                  reject(new GrpcError(Status.FAILED_PRECONDITION, `${BLK_DEVICE} entered NEEDS_RESET: ${s.needsResetReason}`));
                }
              },
              () => undefined,
            );
          }, 2000);
        });
        // No vCPU is inside vq->lock between runs (a run settles only when all its vCPUs
        // have stopped; the boot CPU takes the lock only synchronously): lay out a fresh
        // one of this run's kind, so its statistics are this run's.
        const { lock, space } = blk.vcpus.layOutLock(lockCfg);
        blk.driver.lock = lock;
        const parentCtx = context.active();
        const sc = trace.getSpanContext(parentCtx);
        const parent: TraceParent | null = sc && (sc.traceFlags & TraceFlags.SAMPLED) !== 0 ? { traceId: sc.traceId, traceFlags: sc.traceFlags } : null;
        // The run's vCPUs take the queue's interrupts themselves; the boot CPU stands aside.
        blk.driver.park();
        const running = blk.vcpus.run(p, lockCfg, newRunId(), parent, traceEvery);
        // The next run may start only once every vCPU of this one has stopped, even if this call fails first.
        const settled = (): void => {
          blk.driver.unpark();
          fioBusy = false;
        };
        running.then(settled, settled);
        try {
          const { partials: parts, elapsedMs } = await Promise.race([running, stalled]);
          const left = parts.reduce((a, x) => a + x.inflight, 0);
          if (left > 0) broken = `${left} requests of an abandoned fio run never completed`;
          if (parts.some((x) => x.stopped)) throw new GrpcError(Status.ABORTED, `the fio run was stopped before it finished (${(state as guest.RunState) === guest.RunState.RUN_STATE_STOPPED ? "the guest is shutting down" : "abandoned"})`);
          const r = mergeOutcome(parts, elapsedMs);
          for (const part of parts) for (const rec of part.spans) recordRequestSpan(rec, parentCtx, vm);
          const st = space.stats();
          const vcpusUsed = Math.min(p.numjobs, cfg.vcpus) + 1;
          return {
            readIos: r.readIos,
            writeIos: r.writeIos,
            iops: r.iops,
            mbPerS: r.mbPerS,
            latP50Us: r.latP50Us,
            latP99Us: r.latP99Us,
            latP999Us: r.latP999Us,
            verifyErrors: r.verifyErrors,
            verifyFailures: r.verifyFailures,
            runtimeMs: r.runtimeMs,
            spinlock: {
              kind: lockCfg.kind,
              pv: lockCfg.pv,
              unfair: lockCfg.unfair,
              vcpus: vcpusUsed,
              hostCores: availableParallelism(),
              acquisitions: st.acquired,
              slowpath: st.lockSlowpath,
              spins: st.spins,
              halts: st.haltQhead + st.haltQnode + st.ticketHalt,
              kicks: st.kickCpu,
              spuriousWakes: st.wakeSpurious,
              kickNohalt: st.kickNohalt,
              steals: st.steals,
              haltedMs: st.haltedUs / 1000,
            },
          };
        } catch (e) {
          // A stalled or failed run: the vCPUs stop issuing and drain what they can.
          blk.vcpus.abandon();
          if (e instanceof VcpuRunError && (state as guest.RunState) === guest.RunState.RUN_STATE_STOPPED) {
            throw new GrpcError(Status.ABORTED, `the fio run was stopped before it finished (the guest is shutting down): ${e.message}`);
          }
          if (e instanceof VcpuRunError) {
            // A vCPU died or threw mid-run: its requests' fate is unknown. Refuse further runs.
            broken = e.message;
            throw new GrpcError(Status.INTERNAL, `fio failed on a guest vCPU: ${e.message}`);
          }
          throw e;
        } finally {
          clearInterval(watch);
        }
      }),
    });
    await ctx.registry.putVm({ vm, host: ctx.config.host, state: "RUN_STATE_RUNNING" });
    return {
      quiesce() {
        // A running fio stops issuing, drains what it has in flight and answers ABORTED
        // while the server still lets calls in flight finish.
        state = guest.RunState.RUN_STATE_STOPPED;
        blk.vcpus.abandon();
      },
      async stop() {
        state = guest.RunState.RUN_STATE_STOPPED;
        blk.vcpus.abandon();
        await balloon.stop();
        await blk.shutdown();
        await ctx.registry.putVm({ vm, host: ctx.config.host, state: "RUN_STATE_STOPPED" }).catch(() => undefined);
      },
    };
  },
});
