// Smoke test of `virtmesh bench migration`: a tiny run (one live stack, the idle row once,
// vm1 moved src -> dst) has the bench shape, its figures are measured, positive and finite,
// guest memory matched at switchover, and the run leaves nothing of its own behind (its
// state dir and its stack's shared-memory dirs). No timing assertions.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { runMigrationBench, MIGRATION_REFERENCE } from "./migration";

const leftovers = () => [
  ...readdirSync(tmpdir()).filter((f) => f.startsWith("virtmesh-bench-migration-")),
  // Only this bench's stacks (stack id bm<hex>, hosts src and dst).
  ...readdirSync("/dev/shm").filter((f) => /^virtmesh-bm[0-9a-f]{6}-(src|dst)$/.test(f)),
];

test("a tiny migration bench run: shape, measured figures, memory match, no leftovers", async () => {
  const before = new Set(leftovers());
  const lines: string[] = [];
  const r = await runMigrationBench({ quick: true, cells: ["idle"], repeats: 1, memoryBytes: 64 * 2 ** 20, onProgress: (l) => lines.push(l) });

  assert.deepEqual(Object.keys(r).sort(), ["bench", "machine", "params", "reference", "rows", "summary"]);
  assert.equal(r.bench, "migration");
  assert.ok(r.machine.cpus > 0);
  assert.deepEqual(r.reference, MIGRATION_REFERENCE);
  assert.ok(lines.length > 0);
  assert.ok(Array.isArray(r.params.machine_load) && r.params.machine_load.length === 1, "the load average at the cell's start is recorded");

  assert.equal(r.rows.length, 1);
  const row = r.rows[0]!;
  assert.equal(row.row, "idle");
  assert.equal(row.repeats, 1);
  assert.match(String(row.outcome), /^completed 1\/1$/);
  const positive = (k: string) => assert.ok(typeof row[k] === "number" && Number.isFinite(row[k]) && row[k] > 0, `${k} = ${String(row[k])}`);
  for (const k of ["total_ms", "downtime_ms", "expected_downtime_ms", "transferred_bytes", "rounds", "downtime_limit_ms"]) positive(k);
  assert.ok((row.downtime_ms_min as number) <= (row.downtime_ms as number) && (row.downtime_ms as number) <= (row.downtime_ms_max as number));
  assert.equal(row.throttle_pct, 0);
  assert.equal(row.memory_match, true);
  assert.equal(row.io_errors, 0);

  // The default row did not run: its summary figures are absent, not invented.
  for (const k of ["downtime_ms", "downtime_limit_ms", "estimate_error_pct", "memory_match", "io_errors", "total_ms"]) assert.ok(k in r.summary, k);
  assert.equal(r.summary.downtime_ms, null);
  assert.equal(r.summary.estimate_error_pct, null);

  assert.deepEqual(
    leftovers().filter((f) => !before.has(f)),
    [],
  );
});
