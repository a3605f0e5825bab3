// `virtmesh bench migration` (issue 11's must-show, issue 14's rules): one live stack with
// hosts src and dst, vm1 migrated back and forth once per cell through the migration-manager
// (MigrationService over gRPC), the guest driven over GuestService (the dirtying walk, a
// verified fio, the DMA device) and the balloon over BalloonService. Every figure comes from
// the MigrationStatus of a migration that ran to its end (completed or failed); each cell is
// repeated and reported as median, min and max. Nothing is projected.
import { mkdtempSync, rmSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { randomBytes } from "node:crypto";
import { credentials, status as GrpcStatus, type Client, type ServiceError } from "@grpc/grpc-js";
import { machineInfo, type BenchResult, type BenchRow } from "@virtmesh/bench";
import { balloon, callUnary, guest, migration, type UnaryMethod } from "@virtmesh/proto";
import { Stack } from "../stack";

const ROOT = resolve(__dirname, "..", "..", "..");
const MIB = 1 << 20;
const VM = "vm1";
const HOSTS = ["src", "dst"] as const;
const Phase = migration.MigrationPhase;
const FINAL = new Set([Phase.MIGRATION_PHASE_COMPLETED, Phase.MIGRATION_PHASE_FAILED, Phase.MIGRATION_PHASE_CANCELLED]);

/** The link every row shares (QEMU's max-bandwidth), applied by the sending sidecar. */
// 32 MiB/s: the working set's whole (1.5 s for a 128 MiB guest) stands well above the
// 300 ms memory budget plus the run-to-run noise of the switchover's fixed cost on a
// shared 2-core machine (hundreds of ms), so the rows above the bandwidth cannot converge
// by that noise alone.
export const BANDWIDTH_BYTES_PER_S = 32 * MIB;
export const DOWNTIME_LIMIT_MS = 300;
/** The default converging row: the summary's keys are its medians. */
export const DEFAULT_CELL = "dirty-25";

export interface MigrationCell {
  name: string;
  /** The dirtying walk's rate as a share of the bandwidth; undefined: no walk. */
  dirtyPct?: number;
  autoConverge?: boolean;
  /** Balloon inflated to half of guest memory before the migration. */
  balloon?: boolean;
  skipBallooned?: boolean;
  /** A mostly idle guest whose free memory was used once (holds data, not zeros). */
  usedThenFreed?: boolean;
  freePageHinting?: boolean;
  /** The DMA device with pinned pages attached, and the reporting mode. */
  vfio?: "precopy" | "stop-only";
  /** A short fio --verify crc32c runs across the migration. */
  fio?: boolean;
  /** Fail the migration past this (a row that may not converge). */
  maxTotalMs?: number;
  what: string;
}

/** Every row the bench knows, in run order. */
export function migrationCells(quick: boolean): MigrationCell[] {
  // A row that cannot converge without auto-converge gets a deadline so it fails honestly;
  // with auto-converge the throttle climbs 10 % every two 1-s periods, so it gets longer.
  const failAfter = quick ? 6000 : 10_000;
  const acAfter = quick ? 10_000 : 30_000;
  const dirty = (pct: number, ac: boolean, extra: Partial<MigrationCell> = {}): MigrationCell => ({
    name: `dirty-${pct}${ac ? "-ac" : ""}`,
    dirtyPct: pct,
    autoConverge: ac,
    what: `walk dirtying at ${pct} % of the bandwidth, auto-converge ${ac ? "on" : "off"}`,
    ...extra,
  });
  return [
    { name: "idle", what: "idle guest, nothing dirtied" },
    dirty(25, false, { fio: true, maxTotalMs: quick ? 20_000 : 30_000, what: "walk dirtying at 25 % of the bandwidth, auto-converge off, fio randrw --verify crc32c across the migration (the default row)" }),
    dirty(25, true),
    dirty(90, false, { maxTotalMs: failAfter }),
    dirty(90, true, { maxTotalMs: acAfter }),
    dirty(200, false, { maxTotalMs: failAfter }),
    dirty(200, true, { maxTotalMs: acAfter }),
    { name: "balloon-sent", balloon: true, skipBallooned: false, what: "balloon inflated to half of memory, ballooned pages sent (as zero pages)" },
    { name: "balloon-skipped", balloon: true, skipBallooned: true, what: "balloon inflated to half of memory, ballooned pages skipped" },
    { name: "hinting-off", usedThenFreed: true, freePageHinting: false, what: "mostly idle guest, half its memory used once then freed; free page hinting off" },
    { name: "hinting-on", usedThenFreed: true, freePageHinting: true, what: "mostly idle guest, half its memory used once then freed; free page hinting on (free pages skipped)" },
    { name: "vfio-precopy", vfio: "precopy", what: "DMA device with pinned pages, pinned pages reported dirty in every pre-copy round" },
    { name: "vfio-stop-only", vfio: "stop-only", what: "DMA device with pinned pages, pinned pages reported only at stop-and-copy" },
  ];
}

export interface MigrationBenchOptions {
  quick: boolean;
  onProgress?: (line: string) => void;
  /** Only these cells (by name), e.g. a smoke test's ["idle"]. */
  cells?: string[];
  /** Guest memory (default 128 MiB quick, 256 MiB full); a smoke test may go smaller. */
  memoryBytes?: number;
  /** Repeats per cell (default: 3 full; quick: 2 for the default row, 1 elsewhere). */
  repeats?: number;
}

const call = <Req, Res>(c: object, fn: UnaryMethod<Req, Res>, req: Req, timeoutMs = 30_000): Promise<Res> => callUnary(c, fn, req, timeoutMs);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One migration's figures (a failed one keeps its time, bytes and rounds). */
interface Sample {
  completed: boolean;
  reason: string;
  total_ms: number;
  downtime_ms: number | null;
  downtime_limit_ms: number;
  expected_downtime_ms: number | null;
  transferred_bytes: number;
  rounds: number;
  throttle_pct: number;
  skipped_pages: number;
  zero_pages: number;
  setup_ms: number;
  device_state_ms: number | null;
  memory_match: boolean;
  io_errors: number;
  load1: number;
}

class MigrationLiveStack {
  private readonly clients: Client[] = [];
  host: string = HOSTS[0];
  /** The integrity check's digest as the status shows it ("sha256", "crc32c"). */
  checksumKind = "";
  mm!: migration.MigrationServiceClient;
  private readonly guests = new Map<string, guest.GuestServiceClient>();
  private readonly balloons = new Map<string, balloon.BalloonServiceClient>();

  private constructor(
    readonly stack: Stack,
    readonly stateDir: string,
  ) {}

  static async start(memoryBytes: number, log: (l: string) => void): Promise<MigrationLiveStack> {
    const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-bench-migration-"));
    const stack = new Stack({
      root: ROOT,
      stateDir,
      hosts: [...HOSTS],
      vms: [{ vm: VM, host: HOSTS[0] }],
      basePort: 0,
      shmBase: "/dev/shm",
      stackId: `bm${randomBytes(3).toString("hex")}`,
      env: {
        VIRTMESH_GUEST_MEMORY_BYTES: String(memoryBytes),
        VIRTMESH_DISK_BYTES: String(64 * MIB),
        VIRTMESH_GUEST_VCPUS: "2",
        // 32 slots of 1 MiB buffers fit the guest beside the working sets.
        VIRTMESH_BLK_QUEUE_SIZE: "32",
        VIRTMESH_BLK_TRACE_EVERY: "0",
      },
      log,
    });
    const live = new MigrationLiveStack(stack, stateDir);
    try {
      await stack.start();
      const snap = stack.snapshot();
      const m = snap.services.find((s) => s.name === "migration-manager")!;
      live.mm = live.keep(new migration.MigrationServiceClient(m.grpc, credentials.createInsecure()));
      for (const h of HOSTS) {
        const gd = snap.services.find((s) => s.instance === `guest-driver-${VM}` && s.host === h)!;
        live.guests.set(h, live.keep(new guest.GuestServiceClient(gd.grpc, credentials.createInsecure())));
        const bh = snap.services.find((s) => s.name === "balloon-host" && s.host === h)!;
        live.balloons.set(h, live.keep(new balloon.BalloonServiceClient(bh.grpc, credentials.createInsecure())));
      }
    } catch (e) {
      await live.stop();
      throw e;
    }
    return live;
  }

  private keep<C extends Client>(c: C): C {
    this.clients.push(c);
    return c;
  }

  get other(): string {
    return this.host === HOSTS[0] ? HOSTS[1] : HOSTS[0];
  }
  /** The guest-driver that runs vm1 now. */
  get guest(): guest.GuestServiceClient {
    return this.guests.get(this.host)!;
  }
  get balloon(): balloon.BalloonServiceClient {
    return this.balloons.get(this.host)!;
  }

  async setBalloon(bytes: number): Promise<void> {
    const b = this.balloon;
    const r = await call(b, b.setTarget, { vm: VM, targetBytes: bytes });
    const deadline = Date.now() + 60_000;
    for (;;) {
      const s = await call(b, b.getStats, { vm: VM });
      if (s.actualPages === r.targetPages) return;
      if (Date.now() > deadline) throw new Error(`balloon at ${s.actualPages} pages, target ${r.targetPages}, after 60 s`);
      await sleep(100);
    }
  }

  /** Migrates vm1 to the other host; the status at its end. */
  async migrate(c: MigrationCell, downtimeLimitMs: number): Promise<migration.MigrationStatus> {
    const started = await call(this.mm, this.mm.startMigration, {
      vm: VM,
      sourceHost: this.host,
      destinationHost: this.other,
      bandwidthBytesPerS: BANDWIDTH_BYTES_PER_S,
      downtimeLimitMs,
      autoConverge: c.autoConverge === true,
      dirtyReporting: c.vfio === "stop-only" ? migration.DirtyReporting.DIRTY_REPORTING_STOP_ONLY : migration.DirtyReporting.DIRTY_REPORTING_PRECOPY,
      skipBallooned: c.skipBallooned === true,
      freePageHinting: c.freePageHinting === true,
      maxTotalMs: c.maxTotalMs ?? 0,
      throttleInitialPct: 0,
      throttleIncrementPct: 0,
      throttleMaxPct: 0,
    });
    const deadline = Date.now() + 180_000;
    for (;;) {
      const s = await call(this.mm, this.mm.getMigration, { id: started.id });
      if (FINAL.has(s.phase)) {
        if (s.phase === Phase.MIGRATION_PHASE_COMPLETED) this.host = this.other;
        return s;
      }
      if (Date.now() > deadline) {
        await call(this.mm, this.mm.cancelMigration, { id: started.id }).catch(() => undefined);
        throw new Error(`migration ${started.id} still ${migration.migrationPhaseToJSON(s.phase)} after 180 s`);
      }
      await sleep(50);
    }
  }

  /** Why vm1 cannot be migrated now ("" when it can): it runs here, the other side waits. */
  async notReady(): Promise<string> {
    const want = [
      [this.host, guest.RunState.RUN_STATE_RUNNING],
      [this.other, guest.RunState.RUN_STATE_INCOMING],
    ] as const;
    for (const [h, st] of want) {
      const c = this.guests.get(h)!;
      const got = await call(c, c.getState, {}).then(
        (r) => r.state,
        () => guest.RunState.RUN_STATE_UNSPECIFIED,
      );
      if (got !== st) return `guest-driver-${VM}@${h} is ${guest.runStateToJSON(got)}, not ${guest.runStateToJSON(st)}`;
    }
    return "";
  }

  async stop(): Promise<void> {
    for (const c of this.clients) c.close();
    try {
      await this.stack.stop();
    } finally {
      rmSync(this.stateDir, { recursive: true, force: true });
    }
  }
}

/** 3/8 of memory: contiguous in the guest's allocator beside the 32 blk buffers. */
const workingSetBytes = (memoryBytes: number) => (memoryBytes * 3) / 8;

const isUnimplemented = (e: unknown) => (e as ServiceError).code === GrpcStatus.UNIMPLEMENTED;

/** Runs one cell once: its setup on the running guest, the migration, its teardown on the new host. */
async function runCell(live: MigrationLiveStack, c: MigrationCell, memoryBytes: number, limitMs: number, progress: (l: string) => void): Promise<Sample> {
  const load1 = loadavg()[0]!;
  const workingSet = workingSetBytes(memoryBytes);
  let g = live.guest;
  if (c.balloon) await live.setBalloon(memoryBytes / 2);
  if (c.usedThenFreed) {
    // Half of memory used once (every page written), then freed: free pages that hold
    // data, as a guest's dropped page cache does. Hinting skips them; without it they go.
    await call(g, g.startStress, { workingSetBytes: memoryBytes / 2, dirtyRateBytesPerS: 0, vcpus: 1 });
    const deadline = Date.now() + 60_000;
    while ((await call(g, g.getStress, {})).passes < 1) {
      if (Date.now() > deadline) throw new Error("the walk did not finish one pass in 60 s");
      await sleep(50);
    }
    await call(g, g.stopStress, {});
  }
  if (c.vfio) await call(g, g.setDmaDevice, { regionBytes: 4 * MIB, writeRateBytesPerS: 4 * MIB });
  if (c.dirtyPct !== undefined) {
    await call(g, g.startStress, { workingSetBytes: workingSet, dirtyRateBytesPerS: Math.round((BANDWIDTH_BYTES_PER_S * c.dirtyPct) / 100), vcpus: 1 });
    // One full pass first: the working set is non-zero before the bulk round.
    const deadline = Date.now() + 60_000;
    while ((await call(g, g.getStress, {})).passes < 1) {
      if (Date.now() > deadline) throw new Error("the walk did not finish one pass in 60 s");
      await sleep(50);
    }
  }
  let fio: Promise<guest.FioResult> | undefined;
  if (c.fio) {
    const req: guest.FioRequest = { rw: "randrw", blockSize: 4096, iodepth: 8, numjobs: 1, sizeBytes: 8 * MIB, runtimeMs: 4000, verify: "crc32c", rwmixRead: 50, spinlock: "", pvSpinlock: "" };
    fio = call(g, g.runFio, req, 120_000);
    fio.catch(() => undefined);
    await sleep(1000);
  }

  const s = await live.migrate(c, limitMs);
  if (s.sourceChecksum) live.checksumKind = s.sourceChecksum.includes(":") ? s.sourceChecksum.split(":")[0]! : "sha256";
  const completed = s.phase === Phase.MIGRATION_PHASE_COMPLETED;
  let ioErrors = 0;
  if (fio) {
    const r = await fio;
    ioErrors = Number(r.verifyErrors);
    if (ioErrors) progress(`    fio verify: ${r.verifyFailures.slice(0, 3).join("; ")}`);
  }
  // Teardown where the VM runs now.
  g = live.guest;
  if (c.dirtyPct !== undefined) {
    await call(g, g.stopStress, {});
    await call(g, g.setThrottle, { pct: 0 });
  }
  if (c.vfio) await call(g, g.setDmaDevice, { regionBytes: 0, writeRateBytesPerS: 0 });
  if (c.balloon) await live.setBalloon(0);

  // The round that decided the switchover is the last pre-copy round (its estimate).
  const decided = s.rounds.length ? s.rounds[s.rounds.length - 1]! : undefined;
  return {
    completed,
    reason: completed ? "" : `${migration.migrationPhaseToJSON(s.phase).replace("MIGRATION_PHASE_", "").toLowerCase()}: ${s.error}`,
    total_ms: Number(s.totalMs),
    downtime_ms: completed ? s.actualDowntimeMs : null,
    downtime_limit_ms: s.downtimeLimitMs,
    expected_downtime_ms: completed && decided ? decided.expectedDowntimeMs : null,
    transferred_bytes: Number(s.transferredBytes),
    rounds: s.round,
    throttle_pct: Math.max(0, ...s.rounds.map((r) => r.throttlePct)),
    skipped_pages: Number(s.skippedPages),
    zero_pages: Number(s.zeroPages),
    setup_ms: Number(s.setupMs),
    device_state_ms: completed ? s.deviceStateMs : null,
    memory_match: s.memoryMatch,
    io_errors: ioErrors,
    load1,
  };
}

/** Back to an idle, unthrottled, deflated guest without a DMA device (errors ignored). */
async function resetGuest(live: MigrationLiveStack): Promise<void> {
  const g = live.guest;
  const ignore = () => undefined;
  await call(g, g.stopStress, {}).catch(ignore);
  await call(g, g.setThrottle, { pct: 0 }).catch(ignore);
  await call(g, g.setDmaDevice, { regionBytes: 0, writeRateBytesPerS: 0 }).catch(ignore);
  await live.setBalloon(0).catch(ignore);
}

function broken(reason: string): Sample {
  return {
    completed: false,
    reason,
    total_ms: NaN,
    downtime_ms: null,
    downtime_limit_ms: NaN,
    expected_downtime_ms: null,
    transferred_bytes: NaN,
    rounds: NaN,
    throttle_pct: NaN,
    skipped_pages: NaN,
    zero_pages: NaN,
    setup_ms: NaN,
    device_state_ms: null,
    memory_match: false,
    io_errors: 0,
    load1: loadavg()[0]!,
  };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** median, min and max of one figure over the samples that have it (null when none). */
function stat(samples: Sample[], key: keyof Sample): { med: number | null; min: number | null; max: number | null } {
  const xs = samples.map((s) => s[key]).filter((v): v is number => typeof v === "number" && Number.isFinite(v));
  if (xs.length === 0) return { med: null, min: null, max: null };
  return { med: median(xs), min: Math.min(...xs), max: Math.max(...xs) };
}

const FIGURES = ["total_ms", "downtime_ms", "expected_downtime_ms", "transferred_bytes", "rounds", "throttle_pct"] as const;

function row(c: MigrationCell, samples: Sample[]): BenchRow {
  const r: BenchRow = { row: c.name, repeats: samples.length, downtime_limit_ms: stat(samples, "downtime_limit_ms").med };
  for (const k of FIGURES) {
    const v = stat(samples, k);
    r[k] = v.med;
    r[`${k}_min`] = v.min;
    r[`${k}_max`] = v.max;
  }
  // Where the downtime goes, in part: the device state's save + load (status.device_state_ms).
  r.device_state_ms = stat(samples, "device_state_ms").med;
  r.setup_ms = stat(samples, "setup_ms").med;
  r.skipped_pages = stat(samples, "skipped_pages").med;
  r.zero_pages = stat(samples, "zero_pages").med;
  // Checked at switchover only: a row with no completed migration has no figure.
  r.memory_match = samples.some((s) => s.completed) ? samples.filter((s) => s.completed).every((s) => s.memory_match) : null;
  r.io_errors = samples.reduce((a, s) => a + s.io_errors, 0);
  const ok = samples.filter((s) => s.completed).length;
  const reasons = [...new Set(samples.filter((s) => !s.completed).map((s) => s.reason))];
  r.outcome = ok === samples.length ? `completed ${ok}/${samples.length}` : `completed ${ok}/${samples.length}; ${reasons.join(" | ")}`;
  const load = stat(samples, "load1").med;
  r.load1_at_start = load === null ? null : Number(load.toFixed(2));
  return r;
}

export const MIGRATION_REFERENCE = {
  qemu_defaults: "downtime limit 300 ms; switch over when remaining < bandwidth x limit; auto-converge 20 % +10 % up to 99 %",
  free_page_hinting: "virtio-balloon free page hinting (2018): 8 GB idle guest 2970 ms -> 620 ms (-79 %)",
  predictors_estimate_error_pct: "6..7 % typical for migration-time predictors",
  issue_goals: "downtime within the limit, estimate_error_pct <= 15, memory_match true, io_errors 0",
};

export async function runMigrationBench(opts: MigrationBenchOptions): Promise<BenchResult> {
  const progress = opts.onProgress ?? (() => undefined);
  const t0 = Date.now();
  const memoryBytes = opts.memoryBytes ?? (opts.quick ? 128 : 256) * MIB;
  let cells = migrationCells(opts.quick);
  // Quick keeps auto-converge only where the guest outruns the link (the 25 % and 90 %
  // rows with auto-converge are full-run only), to stay near a minute.
  if (opts.quick) cells = cells.filter((c) => c.name !== "dirty-25-ac" && c.name !== "dirty-90-ac");
  if (opts.cells) cells = migrationCells(opts.quick).filter((c) => opts.cells!.includes(c.name));
  const repeatsOf = (c: MigrationCell) => opts.repeats ?? (opts.quick ? (c.name === DEFAULT_CELL ? 2 : 1) : 3);
  const notes: string[] = [];

  progress(`migration: starting a live stack, hosts src and dst, ${VM} ${memoryBytes / MIB} MiB`);
  const live = await MigrationLiveStack.start(memoryBytes, () => undefined);
  const samples = new Map<string, Sample[]>(cells.map((c) => [c.name, []]));
  let checksumKind = "";
  const fixedCosts: number[] = [];
  const machineLoad: { cell: string; repeat: number; loadavg: number[] }[] = [];
  try {
    progress(`migration: stack up in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    // The DMA device is another helper's; leave its rows out if the guest does not have it.
    if (cells.some((c) => c.vfio)) {
      const g = live.guest;
      const ok = await call(g, g.getDmaDevice, {}).then(
        () => true,
        (e: unknown) => {
          if (isUnimplemented(e)) return false;
          throw e;
        },
      );
      if (!ok) {
        cells = cells.filter((c) => !c.vfio);
        notes.push("vfio rows left out: GuestService.SetDmaDevice/GetDmaDevice answered UNIMPLEMENTED on this tree");
      }
    }
    // Rounds over every cell (cell order within a round), so drift in the machine's load
    // spreads over all cells rather than landing on one.
    const maxRepeats = Math.max(...cells.map(repeatsOf));
    rounds: for (let rep = 0; rep < maxRepeats; rep++) {
      for (const c of cells) {
        if (rep >= repeatsOf(c)) continue;
        machineLoad.push({ cell: c.name, repeat: rep + 1, loadavg: loadavg().map((x) => Number(x.toFixed(2))) });
        // QEMU's 300 ms for every row. The engine switches over once the memory part of
        // the estimate is within it when the switchover's fixed cost alone is over it, so
        // rows that can converge do, and the report shows the downtime against the limit.
        const limitMs = DOWNTIME_LIMIT_MS;
        const s = await runCell(live, c, memoryBytes, limitMs, progress).catch(async (e: unknown) => {
          // A cell that broke (not a migration that failed: that is a figure) is reported
          // as such, and the guest put back to idle for the next cell.
          await resetGuest(live);
          return broken(`error: ${(e as Error).message}`);
        });
        samples.get(c.name)!.push(s);
        // A stack that can no longer migrate (a source that did not let go of the VM)
        // would only make every later cell an error: stop, and say so.
        const why = await live.notReady();
        if (why) {
          notes.push(`stopped after ${c.name} #${rep + 1}: ${why}; the cells after it did not run`);
          progress(`migration: ${notes[notes.length - 1]}`);
          break rounds;
        }
        if (c.name === "idle" && s.completed && s.expected_downtime_ms !== null) fixedCosts.push(s.expected_downtime_ms);
        progress(
          `  ${c.name} #${rep + 1} ${live.host === HOSTS[0] ? "dst->src" : "src->dst"}: ${s.completed ? "completed" : s.reason}; total ${s.total_ms} ms, downtime ${s.downtime_ms ?? "-"} ms ` +
            `(expected ${s.expected_downtime_ms ?? "-"}), ${(s.transferred_bytes / MIB).toFixed(1)} MiB, ${s.rounds} rounds, throttle ${s.throttle_pct} %, load ${s.load1.toFixed(2)}`,
        );
      }
    }
  } finally {
    checksumKind = live.checksumKind;
    await live.stop();
  }

  const rows = cells.map((c) => row(c, samples.get(c.name)!));
  const def = samples.get(DEFAULT_CELL) ?? [];
  const done = def.filter((s) => s.completed);
  const errPct = done.filter((s) => s.downtime_ms! > 0).map((s) => (Math.abs(s.expected_downtime_ms! - s.downtime_ms!) / s.downtime_ms!) * 100);
  const summary: BenchResult["summary"] = {
    downtime_ms: stat(done, "downtime_ms").med,
    downtime_limit_ms: stat(done, "downtime_limit_ms").med,
    estimate_error_pct: errPct.length ? median(errPct) : null,
    memory_match: done.length > 0 && done.every((s) => s.memory_match),
    io_errors: def.length ? median(def.map((s) => s.io_errors)) : null,
    total_ms: stat(done, "total_ms").med,
    default_row_completed: `${done.length}/${def.length}`,
  };
  // How far the last pre-copy round's estimate fell short of the measured downtime.
  const underestimate = (name: string) => {
    const xs = (samples.get(name) ?? []).filter((s) => s.completed && s.downtime_ms! > 0);
    return xs.length ? median(xs.map((s) => ((s.downtime_ms! - s.expected_downtime_ms!) / s.downtime_ms!) * 100)) : null;
  };
  if (cells.some((c) => c.name === "vfio-stop-only")) summary.vfio_late_underestimate_pct = underestimate("vfio-stop-only");
  // The same figure with pinned pages reported in every round: what stop-only adds is the difference.
  if (cells.some((c) => c.name === "vfio-precopy")) summary.vfio_precopy_underestimate_pct = underestimate("vfio-precopy");
  const on = stat((samples.get("hinting-on") ?? []).filter((s) => s.completed), "total_ms").med;
  const off = stat((samples.get("hinting-off") ?? []).filter((s) => s.completed), "total_ms").med;
  if (on !== null && off !== null && off > 0) summary.free_page_hinting_reduction_pct = ((off - on) / off) * 100;
  summary.wall_s = (Date.now() - t0) / 1000;

  const trimmed = migrationCells(opts.quick)
    .map((c) => c.name)
    .filter((n) => !cells.some((x) => x.name === n));
  return {
    bench: "migration",
    machine: machineInfo(),
    params: {
      quick: opts.quick,
      stack: "live: nats-server, per host (src, dst) shm-sidecar, vhost-worker, completion-thread, balloon-host; migration-manager; guest-driver vm1 and an incoming guest-driver on the other host, separate processes (cli/src/stack.ts); started once, vm1 migrated back and forth, one migration per cell run",
      guest_memory_bytes: memoryBytes,
      guest_vcpus: 2,
      disk_bytes: 64 * MIB,
      blk_queue_size: 32,
      bandwidth_bytes_per_s: BANDWIDTH_BYTES_PER_S,
      downtime_limit_ms: `${DOWNTIME_LIMIT_MS} for every row (QEMU's default); when the switchover's fixed cost alone is over it, the engine switches over once the memory part is within it`,
      switchover_fixed_cost_ms_idle_rows: fixedCosts,
      working_set_bytes: workingSetBytes(memoryBytes),
      dirtying: "GuestService.StartStress (QEMU migration-test's walk, 1 vCPU) at the row's share of the bandwidth, one full pass before the migration starts; stopped and throttle cleared on the destination after",
      balloon_rows: `BalloonService.SetTarget to ${memoryBytes / 2 / MIB} MiB (half of memory) before, 0 after; ballooned pages are zero (released) so 'balloon-sent' sends them as zero-page flags`,
      hinting_rows: `half of memory walked once (every page written) and freed just before, then an idle migration; hinting skips those free pages`,
      vfio_rows: "GuestService.SetDmaDevice 4 MiB region, 4 MiB/s device writes; detached after",
      fio: "default row: GuestService.RunFio randrw 4k iodepth 8, 8 MiB, 4 s, verify crc32c, started 1 s before the migration; io_errors = its verify_errors (0 where no fio runs)",
      max_total_ms: Object.fromEntries(cells.filter((c) => c.maxTotalMs).map((c) => [c.name, c.maxTotalMs!])),
      repeats: Object.fromEntries(cells.map((c) => [c.name, repeatsOf(c)])),
      rows: Object.fromEntries(cells.map((c) => [c.name, c.what])),
      rows_left_out: trimmed,
      figures: "median over the repeats, with _min and _max; downtime and expected downtime over completed repeats only; nothing projected: each figure is the MigrationStatus of a migration that ran to its end",
      expected_downtime: "expected_downtime_ms of the last pre-copy round (the one that decided the switchover)",
      estimate_error_definition: "|expected - actual| / actual x 100 per completed repeat of the default row, median",
      vfio_late_underestimate_definition: "(actual - expected) / actual x 100 in the stop-only row, median",
      switchover_fixed_cost: `the switchover includes a checksum of all guest memory (skipped pages left out) on both sides, the integrity check (ChecksumMemory, digest ${checksumKind || "unknown: no migration completed"}), measured in setup and counted in the estimate; downtime is reported as measured`,
      machine_load: machineLoad,
      notes,
    },
    rows,
    summary,
    reference: MIGRATION_REFERENCE,
  };
}
