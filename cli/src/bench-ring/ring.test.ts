// Smoke run of `virtmesh bench ring` at a tiny scale: the result has the bench
// contract's shape, every figure is a finite number the run measured, and the
// run leaves no process and no shared-memory file behind. No timing assertions.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { IN_FLIGHT, runRingBench } from "./ring";

let shmParent = "";
const savedShmDir = process.env.VIRTMESH_SHM_DIR;

before(() => {
  // A private parent for the bench's virtmesh-bench-* directory, so the test
  // can see that it was removed (other runs may use /dev/shm concurrently).
  shmParent = mkdtempSync(join("/dev/shm", "virtmesh-test-ring-"));
  process.env.VIRTMESH_SHM_DIR = shmParent;
});

after(() => {
  if (savedShmDir === undefined) delete process.env.VIRTMESH_SHM_DIR;
  else process.env.VIRTMESH_SHM_DIR = savedShmDir;
  rmSync(shmParent, { recursive: true, force: true });
});

function children(): string[] {
  const f = `/proc/${process.pid}/task/${process.pid}/children`;
  try {
    return readFileSync(f, "utf8").trim().split(/\s+/).filter(Boolean);
  } catch {
    return []; // kernel without CONFIG_PROC_CHILDREN: not checkable here
  }
}

const positive = (what: string, v: unknown): void => {
  assert.equal(typeof v, "number", `${what} is not a number: ${String(v)}`);
  assert.ok(Number.isFinite(v as number) && (v as number) > 0, `${what} is not a positive finite number: ${String(v)}`);
};
const nonNegative = (what: string, v: unknown): void => {
  assert.equal(typeof v, "number", `${what} is not a number: ${String(v)}`);
  assert.ok(Number.isFinite(v as number) && (v as number) >= 0, `${what} is not a finite number >= 0: ${String(v)}`);
};

test("bench ring: contract shape, measured figures, nothing left behind", { timeout: 25_000 }, async () => {
  const lines: string[] = [];
  const r = await runRingBench({ quick: true, measureMs: 150, warmupMs: 30, bareMessages: 200_000, onProgress: (l) => lines.push(l) });

  assert.deepEqual(Object.keys(r).sort(), ["bench", "machine", "params", "reference", "rows", "summary"]);
  assert.equal(r.bench, "ring");
  positive("machine.cpus", r.machine.cpus);
  assert.equal(r.params.in_flight, IN_FLIGHT);
  assert.ok(lines.length > 0, "progress was reported");

  // Four transports at two depths, plus the bare ring.
  const transports = ["shm virtqueue", "gRPC unary", "gRPC bidi stream", "NATS request/reply"];
  assert.equal(r.rows.length, transports.length * 2 + 1);
  for (const t of transports) {
    for (const depth of [IN_FLIGHT, 1]) {
      const row = r.rows.find((x) => x.transport === t && x.in_flight === depth);
      assert.ok(row, `row ${t} in_flight=${depth}`);
      for (const k of ["requests", "msgs_per_s", "p50_us", "p99_us"]) positive(`${t}/${depth} ${k}`, row[k]);
      assert.ok((row.p99_us as number) >= (row.p50_us as number), `${t}/${depth}: p99 >= p50`);
      if (t === "shm virtqueue") {
        // Syscall-making doorbell rings per request: 0 is a legitimate measurement.
        nonNegative(`${t}/${depth} kicks_per_request`, row.kicks_per_request);
        nonNegative(`${t}/${depth} interrupts_per_request`, row.interrupts_per_request);
      } else {
        assert.equal(row.kicks_per_request, null);
        assert.equal(row.interrupts_per_request, null);
      }
    }
  }
  const bare = r.rows.find((x) => String(x.transport).startsWith("bare"));
  assert.ok(bare);
  positive("bare msgs_per_s", bare.msgs_per_s);
  assert.equal(bare.requests, 200_000);

  for (const k of ["ring_msgs_per_s", "grpc_msgs_per_s", "grpc_stream_msgs_per_s", "nats_msgs_per_s", "bare_ring_msgs_per_s", "ring_rtt_p50_us", "ring_over_grpc"]) {
    positive(`summary.${k}`, r.summary[k]);
  }
  nonNegative("summary.kicks_per_request", r.summary.kicks_per_request);
  nonNegative("summary.interrupts_per_request", r.summary.interrupts_per_request);
  // The summary is the in_flight=IN_FLIGHT rows, not typed in.
  const ringRow = r.rows.find((x) => x.transport === "shm virtqueue" && x.in_flight === IN_FLIGHT)!;
  assert.equal(r.summary.ring_msgs_per_s, ringRow.msgs_per_s);
  assert.equal(r.summary.kicks_per_request, ringRow.kicks_per_request);

  assert.equal(r.reference.bare_ring_msgs_per_s, 38_000_000);
  assert.equal(JSON.parse(JSON.stringify(r)).bench, "ring", "serialisable as the --json file");

  // Cleanup: the shared file's directory is gone, the peer and nats-server exited.
  assert.deepEqual(readdirSync(shmParent), []);
  assert.deepEqual(children(), []);
});
