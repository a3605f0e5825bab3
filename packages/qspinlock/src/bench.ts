// `virtmesh bench qspinlock`: the seed's micro-benchmark table (tasks 1..8,
// lock/unlock N times each, ticket and queue lock, PV off/on, ms and %
// change) plus the overcommitted case the PV locks exist for.
import { availableParallelism, loadavg } from "node:os";
import { type BenchResult, type BenchRow, formatTable, machineInfo } from "@virtmesh/bench";
import { type LockStats, MAYHALT_THRESHOLD, PLE_WINDOW_SPINS, QSPIN_THRESHOLD, TICKET_SPIN_THRESHOLD } from "./layout";
import { PLE_PREEMPTED_US, PLE_YIELD_MAX_US } from "./lockspace";
import type { LockKind } from "./ticket";
import { type LockWorkloadResult, VcpuPool, runLockWorkload } from "./workload";

/**
 * The seed's table (PATCH v9 17/19): ms for 5M lock/unlock per task on a
 * Westmere-EX, by number of contending tasks. The only typed-in figures.
 */
export const SEED_TABLE = {
  source: "seed 002, [PATCH v9 17/19] pvqspinlock: Add qspinlock para-virtualization support",
  machine: "Westmere-EX",
  ops_per_task: 5_000_000,
  columns: ["tasks", "ticket_pv_off_ms", "ticket_pv_on_ms", "ticket_change_pct", "queue_pv_off_ms", "queue_pv_on_ms", "queue_change_pct"],
  rows: [
    [1, 135, 179, 33, 137, 168, 23],
    [2, 1045, 1103, 6, 1161, 1248, 7],
    [3, 1827, 2683, 47, 2357, 2600, 10],
    [4, 2689, 4191, 56, 2882, 3115, 8],
    [5, 3736, 5830, 56, 3493, 3571, 2],
    [6, 4942, 7609, 54, 4239, 4198, -1],
    [7, 6304, 9570, 52, 4931, 4895, -1],
    [8, 7736, 11323, 46, 5632, 5588, -1],
  ],
} as const;

export interface QspinlockBenchOptions {
  quick: boolean;
  onProgress?: (line: string) => void;
}

interface Cell {
  /** ms for opsPerTask rounds per task: measured, or projected from the measured rate if the budget cut the run. */
  ms: number;
  ok: boolean;
  truncated: boolean;
  /** Projected from the steady-state rate (see merge). */
  steady: boolean;
  /** Share of all rounds done before every vCPU had its first turn. */
  startupPct: number;
  stats: LockStats;
}

const pct = (off: number, on: number): number => Math.round(((on - off) / off) * 1000) / 10;
const round = (x: number): number => Math.round(x * 10) / 10;

export async function runQspinlockBench(opts: QspinlockBenchOptions): Promise<BenchResult> {
  const say = opts.onProgress ?? (() => {});
  // Other processes on the host take cores from the vCPU threads; record how busy it was.
  const loadBefore = loadavg()[0]!;
  const hostCores = availableParallelism();
  const opsPerTask = opts.quick ? 300_000 : 2_000_000;
  const tableBudgetMs = opts.quick ? 400 : 5_000;
  const overcommitBudgetMs = opts.quick ? 2_200 : 12_000;
  // The 4x row again on a host with pause-loop exiting. Its runs are always
  // cut by the budget (PV off reaches the PV-on rate, ~10 rounds/ms) and
  // projected from the steady state, which starts within tens of ms.
  const pleBudgetMs = opts.quick ? 1_000 : 12_000;
  const pleFactor = 4;
  const maxTasks = 8;
  const factors = [2, 4];
  const maxVcpus = Math.max(maxTasks, ...factors.map((f) => f * hostCores));
  let pool = await VcpuPool.start(maxVcpus);
  let allOk = true;
  let truncatedCells = 0;
  let cells = 0;

  const run = async (lock: LockKind, pv: boolean, vcpus: number, budgetMs: number, unfair: boolean, pleWindow = 0): Promise<LockWorkloadResult> => {
    const r = await runLockWorkload({ pool, lock, pv, unfair, vcpus, hostCores, iterations: opsPerTask, budgetMs, timeoutMs: budgetMs + 30_000, pleWindow });
    cells++;
    if (!r.ok) {
      allOk = false;
      say(`  ${lock} pv=${pv} vcpus=${vcpus} ple=${pleWindow}: FAILED: ${r.error}`);
      await pool.terminate(); // a stuck run leaves threads behind: start afresh
      pool = await VcpuPool.start(maxVcpus);
    }
    if (r.truncated) truncatedCells++;
    return r;
  };
  /**
   * Several runs of one configuration as one cell: ms for opsPerTask rounds
   * per vCPU at the combined rate. Runs that all finished report their total
   * elapsed time. If the budget cut any run, the cell is projected from the
   * steady-state rate (rounds after every vCPU had its first turn, over the
   * time from then to the end): the vCPU threads that get a host core first
   * run with fewer contenders until the rest are scheduled, and on an
   * overcommitted host that start-up burst (tens of ms, up to thousands of
   * nearly uncontended rounds) would otherwise dominate a one-second run.
   */
  const merge = (vcpus: number, rs: LockWorkloadResult[]): Cell => {
    const ok = rs.every((r) => r.ok);
    const truncated = rs.some((r) => r.truncated);
    const steady = truncated && rs.every((r) => r.steadyOps > 0 && r.steadyMs > 0);
    const ops = rs.reduce((a, r) => a + (steady ? r.steadyOps : r.ops), 0);
    const elapsed = rs.reduce((a, r) => a + (steady ? r.steadyMs : r.elapsedMs), 0);
    const stats = { ...rs[0]!.stats };
    for (const r of rs.slice(1)) for (const k of Object.keys(stats) as Array<keyof typeof stats>) stats[k] += r.stats[k];
    const ms = ok && ops > 0 ? (elapsed * opsPerTask * vcpus) / ops : NaN;
    const startupOps = rs.reduce((a, r) => a + (r.ops - r.steadyOps), 0);
    return { ms, ok, truncated, steady, startupPct: (100 * startupOps) / Math.max(1, rs.reduce((a, r) => a + r.ops, 0)), stats };
  };
  /**
   * PV off and PV on in A-B-B-A order (half the budget each) so that a drift
   * in what the rest of the host does shifts both alike.
   */
  const pair = async (lock: LockKind, vcpus: number, budgetMs: number, pleWindow: number): Promise<[Cell, Cell]> => {
    const h = budgetMs / 2;
    const off: LockWorkloadResult[] = [];
    const on: LockWorkloadResult[] = [];
    // Short cells (all rounds done well within the budget) repeat A-B-B-A
    // until the budget is used, for a steadier figure.
    for (let round = 0; round < 10; round++) {
      off.push(await run(lock, false, vcpus, h, false, pleWindow));
      on.push(await run(lock, true, vcpus, h, false, pleWindow));
      on.push(await run(lock, true, vcpus, h, false, pleWindow));
      off.push(await run(lock, false, vcpus, h, false, pleWindow));
      const used = [...off, ...on].reduce((a, r) => a + r.elapsedMs, 0);
      if ([...off, ...on].some((r) => r.truncated || !r.ok) || used >= budgetMs * 2) break;
    }
    return [merge(vcpus, off), merge(vcpus, on)];
  };

  const rowFor = async (section: string, vcpus: number, budgetMs: number, withUnfair: boolean, pleWindow = 0): Promise<BenchRow> => {
    const [tOff, tOn] = await pair("ticket", vcpus, budgetMs, pleWindow);
    const [qOff, qOn] = await pair("queue", vcpus, budgetMs, pleWindow);
    const qs = qOn.stats;
    const row: BenchRow = {
      section,
      tasks: vcpus,
      host_cores: hostCores,
      overcommit: round(vcpus / hostCores),
      ticket_pv_off_ms: round(tOff.ms),
      ticket_pv_on_ms: round(tOn.ms),
      ticket_change_pct: pct(tOff.ms, tOn.ms),
      queue_pv_off_ms: round(qOff.ms),
      queue_pv_on_ms: round(qOn.ms),
      queue_change_pct: pct(qOff.ms, qOn.ms),
    };
    const all = [tOff, tOn, qOff, qOn];
    if (withUnfair) {
      const qU = merge(vcpus, [await run("queue", true, vcpus, budgetMs, true)]);
      row.queue_pv_on_unfair_ms = round(qU.ms);
      row.queue_unfair_steals = qU.stats.steals;
      all.push(qU);
    }
    if (pleWindow > 0) {
      Object.assign(row, { ple_window: pleWindow });
      for (const [k, c] of [["ticket_pv_off", tOff], ["ticket_pv_on", tOn], ["queue_pv_off", qOff], ["queue_pv_on", qOn]] as const) {
        row[`${k}_ple_exits`] = c.stats.pleExits;
        row[`${k}_ple_yields`] = c.stats.pleYields;
      }
    }
    Object.assign(row, {
      ticket_pv_halts: tOn.stats.ticketHalt,
      ticket_pv_kicks: tOn.stats.kickCpu,
      queue_pv_halt_qhead: qs.haltQhead,
      queue_pv_halt_qnode: qs.haltQnode,
      queue_pv_wake_kicked: qs.wakeKicked,
      queue_pv_wake_spurious: qs.wakeSpurious,
      queue_pv_kick_nohalt: qs.kickNohalt,
      queue_pv_kicks: qs.kickCpu,
      cells_projected: all.filter((c) => c.truncated).length,
      cells_projected_without_steady_state: all.filter((c) => c.truncated && !c.steady).length,
      queue_pv_off_startup_ops_pct: round(qOff.startupPct),
      queue_pv_on_startup_ops_pct: round(qOn.startupPct),
      ok: all.every((c) => c.ok),
    });
    return row;
  };

  const rows: BenchRow[] = [];
  const t0 = performance.now();
  try {
    // Warm every vCPU thread's JIT on every lock flavour, uncontended and
    // contended, so the first cells do not measure compilation.
    say("warming up vCPU threads");
    for (const [lock, pv, unfair] of [["ticket", false, false], ["ticket", true, false], ["queue", false, false], ["queue", true, false], ["queue", true, true]] as const) {
      for (let cpu = 0; cpu < maxVcpus; cpu++) {
        await pool.prepare({ kind: lock, pv, unfair }, [{ cpu, mode: "loop", iterations: 10_000 }]);
        pool.go(cpu);
        if (!(await pool.waitDone(10_000))) throw new Error(`warm-up of vCPU ${cpu} did not finish`);
      }
      await runLockWorkload({ pool, lock, pv, unfair, vcpus: maxVcpus, iterations: opsPerTask, budgetMs: 100, timeoutMs: 30_000 });
      // ... and the pause-loop exit path (fair locks only: the PLE row has no unfair cell).
      if (!unfair) await runLockWorkload({ pool, lock, pv, vcpus: maxVcpus, iterations: opsPerTask, budgetMs: 100, timeoutMs: 30_000, pleWindow: PLE_WINDOW_SPINS });
    }
    say(`warm-up done in ${Math.round(performance.now() - t0)} ms`);
    for (let tasks = 1; tasks <= maxTasks; tasks++) {
      const row = await rowFor("seed-table", tasks, tableBudgetMs, false);
      rows.push(row);
      say(`tasks ${tasks}: ticket ${row.ticket_pv_off_ms}/${row.ticket_pv_on_ms} ms (${row.ticket_change_pct}%), queue ${row.queue_pv_off_ms}/${row.queue_pv_on_ms} ms (${row.queue_change_pct}%)`);
    }
    for (const f of factors) {
      const row = await rowFor(`overcommit-${f}x`, f * hostCores, overcommitBudgetMs, true);
      rows.push(row);
      say(`overcommit ${f}x (${f * hostCores} vCPUs on ${hostCores} cores): ticket ${row.ticket_pv_off_ms}/${row.ticket_pv_on_ms} ms, queue ${row.queue_pv_off_ms}/${row.queue_pv_on_ms} ms, queue PV+unfair ${row.queue_pv_on_unfair_ms} ms`);
    }
    {
      const row = await rowFor(`overcommit-${pleFactor}x-ple`, pleFactor * hostCores, pleBudgetMs, false, PLE_WINDOW_SPINS);
      rows.push(row);
      say(`overcommit ${pleFactor}x with PLE (window ${PLE_WINDOW_SPINS} spins): ticket ${row.ticket_pv_off_ms}/${row.ticket_pv_on_ms} ms, queue ${row.queue_pv_off_ms}/${row.queue_pv_on_ms} ms`);
    }
  } finally {
    await pool.terminate();
  }

  const num = (v: unknown): number => (typeof v === "number" ? v : NaN);
  const cellKeys = ["ticket_pv_off_ms", "ticket_pv_on_ms", "queue_pv_off_ms", "queue_pv_on_ms"];
  const rowsComplete = allOk && rows.length === maxTasks + factors.length + 1 && rows.every((r) => cellKeys.every((k) => Number.isFinite(num(r[k]))));
  const r1 = rows.find((r) => r.section === "seed-table" && r.tasks === 1);
  const oc4 = rows.find((r) => r.section === "overcommit-4x");
  const oc2 = rows.find((r) => r.section === "overcommit-2x");
  const ocPle = rows.find((r) => r.section === `overcommit-${pleFactor}x-ple`);
  const speedup = (row: BenchRow | undefined, off: string, on: string): number | null => {
    if (row === undefined) return null;
    const v = num(row[off]) / num(row[on]);
    return Number.isFinite(v) ? Math.round(v * 100) / 100 : null;
  };

  const reference = {
    ...SEED_TABLE,
    qspin_threshold: QSPIN_THRESHOLD,
    qhead_threshold: 2 * QSPIN_THRESHOLD,
    mayhalt_threshold: MAYHALT_THRESHOLD,
    ticket_spin_threshold: TICKET_SPIN_THRESHOLD,
    overcommit_pv_speedup_goal: 1.5,
  };
  const result: BenchResult = {
    bench: "qspinlock",
    machine: machineInfo(),
    params: {
      quick: opts.quick,
      ops_per_task: opsPerTask,
      cell_budget_ms: tableBudgetMs,
      overcommit_budget_ms: overcommitBudgetMs,
      host_cores: hostCores,
      overcommit_factors: factors,
      ple_overcommit_factor: pleFactor,
      ple_window: PLE_WINDOW_SPINS,
      ple_budget_ms: pleBudgetMs,
      ple_preempted_us: PLE_PREEMPTED_US,
      ple_yield_max_us: PLE_YIELD_MAX_US,
      ple_model:
        "overcommit-Nx-ple rows: the host has pause-loop exiting. Every ple_window cpu_relax() iterations of a lock spin loop the vCPU exits to kvm_vcpu_on_spin(), which yields the host core (Atomics.wait) to another vCPU of the VM that is ready (kicked out of a halt, or runnable but not seen running for ple_preempted_us) until that vCPU has run (at most ple_yield_max_us), else returns at once. Other rows: no PLE, a spinning vCPU keeps its core",
      critical_section: "shared counter read-modify-write (plain, non-atomic)",
      projection:
        "a cell cut by its time budget reports steady_ms * (ops_per_task * tasks) / steady_ops, where steady_* count from the moment every vCPU of the run had acquired the lock once to the end of the run (the start-up rounds, done while some vCPU threads still waited for a host core, are left out); cells that never reached that state fall back to elapsed * (ops_per_task * tasks) / ops_done",
      order: "per lock: PV off, PV on, PV on, PV off (half the budget each; repeated while the runs finish early), merged per mode",
      wall_s: 0,
      host_loadavg_1m_before: Math.round(loadBefore * 100) / 100,
      host_loadavg_1m_after: Math.round(loadavg()[0]! * 100) / 100,
    },
    rows,
    summary: {
      rows_complete: rowsComplete,
      pv_overhead_pct_1task_queue: r1 !== undefined ? num(r1.queue_change_pct) : null,
      pv_overhead_pct_1task_ticket: r1 !== undefined ? num(r1.ticket_change_pct) : null,
      overcommit_pv_speedup: speedup(oc4, "queue_pv_off_ms", "queue_pv_on_ms"),
      overcommit_pv_unfair_speedup: speedup(oc4, "queue_pv_off_ms", "queue_pv_on_unfair_ms"),
      overcommit_2x_pv_speedup: speedup(oc2, "queue_pv_off_ms", "queue_pv_on_ms"),
      overcommit_ticket_pv_speedup: speedup(oc4, "ticket_pv_off_ms", "ticket_pv_on_ms"),
      overcommit_pv_speedup_ple: speedup(ocPle, "queue_pv_off_ms", "queue_pv_on_ms"),
      overcommit_ticket_pv_speedup_ple: speedup(ocPle, "ticket_pv_off_ms", "ticket_pv_on_ms"),
      cells_run: cells,
      cells_projected: truncatedCells,
    },
    reference,
  };
  result.params.wall_s = Math.round((performance.now() - t0) / 100) / 10;
  return result;
}

/** The measured table beside the seed's figures, for the terminal. */
export function formatQspinlockTable(result: BenchResult): string {
  const seed = new Map<number, readonly number[]>(SEED_TABLE.rows.map((r) => [r[0], r]));
  const view = result.rows.map((r) => {
    const s = r.section === "seed-table" ? seed.get(Number(r.tasks)) : undefined;
    return {
      section: r.section ?? "",
      tasks: r.tasks ?? "",
      ticket_off: r.ticket_pv_off_ms ?? "",
      ticket_on: r.ticket_pv_on_ms ?? "",
      "ticket_%": r.ticket_change_pct ?? "",
      queue_off: r.queue_pv_off_ms ?? "",
      queue_on: r.queue_pv_on_ms ?? "",
      "queue_%": r.queue_change_pct ?? "",
      queue_unfair: r.queue_pv_on_unfair_ms ?? "",
      seed_ticket: s ? `${s[1]}/${s[2]}/${s[3]}%` : "",
      seed_queue: s ? `${s[4]}/${s[5]}/${s[6]}%` : "",
    };
  });
  return formatTable(view);
}
