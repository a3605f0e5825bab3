// The status record users read (QEMU's query-migrate / `info migrate`), built from the
// engine's counters so that every consumer (KV, NATS, WatchMigration, the CLI) sees the
// same derived figures.
import { migration } from "@virtmesh/proto";
import { PAGE_SIZE } from "./bitmap";

const P = migration.MigrationPhase;
type Phase = migration.MigrationPhase;
const U32_MAX = 0xffffffff;

export const FINAL_PHASES: readonly Phase[] = [P.MIGRATION_PHASE_COMPLETED, P.MIGRATION_PHASE_FAILED, P.MIGRATION_PHASE_CANCELLED];

export function isFinalPhase(p: Phase): boolean {
  return FINAL_PHASES.includes(p);
}

const NAMES: Record<number, string> = {
  [P.MIGRATION_PHASE_UNSPECIFIED]: "unspecified",
  [P.MIGRATION_PHASE_SETUP]: "setup",
  [P.MIGRATION_PHASE_PRECOPY]: "pre-copy",
  [P.MIGRATION_PHASE_STOP_AND_COPY]: "stop-and-copy",
  [P.MIGRATION_PHASE_COMPLETED]: "completed",
  [P.MIGRATION_PHASE_FAILED]: "failed",
  [P.MIGRATION_PHASE_CANCELLED]: "cancelled",
  [P.MIGRATION_PHASE_CANCELLING]: "cancelling",
};

/** "setup", "pre-copy", "stop-and-copy", "completed", ... */
export function phaseName(p: Phase): string {
  return NAMES[p] ?? `phase ${p}`;
}

/** A uint32 field from a figure that may be fractional or infinite. */
export function u32(v: number): number {
  if (!Number.isFinite(v)) return v > 0 ? U32_MAX : 0;
  return Math.max(0, Math.min(U32_MAX, Math.round(v)));
}

/** A uint64 field (as a JS number) from a figure that may be fractional. */
export function u64(v: number): number {
  if (!Number.isFinite(v)) return v > 0 ? Number.MAX_SAFE_INTEGER : 0;
  return Math.max(0, Math.min(Number.MAX_SAFE_INTEGER, Math.round(v)));
}

/** What the engine counts; everything in MigrationStatus derives from it. */
export interface MigrationCounters {
  id: string;
  vm: string;
  sourceHost: string;
  destinationHost: string;
  phase: Phase;
  params: migration.StartMigrationRequest;
  downtimeLimitMs: number;
  startedAtMs: number;
  /** Epoch ms now (the record's updated_at). */
  nowMs: number;
  /** Epoch ms the migration reached a final phase. */
  endedAtMs?: number;
  setupMs: number;
  /** Guest memory. */
  memoryBytes: number;
  pageSize?: number;
  /** SyncDirty calls made (QEMU's dirty-sync-count). */
  dirtySyncCount: number;
  rounds: migration.PrecopyRound[];
  remainingPages: number;
  skippedPages: number;
  throttlePct: number;
  expectedDowntimeMs: number;
  actualDowntimeMs: number;
  deviceStateBytes: number;
  deviceStateMs: number;
  sourceChecksum: string;
  destinationChecksum: string;
  memoryMatch: boolean;
  error: string;
  traceId: string;
}

/** The MigrationStatus for a set of counters. */
export function migrationStatus(c: MigrationCounters): migration.MigrationStatus {
  const pageSize = c.pageSize ?? PAGE_SIZE;
  let memBytes = 0;
  let zeroPages = 0;
  for (const r of c.rounds) {
    memBytes += r.bytes;
    zeroPages += r.zeroPages;
  }
  const last = c.rounds[c.rounds.length - 1];
  let lastSent: migration.PrecopyRound | undefined;
  for (let i = c.rounds.length - 1; i >= 0 && !lastSent; i--) if (c.rounds[i]!.pages > 0) lastSent = c.rounds[i];
  const end = c.endedAtMs ?? c.nowMs;
  return {
    id: c.id,
    vm: c.vm,
    sourceHost: c.sourceHost,
    destinationHost: c.destinationHost,
    phase: c.phase,
    round: c.dirtySyncCount,
    transferredBytes: u64(memBytes + c.deviceStateBytes),
    remainingBytes: u64(c.remainingPages * pageSize),
    dirtyRateBytesPerS: u64(last?.dirtyRateBytesPerS ?? 0),
    throttlePct: u32(c.throttlePct),
    expectedDowntimeMs: u32(c.expectedDowntimeMs),
    actualDowntimeMs: u32(c.actualDowntimeMs),
    totalMs: u64(end - c.startedAtMs),
    error: c.error,
    traceId: c.traceId,
    setupMs: u64(c.setupMs),
    totalBytes: u64(c.memoryBytes),
    pagesPerS: lastSent && lastSent.durationMs > 0 ? u64((lastSent.pages * 1000) / lastSent.durationMs) : 0,
    bandwidthBytesPerS: u64(lastSent?.bandwidthBytesPerS ?? 0),
    downtimeLimitMs: u32(c.downtimeLimitMs),
    zeroPages: u64(zeroPages),
    skippedPages: u64(c.skippedPages),
    deviceStateBytes: u64(c.deviceStateBytes),
    deviceStateMs: u32(c.deviceStateMs),
    rounds: c.rounds.map((r) => ({ ...r })),
    startedAtMs: u64(c.startedAtMs),
    updatedAtMs: u64(c.nowMs),
    sourceChecksum: c.sourceChecksum,
    destinationChecksum: c.destinationChecksum,
    memoryMatch: c.memoryMatch,
    params: { ...c.params },
  };
}

/** An empty round record. */
export function emptyRound(round: number): migration.PrecopyRound {
  return {
    round,
    dirtyVcpu: 0,
    dirtyDevice: 0,
    dirtyVfio: 0,
    pages: 0,
    zeroPages: 0,
    bytes: 0,
    durationMs: 0,
    bandwidthBytesPerS: 0,
    dirtyRateBytesPerS: 0,
    expectedDowntimeMs: 0,
    throttlePct: 0,
  };
}
