// virtmesh bench <name> [--quick] [--json FILE]
import { formatTable, writeBenchJson, type BenchResult } from "@virtmesh/bench";
import { UsageError, type Values } from "./main";

type Runner = (opts: { quick: boolean; onProgress?: (line: string) => void }) => Promise<BenchResult>;

// Loaded lazily: each bench pulls in only its own packages.
const BENCHES: Record<string, () => Runner> = {
  ring: () => (require("./bench-ring/ring") as typeof import("./bench-ring/ring")).runRingBench,
  // Three VMs on one ioband device through the live stack (the package's in-process
  // scheduler-only bench, runIobandBench, stays as a library function).
  ioband: () => (require("./bench-ioband/ioband") as typeof import("./bench-ioband/ioband")).runIobandLiveBench,
  balloon: () => (require("@virtmesh/balloon") as typeof import("@virtmesh/balloon")).runBalloonBench,
  qspinlock: () => (require("@virtmesh/qspinlock") as typeof import("@virtmesh/qspinlock")).runQspinlockBench,
  "vhost-blk": () => (require("./bench-vhost-blk/vhost-blk") as typeof import("./bench-vhost-blk/vhost-blk")).runVhostBlkBench,
};

export const BENCH_NAMES = Object.keys(BENCHES);

export async function bench(v: Values, pos: string[]): Promise<number> {
  const name = pos[0];
  if (!name) throw new UsageError(`bench needs a name: ${BENCH_NAMES.join(", ")}`);
  if (pos.length > 1) throw new UsageError(`unexpected argument '${pos[1]}'`);
  if (!BENCH_NAMES.includes(name)) throw new UsageError(`unknown bench '${name}' (one of ${BENCH_NAMES.join(", ")})`);
  if (v.json === true || v.json === "") throw new UsageError("--json needs a file name");
  const load = BENCHES[name]!;
  const run = load();
  const result = await run({ quick: v.quick === true, onProgress: (l) => process.stderr.write(`${l}\n`) });
  process.stdout.write(`${result.bench}\n${formatTable(result.rows)}\n\nsummary: ${JSON.stringify(result.summary)}\nreference: ${JSON.stringify(result.reference)}\n`);
  if (typeof v.json === "string") writeBenchJson(v.json, result);
  return 0;
}
