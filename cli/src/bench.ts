// virtmesh bench <name> [--quick] [--json FILE]
import { formatTable, writeBenchJson, type BenchResult, type BenchRow } from "@virtmesh/bench";
import { UsageError, type Values } from "./main";

type Runner = (opts: { quick: boolean; onProgress?: (line: string) => void }) => Promise<BenchResult>;

// Loaded lazily: each bench pulls in only its own packages.
const BENCHES: Record<string, () => Runner> = {
  ring: () => (require("./bench-ring/ring") as typeof import("./bench-ring/ring")).runRingBench,
  // Three VMs on one ioband device through the live stack (the package's in-process
  // scheduler-only bench, runIobandBench, stays as a library function).
  ioband: () => (require("./bench-ioband/ioband") as typeof import("./bench-ioband/ioband")).runIobandLiveBench,
  balloon: () => (require("@virtmesh/balloon") as typeof import("@virtmesh/balloon")).runBalloonBench,
  // The seed's table on vCPU threads (the package), then the guest's I/O path under its lock (a live stack).
  qspinlock: () => (require("./bench-qspinlock/qspinlock") as typeof import("./bench-qspinlock/qspinlock")).runQspinlockFullBench,
  // vm1 migrated back and forth between hosts src and dst of one live stack, row by row.
  migration: () => (require("./bench-migration/migration") as typeof import("./bench-migration/migration")).runMigrationBench,
  "vhost-blk": () => (require("./bench-vhost-blk/vhost-blk") as typeof import("./bench-vhost-blk/vhost-blk")).runVhostBlkBench,
};

export const BENCH_NAMES = Object.keys(BENCHES);

/** One table per run of rows with the same columns (a bench's sections may differ). */
function tables(rows: BenchRow[]): string {
  const out: string[] = [];
  let group: BenchRow[] = [];
  let cols = "";
  for (const r of rows) {
    const c = Object.keys(r).join(",");
    if (group.length > 0 && c !== cols) {
      out.push(formatTable(group));
      group = [];
    }
    cols = c;
    group.push(r);
  }
  if (group.length > 0 || out.length === 0) out.push(formatTable(group));
  return out.join("\n\n");
}

export async function bench(v: Values, pos: string[]): Promise<number> {
  const name = pos[0];
  if (!name) throw new UsageError(`bench needs a name: ${BENCH_NAMES.join(", ")}`);
  if (pos.length > 1) throw new UsageError(`unexpected argument '${pos[1]}'`);
  if (!BENCH_NAMES.includes(name)) throw new UsageError(`unknown bench '${name}' (one of ${BENCH_NAMES.join(", ")})`);
  if (v.json === true || v.json === "") throw new UsageError("--json needs a file name");
  const load = BENCHES[name]!;
  const run = load();
  const result = await run({ quick: v.quick === true, onProgress: (l) => process.stderr.write(`${l}\n`) });
  process.stdout.write(`${result.bench}\n${tables(result.rows)}\n\nsummary: ${JSON.stringify(result.summary)}\nreference: ${JSON.stringify(result.reference)}\n`);
  if (typeof v.json === "string") writeBenchJson(v.json, result);
  return 0;
}
