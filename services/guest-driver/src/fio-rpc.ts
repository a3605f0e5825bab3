// GuestService.RunFio (and AwaitFio): one fio run at a time on the guest's vCPUs.
// A run whose caller goes away (deadline or cancel) is abandoned at once: its vCPUs
// stop issuing and drain, so the next run is not refused for a run nobody waits for
// (issue 16). A run in flight when the VM migrates answers with the destination's
// AwaitFio result.
import { status as Status, type ServerUnaryCall } from "@grpc/grpc-js";
import { availableParallelism } from "node:os";
import { context, trace, SpanKind, TraceFlags } from "@opentelemetry/api";
import { isLockKind, type LockSpace } from "@virtmesh/qspinlock";
import { startSpanWithId } from "@virtmesh/telemetry";
import { callUnary, guest } from "@virtmesh/proto";
import { GrpcError, type ServiceContext } from "@virtmesh/runtime";
import { BLK_DEVICE } from "./boot";
import { checkFioParams, mergeOutcome, newRunId, type FioOutcome, type FioParams, type RwMode, type SampledRequest, type TraceParent } from "./fio";
import type { GuestVm } from "./guest-vm";
import type { SpinlockConfig } from "./vcpu-protocol";
import { VcpuRunError } from "./vcpus";

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

type Moved = { destinationHost: string; run: string };

export class FioRunner {
  private busy = false;
  /** Why the disk refuses runs until the guest restarts ("" none). */
  broken = "";
  /** The run in flight, "" none. */
  private runId = "";
  private moved: ((m: Moved) => void) | null = null;

  constructor(
    private readonly ctx: ServiceContext,
    private readonly vm: string,
    private readonly traceEvery: number,
    /** The guest is shutting down (a stopped run says so). */
    private readonly stopping: () => boolean,
  ) {}

  /** The run in flight (VmState.fio_run), "" none. */
  get inFlight(): string {
    return this.runId;
  }

  /** The VM now runs on `destinationHost`: the run in flight answers with its AwaitFio there. */
  handOff(destinationHost: string): void {
    if (this.runId !== "") this.moved?.({ destinationHost, run: this.runId });
  }

  async run(g: GuestVm, req: guest.FioRequest, call: ServerUnaryCall<guest.FioRequest, guest.FioResult>): Promise<guest.FioResult> {
    const { blk } = g;
    const cfg = blk.cfg;
    if (blk.driver.failure) throw new GrpcError(Status.FAILED_PRECONDITION, `${BLK_DEVICE} is broken: ${blk.driver.failure.message}`);
    if (this.broken) throw new GrpcError(Status.FAILED_PRECONDITION, `${BLK_DEVICE} needs a reset: ${this.broken}`);
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
    const env = { driver: blk.driver, dataBase: blk.dataBase, maxBs: cfg.maxBs, slots: blk.slots - 1, diskBytes: blk.diskBytes, traceEvery: this.traceEvery };
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
    if (this.busy || blk.vcpus.currentRun()) throw new GrpcError(Status.FAILED_PRECONDITION, "a fio run is already in progress");
    if (call.cancelled) throw new GrpcError(Status.CANCELLED, "the caller went away before the run started");
    this.busy = true;
    const runId = newRunId();
    this.runId = String(runId);
    // The caller went away (deadline, cancel, closed channel): nobody waits for this
    // run, so stop it now rather than refusing every new run until it ends (issue 16).
    let callerGone = false;
    const onCancelled = (): void => {
      callerGone = true;
      this.ctx.logger.warn({ vm: this.vm, run: runId }, "fio caller went away: stopping its run");
      blk.vcpus.abandon();
    };
    call.once("cancelled", onCancelled);
    const moved = new Promise<Moved>((resolve) => (this.moved = resolve));
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
        // A paused VM completes nothing, by design.
        if (now !== seen || blk.driver.isFrozen) {
          seen = now;
          return;
        }
        blk.deviceStats().then(
          (s) => {
            if (s.needsReset) {
              this.broken = s.needsResetReason;
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
    const running = blk.vcpus.run(p, lockCfg, runId, parent, this.traceEvery);
    // The next run may start only once every vCPU of this one has stopped, even if this call fails first.
    const settled = (): void => {
      blk.driver.unpark();
      this.busy = false;
      this.runId = "";
      this.moved = null;
    };
    running.then(settled, settled);
    try {
      const outcome = await Promise.race([running.then((r) => ({ local: r })), stalled, moved.then((m) => ({ moved: m }))]);
      if ("moved" in outcome) {
        clearInterval(watch);
        return await this.awaitElsewhere(outcome.moved, call);
      }
      const { partials: parts, elapsedMs } = outcome.local;
      const left = parts.reduce((a, x) => a + x.inflight, 0);
      if (left > 0) this.broken = `${left} requests of an abandoned fio run never completed`;
      if (parts.some((x) => x.stopped)) {
        const why = this.stopping() ? "the guest is shutting down" : callerGone ? "its caller went away" : "abandoned";
        throw new GrpcError(callerGone ? Status.CANCELLED : Status.ABORTED, `the fio run was stopped before it finished (${why})`);
      }
      for (const part of parts) for (const rec of part.spans) recordRequestSpan(rec, parentCtx, this.vm);
      return fioResult(mergeOutcome(parts, elapsedMs), lockCfg, Math.min(p.numjobs, cfg.vcpus) + 1, space.stats());
    } catch (e) {
      // A stalled or failed run: the vCPUs stop issuing and drain what they can.
      blk.vcpus.abandon();
      if (e instanceof VcpuRunError && this.stopping()) {
        throw new GrpcError(Status.ABORTED, `the fio run was stopped before it finished (the guest is shutting down): ${e.message}`);
      }
      if (e instanceof VcpuRunError) {
        // A vCPU died or threw mid-run: its requests' fate is unknown. Refuse further runs.
        this.broken = e.message;
        throw new GrpcError(Status.INTERNAL, `fio failed on a guest vCPU: ${e.message}`);
      }
      throw e;
    } finally {
      clearInterval(watch);
      call.removeListener("cancelled", onCancelled);
    }
  }

  /** AwaitFio: the result of run `run`, which came here with the VM (restoreWorkloads). */
  async awaitMigrated(g: GuestVm, run: string): Promise<guest.FioResult> {
    const cur = g.blk.vcpus.currentRun();
    if (!cur || String(cur.info.runId) !== run) throw new GrpcError(Status.NOT_FOUND, `no fio run ${JSON.stringify(run.slice(0, 32))} in progress on this guest`);
    try {
      const { partials, elapsedMs } = await cur.done;
      if (partials.some((x) => x.stopped)) throw new GrpcError(Status.ABORTED, "the migrated fio run was stopped before it finished");
      return fioResult(mergeOutcome(partials, elapsedMs), cur.info.lock, cur.info.vcpus + 1, null);
    } catch (e) {
      if (e instanceof VcpuRunError) {
        this.broken = e.message;
        throw new GrpcError(Status.INTERNAL, `fio failed on a guest vCPU: ${e.message}`);
      }
      throw e;
    }
  }

  /** The run moved with the VM: its result is the destination guest-driver's AwaitFio. */
  private async awaitElsewhere(m: Moved, call: ServerUnaryCall<guest.FioRequest, guest.FioResult>): Promise<guest.FioResult> {
    const client = await this.ctx.client(m.destinationHost, `guest-driver-${this.vm}`, guest.GuestServiceClient);
    const d = call.getDeadline();
    const until = d instanceof Date ? d.getTime() : typeof d === "number" && Number.isFinite(d) ? d : Date.now() + 3_600_000;
    this.ctx.logger.info({ vm: this.vm, run: m.run, destination: m.destinationHost, at: client.getChannel().getTarget() }, "fio run moved with the VM: awaiting its result there");
    try {
      return await callUnary(client, client.awaitFio, { run: m.run }, Math.max(1000, until - Date.now()));
    } catch (e) {
      const se = e as { code?: number; details?: string; message: string };
      this.ctx.logger.warn({ vm: this.vm, run: m.run, destination: m.destinationHost }, `AwaitFio on ${m.destinationHost}: ${se.details ?? se.message}`);
      // The destination's answer, as it gave it.
      throw new GrpcError(se.code ?? Status.UNAVAILABLE, `the fio run moved to ${m.destinationHost} with the VM; its AwaitFio there: ${se.details ?? se.message}`);
    }
  }
}

/** The RunFio answer; `st` is the run's vq->lock statistics (null: laid out on another host, not known here). */
function fioResult(r: FioOutcome, lockCfg: SpinlockConfig, vcpusUsed: number, st: LockStats | null): guest.FioResult {
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
      acquisitions: st?.acquired ?? 0,
      slowpath: st?.lockSlowpath ?? 0,
      spins: st?.spins ?? 0,
      halts: st ? st.haltQhead + st.haltQnode + st.ticketHalt : 0,
      kicks: st?.kickCpu ?? 0,
      spuriousWakes: st?.wakeSpurious ?? 0,
      kickNohalt: st?.kickNohalt ?? 0,
      steals: st?.steals ?? 0,
      haltedMs: (st?.haltedUs ?? 0) / 1000,
    },
  };
}

type LockStats = ReturnType<LockSpace["stats"]>;
