// Behaviour of the bench harness on a small guest (no timing assertions).
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { runBalloonBenchWith } from "./bench";

for (const handoff of ["thread", "loopback"] as const) test(`bench on a 64 MiB guest (${handoff} handoff): every mode inflates, memory is released, nothing is left behind`, async () => {
  const shmDir = existsSync("/dev/shm") ? "/dev/shm" : tmpdir();
  const r = await runBalloonBenchWith({ guestBytes: 64 << 20, inflateBytes: 56 << 20, reservedBytes: 4 << 20, shmDir, quick: true, pfnCoalescedRow: true, handoff });
  if (handoff === "thread" && String(r.params.guest_memory).includes("PUNCH_HOLE")) assert.ok(r.rows.every((x) => x.handoff === "thread"));
  if (handoff === "loopback") assert.ok(r.rows.every((x) => x.handoff === "loopback"));
  assert.equal(r.bench, "balloon");
  assert.deepEqual(r.rows.map((x) => x.mode), ["pfn", "pfn+host-coalesce", "bitmap", "reporting"]);
  const pfn = r.rows[0]!;
  assert.equal(pfn.release_calls, (56 << 20) / 4096, "PFN lists are released page by page");
  assert.equal(pfn.buffers, (56 << 20) / 4096 / 256);
  for (const row of r.rows) {
    for (const k of ["inflate_ms", "a_allocate_ms", "c_translate_ms", "d_release_ms", "deflate_ms"]) assert.ok(Number(row[k]) >= 0, `${row.mode} ${k}`);
    assert.ok(Math.abs(Number(row.a_pct) + Number(row.b_pct) + Number(row.c_pct) + Number(row.d_pct) - 100) < 0.5);
  }
  for (const k of ["pfn_ms", "bitmap_ms", "reporting_ms", "freed_bytes_bitmap", "bitmap_share_a_pct", "pfn_share_d_pct"]) assert.ok(k in r.summary, k);
  if (String(r.params.guest_memory).includes("PUNCH_HOLE")) {
    // The file's allocated bytes really drop by (about) the inflated amount.
    assert.ok(Number(r.summary.freed_bytes_bitmap) >= (56 << 20) * 0.95, `freed ${r.summary.freed_bytes_bitmap}`);
  }
  assert.equal(r.reference.pfn_ms, 4126);
  assert.ok(!readdirSync(shmDir).some((f) => f.startsWith(`virtmesh-balloon-bench-${process.pid}-`)), "guest memory file removed");
});
