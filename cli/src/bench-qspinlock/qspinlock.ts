// `virtmesh bench qspinlock`: the package's lock table (seed 002's tasks 1..8,
// ticket and queue, PV off/on, plus 2x and 4x overcommit) followed by the same
// locks guarding the guest's virtqueue on a live stack (guest-io.ts).
import type { BenchResult } from "@virtmesh/bench";
import { runQspinlockBench } from "@virtmesh/qspinlock";
import { runGuestIoBench } from "./guest-io";

export async function runQspinlockFullBench(opts: { quick: boolean; onProgress?: (line: string) => void }): Promise<BenchResult> {
  const t0 = Date.now();
  const r = await runQspinlockBench(opts);
  const g = await runGuestIoBench(opts);
  return {
    ...r,
    rows: [...r.rows, ...g.rows],
    summary: { ...r.summary, ...g.summary },
    params: { ...r.params, ...g.params, wall_s: Math.round((Date.now() - t0) / 100) / 10 },
  };
}
