// One live migration, as QEMU runs it (migration/migration.c migration_thread,
// migration/ram.c ram_save_setup / ram_save_iterate / ram_save_complete): setup, the bulk
// round, iterate (sync the dirty logs, decide, send, measure), stop-and-copy, complete.
// Each phase is a named function with its own span; every failure ends in FAILED or
// CANCELLED with a reason, and the source guest running.
//
// Guest memory never passes through here: SendDirty has the source sidecar stream the
// pages to the destination sidecar. Only the device state (VmState) crosses the manager.
import { performance } from "node:perf_hooks";
import { context, trace, SpanStatusCode, type Link, type Span } from "@opentelemetry/api";
import { guest, migration, sidecar } from "@virtmesh/proto";
import {
  AutoConverge,
  PAGE_SIZE,
  bitmapOr,
  dirtyRate,
  emptyRound,
  expectedDowntimeMs,
  measuredBandwidth,
  migrationStatus,
  pastMaxTotal,
  phaseName,
  popcount,
  shouldSwitchover,
  u32,
  type MigrationCounters,
  type MigrationLimits,
} from "@virtmesh/migration";
import type { GuestCalls, MigrationPeers, SidecarCalls } from "./peers";

/** A round must carry this much page data for its rate to stand for the link's bandwidth. */
const BANDWIDTH_SAMPLE_BYTES = 256 * 1024;
const P = migration.MigrationPhase;
const tracer = () => trace.getTracer("virtmesh.migration-manager");

/** VFIO_IOMMU_DIRTY_PAGES flags and header size (struct vfio_iommu_type1_dirty_bitmap). */
const VFIO_DIRTY_PAGES_FLAG_START = 1;
const VFIO_DIRTY_PAGES_FLAG_STOP = 2;
const VFIO_DIRTY_BITMAP_HDR_SZ = 8;

/** Deadlines: generous, the hosts are two cores shared by a dozen processes. */
const SEND_GRACE_MS = 60_000;
/** Calls in the switchover beyond the pages and the device state (pause, syncs, load, resume). */
const SWITCHOVER_CALLS = 6;

export interface EngineLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
}

export interface MigrationPlan {
  id: string;
  vm: string;
  sourceHost: string;
  destinationHost: string;
  params: migration.StartMigrationRequest;
  limits: MigrationLimits;
  dirtyReporting: migration.DirtyReporting;
}

export interface EngineDeps {
  peers: MigrationPeers;
  /** Every change of the status (persist, publish, notify watchers). Awaited in order. */
  onChange(status: migration.MigrationStatus): Promise<void> | void;
  logger?: EngineLogger;
  /** Epoch ms; injectable for tests. */
  now?: () => number;
  /** Span links of the root span (the StartMigration call that began it). */
  links?: Link[];
  /** Auto-converge's judging period; default QEMU's one second (tests shorten it). */
  throttlePeriodMs?: number;
  /**
   * The switchover's fixed cost (downtime less the final pages' transfer) measured by the
   * last completed migration of this VM to this destination, if any: a better predictor
   * than the setup's dry run, which cannot time the destination's load.
   */
  learnedFixedCostMs?: number;
  /** Reports this migration's measured fixed cost once it completed. */
  onFixedCost?(ms: number): void;
}

/** Thrown at a step boundary once a cancel was asked for. */
class Cancelled extends Error {
  override readonly name = "Cancelled";
}

/** A step failed: names the step, keeps the cause's message. */
class StepFailed extends Error {
  override readonly name = "StepFailed";
}

/** Why CancelMigration refused. */
export class CancelRefused extends Error {
  override readonly name = "CancelRefused";
}

function errMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function sameLayout(a: sidecar.VmLayout, b: sidecar.VmLayout): string | undefined {
  if (a.memoryBytes !== b.memoryBytes) return `memory ${b.memoryBytes} bytes, source has ${a.memoryBytes}`;
  if (a.pageSize !== b.pageSize) return `page size ${b.pageSize}, source has ${a.pageSize}`;
  if (a.reservedAddr !== b.reservedAddr || a.reservedBytes !== b.reservedBytes) return `reserved region 0x${b.reservedAddr.toString(16)}+${b.reservedBytes}, source has 0x${a.reservedAddr.toString(16)}+${a.reservedBytes}`;
  const key = (q: sidecar.QueueRegion) => `${q.device}/${q.index}`;
  const theirs = new Map(b.queues.map((q) => [key(q), q]));
  for (const q of a.queues) {
    const d = theirs.get(key(q));
    if (!d) return `queue ${key(q)} missing`;
    if (d.size !== q.size || d.descAddr !== q.descAddr || d.availAddr !== q.availAddr || d.usedAddr !== q.usedAddr) {
      return `queue ${key(q)} at desc 0x${d.descAddr.toString(16)} avail 0x${d.availAddr.toString(16)} used 0x${d.usedAddr.toString(16)} size ${d.size}, source has 0x${q.descAddr.toString(16)} 0x${q.availAddr.toString(16)} 0x${q.usedAddr.toString(16)} size ${q.size}`;
    }
  }
  if (b.queues.length !== a.queues.length) return `${b.queues.length} queues, source has ${a.queues.length}`;
  return undefined;
}

export class MigrationRun {
  readonly id: string;
  readonly vm: string;
  private readonly plan: MigrationPlan;
  private readonly deps: EngineDeps;
  private readonly now: () => number;
  private readonly c: MigrationCounters;
  private persisted: Promise<void> = Promise.resolve();
  private cancelRequested = false;
  /** Set once the destination's Resume was sent: from then on the VM is theirs. */
  private dstResuming = false;
  private finished: Promise<migration.MigrationStatus> | undefined;

  // What has been done on each side, so that a rollback undoes exactly that.
  private src!: SidecarCalls;
  private dst!: SidecarCalls;
  private srcGuest!: GuestCalls;
  private dstGuest!: GuestCalls;
  private dstVmCreated = false;
  private dirtyLogging = false;
  private vfioTracking = false;
  private bitmapStarted = false;
  private pauseSent = false;
  private saveRan = false;
  private throttleSet = false;

  // Pre-copy state.
  private skipBitmap: Buffer = Buffer.alloc(0);
  private pageSize = PAGE_SIZE;
  private bandwidth = 0;
  /** Device-state and switchover cost that does not depend on the link (ms). */
  private fixedSwitchoverMs = 0;
  private deviceStateEstimateBytes = 0;
  private autoConverge: AutoConverge | undefined;
  private lastSyncMono = 0;
  private sentSinceSync = 0;
  private t0 = 0;

  constructor(plan: MigrationPlan, deps: EngineDeps) {
    this.plan = plan;
    this.deps = deps;
    this.id = plan.id;
    this.vm = plan.vm;
    this.now = deps.now ?? Date.now;
    const t = this.now();
    this.c = {
      id: plan.id,
      vm: plan.vm,
      sourceHost: plan.sourceHost,
      destinationHost: plan.destinationHost,
      phase: P.MIGRATION_PHASE_SETUP,
      params: plan.params,
      downtimeLimitMs: plan.limits.downtimeLimitMs,
      startedAtMs: t,
      nowMs: t,
      setupMs: 0,
      memoryBytes: 0,
      dirtySyncCount: 0,
      rounds: [],
      remainingPages: 0,
      skippedPages: 0,
      throttlePct: 0,
      expectedDowntimeMs: 0,
      actualDowntimeMs: 0,
      deviceStateBytes: 0,
      deviceStateMs: 0,
      sourceChecksum: "",
      destinationChecksum: "",
      memoryMatch: false,
      error: "",
      traceId: "",
    };
  }

  status(): migration.MigrationStatus {
    this.c.nowMs = this.now();
    return migrationStatus(this.c);
  }

  get phase(): migration.MigrationPhase {
    return this.c.phase;
  }

  /**
   * CancelMigration: the current step finishes, then the source resumes and the
   * destination is aborted. Too late once the destination was told to resume.
   */
  requestCancel(): migration.MigrationStatus {
    if (this.c.phase === P.MIGRATION_PHASE_COMPLETED || this.dstResuming) {
      throw new CancelRefused(`migration ${this.id} ${this.c.phase === P.MIGRATION_PHASE_COMPLETED ? "has completed" : "is past the point of no return (the destination is resuming)"}`);
    }
    if (this.c.phase === P.MIGRATION_PHASE_FAILED || this.c.phase === P.MIGRATION_PHASE_CANCELLED) {
      throw new CancelRefused(`migration ${this.id} has already ended (${phaseName(this.c.phase)})`);
    }
    if (!this.cancelRequested) {
      this.cancelRequested = true;
      this.c.phase = P.MIGRATION_PHASE_CANCELLING;
      this.emit();
    }
    return this.status();
  }

  /** Runs the migration to a final phase. Never rejects. */
  run(): Promise<migration.MigrationStatus> {
    this.finished ??= this.runOnce();
    return this.finished;
  }

  /** Resolves when every status change so far has been handed to onChange. */
  flushed(): Promise<void> {
    return this.persisted;
  }

  private emit(): void {
    const s = this.status();
    this.persisted = this.persisted.then(
      () => this.deps.onChange(s),
      () => this.deps.onChange(s),
    ).catch((e: unknown) => this.deps.logger?.warn({ err: errMessage(e), migration: this.id }, "could not record the migration's status"));
  }

  private setPhase(p: migration.MigrationPhase): void {
    this.checkpoint();
    this.c.phase = p;
    this.emit();
  }

  /** A step boundary: a cancel asked for during the last step takes effect here. */
  private checkpoint(): void {
    if (this.cancelRequested) throw new Cancelled("cancelled");
  }

  private elapsedMs(): number {
    return performance.now() - this.t0;
  }

  /** Runs `fn` in a child span of the active one; a failure is recorded on it and rethrown. */
  private async span<T>(name: string, fn: (span: Span) => Promise<T>, attributes: Record<string, string | number | boolean> = {}): Promise<T> {
    return tracer().startActiveSpan(name, { attributes }, async (span) => {
      try {
        return await fn(span);
      } catch (e) {
        if (!(e instanceof Cancelled)) {
          span.recordException(e as Error);
          span.setStatus({ code: SpanStatusCode.ERROR, message: errMessage(e) });
        } else span.setAttribute("migration.cancelled", true);
        throw e;
      } finally {
        span.end();
      }
    });
  }

  /** A peer call named for the reason a failure gives. */
  private async call<T>(what: string, p: Promise<T>): Promise<T> {
    try {
      return await p;
    } catch (e) {
      throw new StepFailed(`${what}: ${errMessage(e)}`);
    }
  }

  private async runOnce(): Promise<migration.MigrationStatus> {
    const root = tracer().startSpan(`migration ${this.vm}`, {
      root: true,
      links: this.deps.links,
      attributes: {
        "migration.id": this.id,
        "migration.vm": this.vm,
        "migration.source_host": this.plan.sourceHost,
        "migration.destination_host": this.plan.destinationHost,
        "migration.downtime_limit_ms": this.plan.limits.downtimeLimitMs,
        "migration.bandwidth_bytes_per_s": this.plan.limits.bandwidthBytesPerS,
        "migration.auto_converge": this.plan.limits.autoConverge,
      },
    });
    const sc = root.spanContext();
    this.c.traceId = trace.isSpanContextValid(sc) ? sc.traceId : "";
    this.t0 = performance.now();
    this.emit();
    try {
      await context.with(trace.setSpan(context.active(), root), () => this.migrate());
      root.setAttribute("migration.phase", phaseName(this.c.phase));
    } catch (e) {
      const cancelled = e instanceof Cancelled;
      const reason = cancelled ? "cancelled by request" : errMessage(e);
      if (!cancelled) {
        root.recordException(e as Error);
        root.setStatus({ code: SpanStatusCode.ERROR, message: reason });
      }
      await context.with(trace.setSpan(context.active(), root), () => this.rollback(reason, cancelled));
      root.setAttribute("migration.phase", phaseName(this.c.phase));
      root.setAttribute("migration.error", this.c.error);
    } finally {
      root.setAttributes({
        "migration.downtime_ms": this.c.actualDowntimeMs,
        "migration.expected_downtime_ms": u32(this.c.expectedDowntimeMs),
        "migration.rounds": this.c.rounds.length,
        "migration.dirty_sync_count": this.c.dirtySyncCount,
      });
      root.end();
    }
    await this.persisted;
    return this.status();
  }

  /** The algorithm, top to bottom. */
  private async migrate(): Promise<void> {
    await this.span("setup", () => this.setup());
    this.setPhase(P.MIGRATION_PHASE_PRECOPY);
    await this.span("round 0", (s) => this.bulkRound(s), { "migration.round": 0 });
    await this.iterate();
    this.setPhase(P.MIGRATION_PHASE_STOP_AND_COPY);
    await this.span("stop-and-copy", () => this.stopAndCopy());
    await this.complete();
  }

  // --- setup ------------------------------------------------------------------------

  private async setup(): Promise<void> {
    const { vm, sourceHost: srcHost, destinationHost: dstHost } = this.plan;
    const peers = this.deps.peers;
    const t = performance.now();
    this.src = await this.call(`shm-sidecar@${srcHost}`, peers.sidecar(srcHost));
    this.dst = await this.call(`shm-sidecar@${dstHost}`, peers.sidecar(dstHost));
    this.srcGuest = await this.call(`guest-driver-${vm}@${srcHost}`, peers.guest(srcHost, vm));
    this.dstGuest = await this.call(`guest-driver-${vm}@${dstHost}`, peers.guest(dstHost, vm));

    // 1. The destination must be waiting for this VM.
    const rtt0 = performance.now();
    const incoming = await this.call(`GetState on guest-driver-${vm}@${dstHost}`, this.dstGuest.getState());
    const rttMs = performance.now() - rtt0;
    if (incoming.state !== guest.RunState.RUN_STATE_INCOMING) {
      throw new StepFailed(`guest-driver-${vm}@${dstHost} is ${guest.runStateToJSON(incoming.state)}, not RUN_STATE_INCOMING`);
    }
    this.checkpoint();

    // 2. Same layout on both sides: the rings' guest-physical addresses travel in the device state.
    const layout = await this.call(`DescribeVm(${vm}) on shm-sidecar@${srcHost}`, this.src.describeVm({ vm }));
    this.pageSize = layout.pageSize || PAGE_SIZE;
    this.c.memoryBytes = layout.memoryBytes;
    this.dstVmCreated = true; // set before the call: a timeout may still have created it
    const dstLayout = await this.call(
      `CreateVm(${vm}, incoming) on shm-sidecar@${dstHost}`,
      this.dst.createVm({ vm, memoryBytes: layout.memoryBytes, queues: layout.queues.map((q) => ({ device: q.device, index: q.index, size: q.size })), incoming: true }),
    );
    const diff = sameLayout(layout, dstLayout);
    if (diff) throw new StepFailed(`the destination's layout differs: ${diff}`);
    this.checkpoint();

    // 3. Dirty logging at every source: vCPU log, device log (VHOST_F_LOG_ALL through the
    //    sidecar's event), and the VFIO container when it has mappings (seed 004).
    this.dirtyLogging = true;
    await this.call(`SetDirtyLogging(${vm}, on) on shm-sidecar@${srcHost}`, this.src.setDirtyLogging({ vm, enabled: true }));
    const iommu = await this.call(`IommuInfo(${vm}) on shm-sidecar@${srcHost}`, this.src.iommuInfo({ vm }));
    if (iommu.mappings > 0) {
      this.vfioTracking = true;
      await this.call(
        `DirtyPages(${vm}, START) on shm-sidecar@${srcHost}`,
        this.src.dirtyPages({ vm, argsz: VFIO_DIRTY_BITMAP_HDR_SZ, flags: VFIO_DIRTY_PAGES_FLAG_START, iova: 0, size: 0, pgsize: 0, bitmapSize: 0, reportMode: 0 }),
      );
    }
    this.checkpoint();

    // 4. Pages never to send: ballooned (the balloon-host's bitmap) and free-hinted (the
    //    guest allocator's free pages, virtio-balloon free page hinting).
    const pages = Math.floor(layout.memoryBytes / this.pageSize);
    const skips: Uint8Array[] = [];
    if (this.plan.params.skipBallooned) {
      const b = await this.call(`balloon-host@${srcHost}`, peers.balloon(srcHost));
      const r = await this.call(`GetBalloonedPages(${vm}) on balloon-host@${srcHost}`, b.getBalloonedPages({ vm }));
      skips.push(r.bitmap);
    }
    if (this.plan.params.freePageHinting) {
      const r = await this.call(`GetFreePageHint on guest-driver-${vm}@${srcHost}`, this.srcGuest.getFreePageHint());
      skips.push(r.bitmap);
    }
    const skip = skips.length ? bitmapOr(pages, ...skips) : new Uint8Array();
    this.skipBitmap = Buffer.from(skip.buffer, skip.byteOffset, skip.byteLength);
    this.bitmapStarted = true;
    const bm = await this.call(`StartMigrationBitmap(${vm}) on shm-sidecar@${srcHost}`, this.src.startMigrationBitmap({ vm, skipBitmap: this.skipBitmap }));
    this.c.skippedPages = bm.skipped || popcount(this.skipBitmap, pages);
    this.c.remainingPages = bm.dirty;
    this.checkpoint();

    // 5. The fixed cost of the switchover, measured: a dry-run save of the device state
    //    (its load is taken to cost the same), the memory checksum both sides compute,
    //    and the calls' round trips.
    const est = await this.call(`SaveState(dry run) on guest-driver-${vm}@${srcHost}`, this.srcGuest.saveState({ dryRun: true }));
    const saveMs = est.saveUs / 1000;
    const ck0 = performance.now();
    await this.call(`ChecksumMemory(${vm}) on shm-sidecar@${srcHost}`, this.src.checksumMemory({ vm, excludeBitmap: this.skipBitmap }));
    const checksumMs = performance.now() - ck0;
    this.deviceStateEstimateBytes = est.state.length;
    const dryRunMs = 2 * saveMs + checksumMs + SWITCHOVER_CALLS * rttMs;
    this.fixedSwitchoverMs = this.deps.learnedFixedCostMs !== undefined ? Math.max(dryRunMs, this.deps.learnedFixedCostMs) : dryRunMs;
    trace.getActiveSpan()?.setAttributes({
      "migration.memory_bytes": layout.memoryBytes,
      "migration.skipped_pages": this.c.skippedPages,
      "migration.vfio_mappings": iommu.mappings,
      "migration.device_state_estimate_bytes": est.state.length,
      "migration.device_state_save_ms": saveMs,
      "migration.switchover_fixed_ms": this.fixedSwitchoverMs,
      "migration.switchover_fixed_source": this.deps.learnedFixedCostMs !== undefined ? "learned from the last migration" : "dry run",
      "migration.checksum_ms": checksumMs,
    });
    this.c.setupMs = Math.round(performance.now() - t);
    if (this.plan.limits.autoConverge) {
      this.autoConverge = new AutoConverge({
        initialPct: this.plan.limits.throttleInitialPct,
        incrementPct: this.plan.limits.throttleIncrementPct,
        maxPct: this.plan.limits.throttleMaxPct,
        periodMs: this.deps.throttlePeriodMs,
      });
      this.autoConverge.start(performance.now());
    }
    this.emit();
  }

  /** The device state's share of the downtime at the current bandwidth. */
  private deviceStateMs(): number {
    const transfer = this.bandwidth > 0 ? (this.deviceStateEstimateBytes * 1000) / this.bandwidth : 0;
    return this.fixedSwitchoverMs + transfer;
  }

  // --- pre-copy -----------------------------------------------------------------------

  /** Sends every page set in the migration bitmap and records it in `round`. */
  private async send(round: migration.PrecopyRound, span: Span): Promise<void> {
    const { vm, destinationHost } = this.plan;
    const left = Math.max(0, this.plan.limits.maxTotalMs - this.elapsedMs());
    const t = performance.now();
    const r = await this.call(
      `SendDirty(${vm}, round ${round.round}) on shm-sidecar@${this.plan.sourceHost}`,
      this.src.sendDirty({ vm, destinationHost, round: round.round, bandwidthBytesPerS: this.plan.limits.bandwidthBytesPerS, batchPages: 0 }, left + SEND_GRACE_MS),
    );
    const ms = performance.now() - t;
    round.pages += r.pages;
    round.zeroPages += r.zeroPages;
    round.bytes += r.bytes;
    round.durationMs += Math.round(ms);
    // Bandwidth is measured on the stream; a round of zero pages only says how fast
    // pages go, so it counts their page size rather than the flags on the wire.
    const elapsedUs = r.elapsedUs || ms * 1000;
    // A round of a few data pages among many zero ones (an idle guest's bulk round) says
    // little about the link: its time is the zero flags'. Take the data rate from rounds
    // that carried enough data, and until one did, the page rate.
    if (r.bytes >= BANDWIDTH_SAMPLE_BYTES) this.bandwidth = measuredBandwidth(r.bytes, elapsedUs);
    else if (this.bandwidth === 0 && r.pages >= 1) this.bandwidth = measuredBandwidth(r.pages * this.pageSize, elapsedUs);
    round.bandwidthBytesPerS = this.bandwidth;
    round.throttlePct = this.c.throttlePct;
    this.sentSinceSync += r.bytes;
    this.c.remainingPages = Math.max(0, this.c.remainingPages - r.pages);
    span.setAttributes({
      "migration.pages": r.pages,
      "migration.zero_pages": r.zeroPages,
      "migration.bytes": r.bytes,
      "migration.bandwidth_bytes_per_s": this.bandwidth,
    });
  }

  /** Round 0: every page not skipped (ram_save_iterate over a fully set bitmap). */
  private async bulkRound(span: Span): Promise<void> {
    const round = emptyRound(0);
    this.c.rounds.push(round);
    this.lastSyncMono = performance.now();
    await this.send(round, span);
    this.emit();
  }

  /** migration_bitmap_sync: fetch-and-clear each log into the migration bitmap. */
  private async sync(round: migration.PrecopyRound, final: boolean, span: Span): Promise<sidecar.SyncDirtyResponse> {
    const vm = this.vm;
    // Pinned VFIO pages: every sync in pre-copy reporting; only at the final one in
    // stop-only reporting (the seed thread's downtime underestimate).
    let vfioReport = sidecar.DirtyReport.DIRTY_REPORT_UNSPECIFIED;
    if (this.vfioTracking) {
      vfioReport =
        final || this.plan.dirtyReporting !== migration.DirtyReporting.DIRTY_REPORTING_STOP_ONLY
          ? sidecar.DirtyReport.DIRTY_REPORT_ALL
          : sidecar.DirtyReport.DIRTY_REPORT_UNPINNED;
    }
    const r = await this.call(`SyncDirty(${vm}) on shm-sidecar@${this.plan.sourceHost}`, this.src.syncDirty({ vm, vcpuLog: true, deviceLog: true, vfioReport }));
    const now = performance.now();
    const periodMs = now - this.lastSyncMono;
    this.lastSyncMono = now;
    this.c.dirtySyncCount++;
    this.c.remainingPages = r.remaining;
    round.dirtyVcpu += r.dirtyVcpu;
    round.dirtyDevice += r.dirtyDevice;
    round.dirtyVfio += r.dirtyVfio;
    if (!final) round.dirtyRateBytesPerS = dirtyRate(r.newDirty, periodMs, this.pageSize);
    span.setAttributes({
      "migration.dirty_vcpu": r.dirtyVcpu,
      "migration.dirty_device": r.dirtyDevice,
      "migration.dirty_vfio": r.dirtyVfio,
      "migration.new_dirty": r.newDirty,
      "migration.remaining_pages": r.remaining,
      "migration.dirty_rate_bytes_per_s": round.dirtyRateBytesPerS,
    });
    return r;
  }

  /** Auto-converge: throttle the source's vCPUs when the guest outruns the link. */
  private async throttle(newDirtyPages: number, span: Span): Promise<void> {
    const ac = this.autoConverge;
    const sent = this.sentSinceSync;
    this.sentSinceSync = 0;
    if (!ac) return;
    const d = ac.onSync(performance.now(), newDirtyPages * this.pageSize, sent);
    if (!d.changed) return;
    this.throttleSet = true;
    await this.call(`SetThrottle(${d.pct}) on guest-driver-${this.vm}@${this.plan.sourceHost}`, this.srcGuest.setThrottle({ pct: d.pct }));
    this.c.throttlePct = d.pct;
    span.setAttribute("migration.throttle_pct", d.pct);
    span.addEvent("throttle", { pct: d.pct, bytes_dirtied_period: d.bytesDirtiedPeriod, bytes_transferred_period: d.bytesTransferredPeriod });
  }

  /** Rounds 1..N: sync, decide, send, until the rest fits in the downtime limit. */
  private async iterate(): Promise<void> {
    for (let n = 1; ; n++) {
      this.checkpoint();
      const switchover = await this.span(`round ${n}`, (span) => this.precopyRound(n, span), { "migration.round": n });
      if (switchover) return;
    }
  }

  /** One pre-copy round; true when it decided to switch over (nothing sent then). */
  private async precopyRound(n: number, span: Span): Promise<boolean> {
    const round = emptyRound(n);
    const r = await this.sync(round, false, span);
    await this.throttle(r.newDirty, span);
    const expected = expectedDowntimeMs(r.remaining, this.bandwidth, this.deviceStateMs(), this.pageSize);
    round.expectedDowntimeMs = u32(expected);
    round.throttlePct = this.c.throttlePct;
    this.c.expectedDowntimeMs = expected;
    this.c.rounds.push(round);
    span.setAttribute("migration.expected_downtime_ms", round.expectedDowntimeMs);
    // Pre-copy rounds lower only the memory part of the estimate. When the switchover's
    // fixed cost alone is over the limit, no round can meet it: go once the memory part
    // is within the limit (or nothing is left to send); the report shows the downtime
    // against the limit.
    const fixedMs = this.deviceStateMs();
    const memoryMs = Math.max(0, expected - fixedMs);
    const limit = this.plan.limits.downtimeLimitMs;
    const reason = shouldSwitchover(expected, limit)
      ? "expected downtime within the limit"
      : r.remaining === 0
        ? "nothing left to send"
        : fixedMs > limit && memoryMs <= limit
          ? `the switchover's fixed cost (${Math.round(fixedMs)} ms) alone is over the limit; the memory part is within it`
          : "";
    if (reason) {
      span.setAttribute("migration.switchover", true);
      span.setAttribute("migration.switchover_reason", reason);
      this.emit();
      return true;
    }
    if (pastMaxTotal(this.elapsedMs(), this.plan.limits.maxTotalMs)) {
      this.emit();
      throw new StepFailed(
        `did not converge within max_total_ms ${this.plan.limits.maxTotalMs}: ${r.remaining} pages (${r.remaining * this.pageSize} bytes) still dirty, ` +
          `expected downtime ${Number.isFinite(expected) ? Math.round(expected) : "unbounded"} ms > limit ${this.plan.limits.downtimeLimitMs} ms` +
          (this.c.throttlePct ? `, throttle ${this.c.throttlePct} %` : this.plan.limits.autoConverge ? "" : " (auto-converge off)"),
      );
    }
    this.emit();
    this.checkpoint();
    await this.send(round, span);
    this.emit();
    return false;
  }

  // --- stop-and-copy ------------------------------------------------------------------

  private async stopAndCopy(): Promise<void> {
    const { vm, sourceHost: srcHost, destinationHost: dstHost } = this.plan;
    // The round that decided the switchover is the final one: its pages go now, with
    // whatever the final sync adds.
    const round = this.c.rounds[this.c.rounds.length - 1]!;
    let tPause = 0;
    await this.span("pause", async () => {
      this.pauseSent = true;
      tPause = performance.now();
      await this.call(`Pause on guest-driver-${vm}@${srcHost}`, this.srcGuest.pause());
    });
    this.checkpoint();
    const state = await this.span("save", async (span) => {
      this.saveRan = true;
      const s = await this.call(`SaveState on guest-driver-${vm}@${srcHost}`, this.srcGuest.saveState({ dryRun: false }));
      span.setAttributes({ "migration.device_state_bytes": s.state.length, "migration.save_us": s.saveUs, "migration.fio_run": s.fioRun });
      return s;
    });
    this.c.deviceStateBytes = state.state.length;
    this.checkpoint();
    await this.span("final sync", (span) => this.sync(round, true, span));
    this.checkpoint();
    const send0 = performance.now();
    await this.span("send", (span) => this.send(round, span), { "migration.round": round.round });
    const finalSendMs = performance.now() - send0;
    this.emit();
    this.checkpoint();
    await this.span("checksum", async (span) => {
      const [a, b] = await Promise.all([
        this.call(`ChecksumMemory(${vm}) on shm-sidecar@${srcHost}`, this.src.checksumMemory({ vm, excludeBitmap: this.skipBitmap })),
        this.call(`ChecksumMemory(${vm}) on shm-sidecar@${dstHost}`, this.dst.checksumMemory({ vm, excludeBitmap: this.skipBitmap })),
      ]);
      this.c.sourceChecksum = a.digest;
      this.c.destinationChecksum = b.digest;
      this.c.memoryMatch = a.digest === b.digest && a.pages === b.pages;
      span.setAttributes({ "migration.source_checksum": a.digest, "migration.destination_checksum": b.digest, "migration.memory_match": this.c.memoryMatch, "migration.pages": a.pages });
      if (!this.c.memoryMatch) {
        throw new StepFailed(`guest memory differs after the final round: source digest ${a.digest} over ${a.pages} pages, destination ${b.digest} over ${b.pages} pages`);
      }
    });
    this.checkpoint();
    const loadMs = await this.span("load", async () => {
      const t = performance.now();
      await this.call(`LoadState on guest-driver-${vm}@${dstHost}`, this.dstGuest.loadState({ state: state.state, sourceHost: srcHost }));
      return performance.now() - t;
    });
    this.c.deviceStateMs = Math.round(state.saveUs / 1000 + loadMs);
    this.checkpoint();
    await this.span("resume", async (span) => {
      this.dstResuming = true;
      try {
        await this.call(`Resume on guest-driver-${vm}@${dstHost}`, this.dstGuest.resume());
      } catch (e) {
        // An answer lost is not a resume that failed: ask before rolling back, or the
        // VM would run on both hosts.
        const st = await this.dstGuest.getState().catch(() => undefined);
        if (st?.state !== guest.RunState.RUN_STATE_RUNNING) {
          this.dstResuming = false;
          throw e;
        }
        span.addEvent("resume answer lost; the destination reports RUNNING");
      }
      this.c.actualDowntimeMs = Math.round(performance.now() - tPause);
      span.setAttribute("migration.downtime_ms", this.c.actualDowntimeMs);
      // What the switchover cost besides the final pages: the next estimate's fixed part.
      this.deps.onFixedCost?.(Math.max(0, this.c.actualDowntimeMs - finalSendMs));
    });
  }

  /** After the destination resumed: the source lets go of the VM. Failures here are logged, not fatal. */
  private async complete(): Promise<void> {
    const { vm, sourceHost: srcHost, destinationHost: dstHost } = this.plan;
    await this.span("complete", async (span) => {
      const notes: string[] = [];
      // QEMU stops throttling when the migration ends (cpu_throttle_stop); the destination
      // must not inherit the source's throttle with the vCPU workloads.
      if (this.throttleSet) {
        await this.dstGuest.setThrottle({ pct: 0 }).catch((e: unknown) => notes.push(`SetThrottle(0) on ${dstHost}: ${errMessage(e)}`));
      }
      try {
        await this.srcGuest.release({ destinationHost: dstHost });
      } catch (e) {
        notes.push(`Release on guest-driver-${vm}@${srcHost}: ${errMessage(e)}`);
        await this.stopSourceLogging(notes);
      }
      for (const n of notes) span.addEvent("cleanup failed", { note: n });
      if (notes.length) this.deps.logger?.warn({ migration: this.id, notes }, "the migration completed; the source did not clean up fully");
    });
    this.c.phase = P.MIGRATION_PHASE_COMPLETED;
    this.c.endedAtMs = this.now();
    this.emit();
  }

  // --- failure ------------------------------------------------------------------------

  private async stopSourceLogging(notes: string[]): Promise<void> {
    const vm = this.vm;
    const host = this.plan.sourceHost;
    if (!this.src) return;
    if (this.bitmapStarted) await this.src.stopMigrationBitmap({ vm }).catch((e: unknown) => notes.push(`StopMigrationBitmap on ${host}: ${errMessage(e)}`));
    if (this.vfioTracking) {
      await this.src
        .dirtyPages({ vm, argsz: VFIO_DIRTY_BITMAP_HDR_SZ, flags: VFIO_DIRTY_PAGES_FLAG_STOP, iova: 0, size: 0, pgsize: 0, bitmapSize: 0, reportMode: 0 })
        .catch((e: unknown) => notes.push(`DirtyPages STOP on ${host}: ${errMessage(e)}`));
    }
    if (this.dirtyLogging) await this.src.setDirtyLogging({ vm, enabled: false }).catch((e: unknown) => notes.push(`SetDirtyLogging off on ${host}: ${errMessage(e)}`));
  }

  /**
   * Undo what was done, source guest first: it runs again (its devices restarted by the
   * guest-driver if SaveState had stopped them), its throttle is lifted, dirty logging
   * stops, and the destination drops what it received.
   */
  private async rollback(reason: string, cancelled: boolean): Promise<void> {
    const { vm, sourceHost: srcHost, destinationHost: dstHost } = this.plan;
    const notes: string[] = [];
    await this.span("rollback", async (span) => {
      span.setAttributes({ "migration.reason": reason, "migration.cancelled": cancelled });
      if (this.srcGuest) {
        if (this.pauseSent || this.saveRan) {
          const st = await this.srcGuest.getState().catch(() => undefined);
          if (st?.state !== guest.RunState.RUN_STATE_RUNNING) {
            await this.srcGuest.resume().catch((e: unknown) => notes.push(`Resume on guest-driver-${vm}@${srcHost}: ${errMessage(e)}`));
          }
        }
        if (this.throttleSet) await this.srcGuest.setThrottle({ pct: 0 }).catch((e: unknown) => notes.push(`SetThrottle(0) on ${srcHost}: ${errMessage(e)}`));
      }
      await this.stopSourceLogging(notes);
      if (this.dstGuest && this.dstVmCreated) {
        try {
          await this.dstGuest.abortIncoming();
        } catch (e) {
          notes.push(`AbortIncoming on guest-driver-${vm}@${dstHost}: ${errMessage(e)}`);
          // The incoming guest-driver is gone or stuck: free the VM on its sidecar directly.
          if (this.dst) await this.dst.destroyVm({ vm }).catch((e2: unknown) => notes.push(`DestroyVm on ${dstHost}: ${errMessage(e2)}`));
        }
      }
      for (const n of notes) span.addEvent("cleanup failed", { note: n });
    });
    this.c.throttlePct = 0;
    this.c.phase = cancelled ? P.MIGRATION_PHASE_CANCELLED : P.MIGRATION_PHASE_FAILED;
    this.c.error = notes.length ? `${reason} (cleanup: ${notes.join("; ")})` : reason;
    this.c.endedAtMs = this.now();
    this.deps.logger?.warn({ migration: this.id, phase: phaseName(this.c.phase), error: this.c.error }, "migration did not complete");
    this.emit();
  }
}
