import { test } from "node:test";
import assert from "node:assert/strict";
import { migration } from "@virtmesh/proto";
import { emptyRound, isFinalPhase, migrationStatus, phaseName, u32, type MigrationCounters } from "./status";

const P = migration.MigrationPhase;

function counters(over: Partial<MigrationCounters> = {}): MigrationCounters {
  return {
    id: "vm1-1",
    vm: "vm1",
    sourceHost: "src",
    destinationHost: "dst",
    phase: P.MIGRATION_PHASE_PRECOPY,
    params: migration.StartMigrationRequest.fromPartial({ vm: "vm1", destinationHost: "dst" }),
    downtimeLimitMs: 300,
    startedAtMs: 1000,
    nowMs: 3500,
    setupMs: 40,
    memoryBytes: 64 << 20,
    dirtySyncCount: 1,
    rounds: [],
    remainingPages: 10,
    skippedPages: 5,
    throttlePct: 20,
    expectedDowntimeMs: Infinity,
    actualDowntimeMs: 0,
    deviceStateBytes: 1000,
    deviceStateMs: 0,
    sourceChecksum: "",
    destinationChecksum: "",
    memoryMatch: false,
    error: "",
    traceId: "ab".repeat(16),
    ...over,
  };
}

test("status derives totals from the rounds and the last round's figures", () => {
  const r0 = { ...emptyRound(0), pages: 1000, zeroPages: 600, bytes: 400 * 4096, durationMs: 100, bandwidthBytesPerS: 16_384_000 };
  const r1 = { ...emptyRound(1), dirtyVcpu: 30, pages: 30, bytes: 30 * 4096, durationMs: 3, bandwidthBytesPerS: 40_000_000, dirtyRateBytesPerS: 123_000 };
  const r2 = { ...emptyRound(2), dirtyVcpu: 2, dirtyRateBytesPerS: 456 };
  const s = migrationStatus(counters({ rounds: [r0, r1, r2] }));
  assert.equal(s.transferredBytes, 430 * 4096 + 1000);
  assert.equal(s.zeroPages, 600);
  assert.equal(s.remainingBytes, 10 * 4096);
  assert.equal(s.dirtyRateBytesPerS, 456); // the last sync's
  assert.equal(s.bandwidthBytesPerS, 40_000_000); // the last round that sent
  assert.equal(s.pagesPerS, 10_000);
  assert.equal(s.totalMs, 2500);
  assert.equal(s.expectedDowntimeMs, 0xffffffff);
  assert.equal(s.rounds.length, 3);
  // It survives the JSON form KV and NATS carry.
  const back = migration.MigrationStatus.fromJSON(migration.MigrationStatus.toJSON(s));
  assert.deepEqual(back, s);
});

test("a final migration's total time stops at its end", () => {
  const s = migrationStatus(counters({ phase: P.MIGRATION_PHASE_COMPLETED, endedAtMs: 2000, nowMs: 9000 }));
  assert.equal(s.totalMs, 1000);
  assert.ok(isFinalPhase(s.phase));
  assert.ok(!isFinalPhase(P.MIGRATION_PHASE_CANCELLING));
  assert.equal(phaseName(P.MIGRATION_PHASE_STOP_AND_COPY), "stop-and-copy");
  assert.equal(u32(-3), 0);
  assert.equal(u32(2.6), 3);
});
