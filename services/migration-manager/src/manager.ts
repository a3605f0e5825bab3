// MigrationService's logic, transport-free: validation, one migration per VM, the record
// of every migration (a store: JetStream KV in production), watchers, cancel, and the
// recovery of migrations a previous manager left unfinished (issue 12: the manager killed
// mid-migration must never leave the guest paused).
import { status as Status } from "@grpc/grpc-js";
import { context, trace, type Link } from "@opentelemetry/api";
import { ConfigError, checkName } from "@virtmesh/config";
import { guest, migration } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { MigrationLimitError, isFinalPhase, phaseName, resolveLimits, type MigrationLimits } from "@virtmesh/migration";
import { CancelRefused, MigrationRun, type EngineLogger } from "./engine";
import type { MigrationPeers } from "./peers";

const P = migration.MigrationPhase;

/** Where migration records live (KV bucket `virtmesh-migrations` in production). */
export interface MigrationStore {
  put(status: migration.MigrationStatus): Promise<void>;
  get(id: string): Promise<migration.MigrationStatus | undefined>;
  list(): Promise<migration.MigrationStatus[]>;
}

/** The registry facts validation needs. */
export interface ClusterView {
  /** The host the registry places `vm` on (`vm.<vm>`), if any. */
  vmHost(vm: string): Promise<string | undefined>;
  /** Hosts whose shm-sidecar is registered. */
  hosts(): Promise<string[]>;
  registered(host: string, instance: string): Promise<boolean>;
}

export interface ManagerDeps {
  peers: MigrationPeers;
  store: MigrationStore;
  cluster: ClusterView;
  /** Publishes one status change (NATS `virtmesh.vm.<vm>.migration`). */
  publish(status: migration.MigrationStatus): void;
  logger?: EngineLogger;
  now?: () => number;
  /** Passed to each engine (tests shorten auto-converge's one-second period). */
  throttlePeriodMs?: number;
}

type Listener = (s: migration.MigrationStatus) => void;

function invalid(msg: string): GrpcError {
  return new GrpcError(Status.INVALID_ARGUMENT, msg);
}

export class MigrationManager {
  private readonly runs = new Map<string, MigrationRun>();
  /** Per VM and destination host: the switchover's fixed cost the last completed migration measured (the estimate learns it). */
  private readonly fixedCost = new Map<string, number>();
  /** vm -> id of its migration in progress (also held while a recovery cleans up). */
  private readonly activeByVm = new Map<string, string>();
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly latest = new Map<string, migration.MigrationStatus>();

  constructor(private readonly deps: ManagerDeps) {}

  private async record(s: migration.MigrationStatus): Promise<void> {
    this.latest.set(s.id, s);
    for (const l of this.listeners.get(s.id) ?? []) l(s);
    try {
      this.deps.publish(s);
    } catch (e) {
      this.deps.logger?.warn({ err: (e as Error).message, migration: s.id }, "could not publish the migration's status");
    }
    await this.deps.store.put(s);
  }

  /** Validates, records the migration in SETUP and runs it in the background. */
  async start(req: migration.StartMigrationRequest, links: Link[] = []): Promise<migration.MigrationStatus> {
    let vm: string;
    let dstHost: string;
    try {
      vm = checkName("vm", req.vm);
      dstHost = checkName("destination_host", req.destinationHost);
      if (req.sourceHost) checkName("source_host", req.sourceHost);
    } catch (e) {
      if (e instanceof ConfigError) throw invalid(e.message);
      throw e;
    }
    let limits: MigrationLimits;
    try {
      limits = resolveLimits(req);
    } catch (e) {
      if (e instanceof MigrationLimitError) throw invalid(e.message);
      throw e;
    }
    const R = migration.DirtyReporting;
    let dirtyReporting = req.dirtyReporting;
    if (dirtyReporting === R.DIRTY_REPORTING_UNSPECIFIED) dirtyReporting = R.DIRTY_REPORTING_PRECOPY;
    if (dirtyReporting !== R.DIRTY_REPORTING_PRECOPY && dirtyReporting !== R.DIRTY_REPORTING_STOP_ONLY) throw invalid(`dirty_reporting ${String(req.dirtyReporting)} is not PRECOPY or STOP_ONLY`);

    const busy = this.activeByVm.get(vm);
    if (busy) throw new GrpcError(Status.ALREADY_EXISTS, `vm '${vm}' is already migrating (${busy}, ${phaseName(this.latest.get(busy)?.phase ?? P.MIGRATION_PHASE_SETUP)})`);
    // Claimed before the first await: two concurrent starts for one VM cannot both pass.
    const claim = `pending-${Math.random().toString(36).slice(2)}`;
    this.activeByVm.set(vm, claim);
    try {
      const placed = await this.deps.cluster.vmHost(vm);
      if (!placed) throw new GrpcError(Status.NOT_FOUND, `vm '${vm}' is not placed on any host (no registry entry vm.${vm})`);
      const srcHost = req.sourceHost || placed;
      if (srcHost !== placed) throw new GrpcError(Status.FAILED_PRECONDITION, `vm '${vm}' runs on ${placed}, not on source_host ${srcHost}`);
      if (dstHost === srcHost) throw invalid(`destination_host ${dstHost} is the source host`);
      const hosts = await this.deps.cluster.hosts();
      for (const h of [srcHost, dstHost]) {
        if (!hosts.includes(h)) throw new GrpcError(Status.NOT_FOUND, `unknown host '${h}': no shm-sidecar has registered it (known hosts: ${hosts.join(", ") || "none"})`);
      }
      const inst = `guest-driver-${vm}`;
      if (!(await this.deps.cluster.registered(srcHost, inst))) throw new GrpcError(Status.FAILED_PRECONDITION, `${inst} is not registered on ${srcHost}`);
      if (!(await this.deps.cluster.registered(dstHost, inst))) {
        throw new GrpcError(Status.FAILED_PRECONDITION, `${inst} is not registered on ${dstHost}: the destination needs a guest-driver started with VIRTMESH_INCOMING=1`);
      }
      const [srcState, dstState] = await Promise.all([
        this.deps.peers.guest(srcHost, vm).then((g) => g.getState()),
        this.deps.peers.guest(dstHost, vm).then((g) => g.getState()),
      ]).catch((e: unknown) => {
        throw new GrpcError(Status.UNAVAILABLE, `cannot ask the guest-drivers for their state: ${(e as Error).message}`);
      });
      if (srcState.state !== guest.RunState.RUN_STATE_RUNNING) {
        throw new GrpcError(Status.FAILED_PRECONDITION, `${inst}@${srcHost} is ${guest.runStateToJSON(srcState.state)}, not RUN_STATE_RUNNING`);
      }
      if (dstState.state !== guest.RunState.RUN_STATE_INCOMING) {
        throw new GrpcError(Status.FAILED_PRECONDITION, `${inst}@${dstHost} is ${guest.runStateToJSON(dstState.state)}, not RUN_STATE_INCOMING`);
      }

      const id = await this.nextId(vm);
      const params: migration.StartMigrationRequest = { ...req, sourceHost: srcHost, dirtyReporting };
      const run = new MigrationRun(
        { id, vm, sourceHost: srcHost, destinationHost: dstHost, params, limits, dirtyReporting },
        {
          peers: this.deps.peers,
          onChange: (s) => this.record(s),
          logger: this.deps.logger,
          now: this.deps.now,
          links,
          throttlePeriodMs: this.deps.throttlePeriodMs,
          learnedFixedCostMs: this.fixedCost.get(`${vm}>${dstHost}`),
          onFixedCost: (ms) => this.fixedCost.set(`${vm}>${dstHost}`, ms),
        },
      );
      this.runs.set(id, run);
      this.activeByVm.set(vm, id);
      const first = run.status();
      await this.record(first);
      // Out of the caller's context: the migration's root span is a root, linked to the call.
      void context.with(trace.deleteSpan(context.active()), () => run.run()).finally(() => {
        if (this.activeByVm.get(vm) === id) this.activeByVm.delete(vm);
      });
      return first;
    } catch (e) {
      if (this.activeByVm.get(vm) === claim) this.activeByVm.delete(vm);
      throw e;
    }
  }

  /** `<vm>-<n>`, n one past the highest recorded for the VM (a valid NATS KV key). */
  private async nextId(vm: string): Promise<string> {
    let n = 0;
    const re = new RegExp(`^${vm}-(\\d+)$`);
    for (const s of await this.deps.store.list()) {
      const m = re.exec(s.id);
      if (m) n = Math.max(n, Number(m[1]));
    }
    for (const id of this.runs.keys()) {
      const m = re.exec(id);
      if (m) n = Math.max(n, Number(m[1]));
    }
    return `${vm}-${n + 1}`;
  }

  async get(id: string): Promise<migration.MigrationStatus> {
    const run = this.runs.get(id);
    if (run) return this.latest.get(id) ?? run.status();
    const s = this.latest.get(id) ?? (await this.deps.store.get(id));
    if (!s) throw new GrpcError(Status.NOT_FOUND, `no migration '${id}'`);
    return s;
  }

  async cancel(id: string): Promise<migration.MigrationStatus> {
    const run = this.runs.get(id);
    if (!run) {
      const s = await this.get(id);
      throw new GrpcError(Status.FAILED_PRECONDITION, `migration ${id} has ${isFinalPhase(s.phase) ? `already ended (${phaseName(s.phase)})` : "no engine in this manager (it is being recovered)"}`);
    }
    try {
      return run.requestCancel();
    } catch (e) {
      if (e instanceof CancelRefused) throw new GrpcError(Status.FAILED_PRECONDITION, e.message);
      throw e;
    }
  }

  async list(): Promise<migration.MigrationStatus[]> {
    const byId = new Map((await this.deps.store.list()).map((s) => [s.id, s]));
    for (const [id, s] of this.latest) byId.set(id, s);
    return [...byId.values()].sort((a, b) => a.startedAtMs - b.startedAtMs || a.id.localeCompare(b.id));
  }

  /**
   * Calls `onStatus` with the current status and then every change, until a final
   * phase (inclusive). Returns an unsubscribe function.
   */
  async watch(id: string, onStatus: (s: migration.MigrationStatus, final: boolean) => void): Promise<() => void> {
    const current = await this.get(id);
    if (isFinalPhase(current.phase)) {
      onStatus(current, true);
      return () => {};
    }
    let set = this.listeners.get(id);
    if (!set) this.listeners.set(id, (set = new Set()));
    const l: Listener = (s) => {
      const final = isFinalPhase(s.phase);
      onStatus(s, final);
      if (final) set.delete(l);
    };
    set.add(l);
    // A change between get() and subscribing would be missed: send the latest now.
    const now = this.latest.get(id) ?? current;
    onStatus(now, isFinalPhase(now.phase));
    if (isFinalPhase(now.phase)) set.delete(l);
    return () => set.delete(l);
  }

  /** Migrations in progress here. */
  active(): MigrationRun[] {
    return [...this.runs.values()].filter((r) => !isFinalPhase(r.phase));
  }

  /** Shutdown: cancel what runs and wait (bounded) for the rollbacks. */
  async stopAll(timeoutMs: number): Promise<void> {
    const runs = this.active();
    for (const r of runs) {
      try {
        r.requestCancel();
      } catch {
        /* past the point of no return: let it complete */
      }
    }
    await Promise.race([Promise.all(runs.map((r) => r.run())), new Promise((res) => setTimeout(res, timeoutMs).unref())]);
  }

  /**
   * Start-up: every migration recorded in a non-final phase belonged to a manager that
   * died. If the destination already runs the VM the migration completed (the source is
   * released); otherwise it is failed: the source resumed and its logging stopped, the
   * destination aborted. The VMs stay claimed until their cleanup is done.
   */
  async recover(): Promise<{ stale: string[]; done: Promise<void> }> {
    const stale = (await this.deps.store.list()).filter((s) => !isFinalPhase(s.phase));
    for (const s of stale) this.activeByVm.set(s.vm, s.id);
    return { stale: stale.map((s) => s.id), done: Promise.all(stale.map((s) => this.recoverOne(s))).then(() => undefined) };
  }

  private async recoverOne(s: migration.MigrationStatus): Promise<void> {
    const span = trace.getTracer("virtmesh.migration-manager").startSpan(`recover migration ${s.vm}`, {
      root: true,
      attributes: { "migration.id": s.id, "migration.vm": s.vm, "migration.trace_id": s.traceId, "migration.phase": phaseName(s.phase) },
    });
    const notes: string[] = [];
    const note = (what: string) => (e: unknown) => {
      notes.push(`${what}: ${(e as Error).message}`);
    };
    const vm = s.vm;
    try {
      const dstGuest = await this.deps.peers.guest(s.destinationHost, vm).catch(note(`guest-driver-${vm}@${s.destinationHost}`));
      const srcGuest = await this.deps.peers.guest(s.sourceHost, vm).catch(note(`guest-driver-${vm}@${s.sourceHost}`));
      const dstState = dstGuest ? await dstGuest.getState().catch(() => undefined) : undefined;
      const placed = await this.deps.cluster.vmHost(vm).catch(() => undefined);
      const now = this.deps.now?.() ?? Date.now();
      if (s.phase === P.MIGRATION_PHASE_STOP_AND_COPY && dstState?.state === guest.RunState.RUN_STATE_RUNNING && placed === s.destinationHost) {
        // The destination resumed before the manager died: the VM is there now.
        if (srcGuest) await srcGuest.release({ destinationHost: s.destinationHost }).catch(note(`Release on ${s.sourceHost}`));
        await this.record({ ...s, phase: P.MIGRATION_PHASE_COMPLETED, throttlePct: 0, updatedAtMs: now, totalMs: now - s.startedAtMs, error: notes.length ? `completed; recovered after a manager restart (cleanup: ${notes.join("; ")})` : "" });
        return;
      }
      if (srcGuest) {
        const st = await srcGuest.getState().catch(() => undefined);
        if (st?.state === guest.RunState.RUN_STATE_PAUSED) await srcGuest.resume().catch(note(`Resume on ${s.sourceHost}`));
        if (s.throttlePct > 0 || s.params?.autoConverge) await srcGuest.setThrottle({ pct: 0 }).catch(note(`SetThrottle(0) on ${s.sourceHost}`));
      }
      const src = await this.deps.peers.sidecar(s.sourceHost).catch(note(`shm-sidecar@${s.sourceHost}`));
      if (src) {
        // Each may not have been started; a refusal for that reason is not a failure.
        await src.stopMigrationBitmap({ vm }).catch(() => undefined);
        await src.dirtyPages({ vm, argsz: 8, flags: 2, iova: 0, size: 0, pgsize: 0, bitmapSize: 0, reportMode: 0 }).catch(() => undefined);
        await src.setDirtyLogging({ vm, enabled: false }).catch(note(`SetDirtyLogging off on ${s.sourceHost}`));
      }
      // AbortIncoming also when the guest-driver still says INCOMING: the manager may have
      // created the VM on its sidecar (CreateVm incoming) before dying.
      if (dstGuest) {
        await dstGuest.abortIncoming().catch(async (e: unknown) => {
          note(`AbortIncoming on ${s.destinationHost}`)(e);
          const dst = await this.deps.peers.sidecar(s.destinationHost).catch(() => undefined);
          await dst?.destroyVm({ vm }).catch(note(`DestroyVm on ${s.destinationHost}`));
        });
      } else {
        const dst = await this.deps.peers.sidecar(s.destinationHost).catch(() => undefined);
        await dst?.destroyVm({ vm }).catch(note(`DestroyVm on ${s.destinationHost}`));
      }
      const cancelled = s.phase === P.MIGRATION_PHASE_CANCELLING;
      const reason = `the migration-manager restarted during ${phaseName(s.phase)}`;
      await this.record({
        ...s,
        phase: cancelled ? P.MIGRATION_PHASE_CANCELLED : P.MIGRATION_PHASE_FAILED,
        throttlePct: 0,
        updatedAtMs: now,
        totalMs: now - s.startedAtMs,
        error: notes.length ? `${reason}; cleanup incomplete: ${notes.join("; ")}` : `${reason}; rolled back: source resumed, destination aborted`,
      });
    } catch (e) {
      this.deps.logger?.warn({ migration: s.id, err: (e as Error).message }, "recovery of a migration failed");
    } finally {
      span.end();
      if (this.activeByVm.get(vm) === s.id) this.activeByVm.delete(vm);
    }
  }
}
