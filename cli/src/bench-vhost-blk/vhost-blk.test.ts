// Smoke test of `virtmesh bench vhost-blk`: a tiny run (one real stack with the
// file backend and parallel completion, plus the rpc peer) has the bench shape,
// every figure it reports is measured, positive and finite, the verify pass
// finds no errors, and nothing is left behind. No timing assertions.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { runVhostBlkBench, VHOST_BLK_REFERENCE } from "./vhost-blk";

const leftovers = () => [
  ...readdirSync(tmpdir()).filter((f) => f.startsWith("virtmesh-bench-vhost-blk-")),
  // Only this bench's own hosts (bench-<backend>-<mode>): other tests' files may come and go beside it.
  ...readdirSync("/dev/shm").filter((f) => /^virtmesh-.+-bench-(file|null)-(parallel|serialized)$/.test(f)),
];

test("a tiny vhost-blk run: shape, measured figures, zero verify errors, no leftovers", async () => {
  const before = new Set(leftovers());
  const lines: string[] = [];
  const r = await runVhostBlkBench({
    quick: true,
    runtimeMs: 200,
    warmupMs: 50,
    backends: ["file"],
    modes: ["parallel", "rpc"],
    patterns: ["randread", "write"],
    onProgress: (l) => lines.push(l),
  });

  assert.deepEqual(Object.keys(r).sort(), ["bench", "machine", "params", "reference", "rows", "summary"]);
  assert.equal(r.bench, "vhost-blk");
  assert.ok(r.machine.cpus > 0);
  assert.equal(r.params.block_size, 4096);
  assert.equal(r.params.iodepth, 32);
  assert.deepEqual(r.reference, VHOST_BLK_REFERENCE);
  assert.ok(lines.length > 0);

  // The seed's order within each mode: seq write before rand read.
  assert.deepEqual(
    r.rows.map((x) => `${x.backend}/${x.mode}/${x.pattern}`),
    ["file/parallel/seq write", "file/parallel/rand read", "file/rpc/seq write", "file/rpc/rand read"],
  );
  const positive = (v: unknown, what: string) => assert.ok(typeof v === "number" && Number.isFinite(v) && v > 0, `${what} = ${String(v)}`);
  for (const row of r.rows) {
    const at = `${row.mode} ${row.pattern}`;
    for (const k of ["iops", "lat_p50_us", "lat_p99_us", "ios", "runtime_ms"]) positive(row[k], `${at} ${k}`);
    assert.ok((row.lat_p99_us as number) >= (row.lat_p50_us as number), at);
    if (row.mode === "rpc") {
      // No ring: no kicks or interrupts to count.
      assert.equal(row.kicks_per_req, null);
      assert.equal(row.interrupts_per_req, null);
      assert.equal(row.vs_rpc_pct, null);
    } else {
      positive(row.kicks_per_req, `${at} kicks_per_req`);
      positive(row.interrupts_per_req, `${at} interrupts_per_req`);
      assert.ok(Number.isFinite(row.vs_rpc_pct), `${at} vs_rpc_pct`);
      // No serialized run to compare with.
      assert.equal(row.vs_serialized_pct, null);
    }
  }

  for (const k of ["parallel_over_serialized", "ring_over_rpc", "null_iops_max", "verify_errors"]) assert.ok(k in r.summary, k);
  assert.equal(r.summary.verify_errors, 0);
  // Defined on the null backend, which this run leaves out.
  assert.equal(r.summary.parallel_over_serialized, null);
  assert.equal(r.summary.ring_over_rpc, null);
  assert.equal(r.summary.null_iops_max, null);

  assert.deepEqual(
    leftovers().filter((f) => !before.has(f)),
    [],
  );
});
