// When pre-copy may stop (QEMU migration/migration.c migration_iteration_run and
// migration_completion) and how a guest that dirties faster than the link sends is slowed
// (migration/ram.c migration_trigger_throttle + mig_throttle_guest_down, auto-converge).
import { PAGE_SIZE } from "./bitmap";

/** QEMU's downtime-limit default (migration/options.c DEFAULT_MIGRATE_SET_DOWNTIME). */
export const DEFAULT_DOWNTIME_LIMIT_MS = 300;
/** QEMU's MAX_MIGRATE_DOWNTIME_SECONDS (2000 s). */
export const MAX_DOWNTIME_LIMIT_MS = 2_000_000;
export const DEFAULT_MAX_TOTAL_MS = 10 * 60_000;
/** An hour: past this a migration is a configuration mistake, not a policy. */
export const MAX_TOTAL_MS_LIMIT = 60 * 60_000;
/** cpu-throttle-initial, cpu-throttle-increment, max-cpu-throttle defaults (migration/options.c). */
export const DEFAULT_THROTTLE_INITIAL_PCT = 20;
export const DEFAULT_THROTTLE_INCREMENT_PCT = 10;
export const DEFAULT_THROTTLE_MAX_PCT = 99;
/** throttle-trigger-threshold default: dirtied bytes above this share of the bytes sent. */
export const DEFAULT_THROTTLE_TRIGGER_PCT = 50;
/** QEMU checks the throttle trigger once a dirty-sync period has lasted a second (migration_bitmap_sync). */
export const THROTTLE_PERIOD_MS = 1000;

/** Limits a migration runs under, defaults filled in. */
export interface MigrationLimits {
  bandwidthBytesPerS: number;
  downtimeLimitMs: number;
  maxTotalMs: number;
  autoConverge: boolean;
  throttleInitialPct: number;
  throttleIncrementPct: number;
  throttleMaxPct: number;
}

export interface MigrationLimitsInput {
  bandwidthBytesPerS?: number;
  downtimeLimitMs?: number;
  maxTotalMs?: number;
  autoConverge?: boolean;
  throttleInitialPct?: number;
  throttleIncrementPct?: number;
  throttleMaxPct?: number;
}

export class MigrationLimitError extends RangeError {
  override readonly name = "MigrationLimitError";
}

function inRange(what: string, v: number, dflt: number, min: number, max: number): number {
  if (v === 0) return dflt;
  if (!Number.isSafeInteger(v) || v < min || v > max) throw new MigrationLimitError(`${what} ${v} is out of range [${min}, ${max}] (0: default ${dflt})`);
  return v;
}

/** Fills in the proto's zero-means-default fields and checks each against QEMU's ranges. */
export function resolveLimits(req: MigrationLimitsInput): MigrationLimits {
  const bw = req.bandwidthBytesPerS ?? 0;
  if (!Number.isSafeInteger(bw) || bw < 0) throw new MigrationLimitError(`bandwidth ${bw} B/s is not a non-negative integer`);
  if (bw !== 0 && bw < PAGE_SIZE) throw new MigrationLimitError(`bandwidth ${bw} B/s is below one page per second`);
  const initial = inRange("throttle_initial_pct", req.throttleInitialPct ?? 0, DEFAULT_THROTTLE_INITIAL_PCT, 1, 99);
  const increment = inRange("throttle_increment_pct", req.throttleIncrementPct ?? 0, DEFAULT_THROTTLE_INCREMENT_PCT, 1, 99);
  const max = inRange("throttle_max_pct", req.throttleMaxPct ?? 0, DEFAULT_THROTTLE_MAX_PCT, 1, 99);
  if (initial > max) throw new MigrationLimitError(`throttle_initial_pct ${initial} is above throttle_max_pct ${max}`);
  return {
    bandwidthBytesPerS: bw,
    downtimeLimitMs: inRange("downtime_limit_ms", req.downtimeLimitMs ?? 0, DEFAULT_DOWNTIME_LIMIT_MS, 1, MAX_DOWNTIME_LIMIT_MS),
    maxTotalMs: inRange("max_total_ms", req.maxTotalMs ?? 0, DEFAULT_MAX_TOTAL_MS, 1, MAX_TOTAL_MS_LIMIT),
    autoConverge: req.autoConverge ?? false,
    throttleInitialPct: initial,
    throttleIncrementPct: increment,
    throttleMaxPct: max,
  };
}

/** Bytes per second over a measured span; 0 when nothing was measured. */
export function measuredBandwidth(bytes: number, elapsedUs: number): number {
  if (bytes <= 0 || elapsedUs <= 0) return 0;
  return Math.round((bytes * 1e6) / elapsedUs);
}

/**
 * Expected downtime: the memory still dirty sent at the measured bandwidth, plus the
 * fixed cost of stopping (device-state save, its transfer and load, the switchover's
 * checks). Infinity when pages remain and no bandwidth has been measured yet.
 */
export function expectedDowntimeMs(remainingPages: number, bandwidthBytesPerS: number, deviceStateMs: number, pageSize = PAGE_SIZE): number {
  const bytes = remainingPages * pageSize;
  if (bytes === 0) return deviceStateMs;
  if (bandwidthBytesPerS <= 0) return Infinity;
  return (bytes * 1000) / bandwidthBytesPerS + deviceStateMs;
}

/** migration_iteration_run: switch over once what is left fits in the downtime limit. */
export function shouldSwitchover(expectedMs: number, downtimeLimitMs: number): boolean {
  return expectedMs <= downtimeLimitMs;
}

/** Past max_total_ms the migration fails (it did not converge in time). */
export function pastMaxTotal(elapsedMs: number, maxTotalMs: number): boolean {
  return elapsedMs > maxTotalMs;
}

/** Dirty rate over a sync period: pages newly dirtied * page size / the period. */
export function dirtyRate(newDirtyPages: number, periodMs: number, pageSize = PAGE_SIZE): number {
  if (periodMs <= 0) return 0;
  return Math.round((newDirtyPages * pageSize * 1000) / periodMs);
}

export interface ThrottleDecision {
  /** The throttle to apply now (unchanged when `changed` is false). */
  pct: number;
  changed: boolean;
  /** A period ended at this sync and was judged. */
  periodEnded: boolean;
  /** Bytes dirtied and sent in the period just judged (0 when none ended). */
  bytesDirtiedPeriod: number;
  bytesTransferredPeriod: number;
}

export interface AutoConvergeParams {
  initialPct: number;
  incrementPct: number;
  maxPct: number;
  /** throttle-trigger-threshold; default 50. */
  triggerPct?: number;
  /** Period length; default THROTTLE_PERIOD_MS. */
  periodMs?: number;
}

/**
 * QEMU's auto-converge. At each dirty sync the period's dirtied and sent bytes add up;
 * once a period has lasted periodMs (migration_bitmap_sync's one-second check) it is
 * judged: dirtied > triggerPct % of sent counts one strike (dirty_rate_high_cnt), and
 * the second strike throttles (mig_throttle_guest_down): initial first, then +increment,
 * capped at max; the strike count starts over. As in QEMU, a period below the threshold
 * does not reset the strike count.
 */
export class AutoConverge {
  private readonly initial: number;
  private readonly increment: number;
  private readonly max: number;
  private readonly trigger: number;
  private readonly periodMs: number;
  private periodStart: number | undefined;
  private dirtiedBytes = 0;
  private transferredBytes = 0;
  /** rs->dirty_rate_high_cnt */
  dirtyRateHighCount = 0;
  /** cpu_throttle_get_percentage(); 0 = not active. */
  pct = 0;

  constructor(p: AutoConvergeParams) {
    this.initial = p.initialPct;
    this.increment = p.incrementPct;
    this.max = p.maxPct;
    this.trigger = p.triggerPct ?? DEFAULT_THROTTLE_TRIGGER_PCT;
    this.periodMs = p.periodMs ?? THROTTLE_PERIOD_MS;
  }

  /** Starts the first period (the end of setup). */
  start(nowMs: number): void {
    this.periodStart = nowMs;
    this.dirtiedBytes = 0;
    this.transferredBytes = 0;
  }

  /**
   * One dirty sync: bytes newly dirtied since the previous sync and bytes sent since
   * then. Returns the throttle to apply.
   */
  onSync(nowMs: number, bytesDirtied: number, bytesTransferred: number): ThrottleDecision {
    if (this.periodStart === undefined) this.periodStart = nowMs;
    this.dirtiedBytes += bytesDirtied;
    this.transferredBytes += bytesTransferred;
    const none = { pct: this.pct, changed: false, periodEnded: false, bytesDirtiedPeriod: 0, bytesTransferredPeriod: 0 };
    if (nowMs - this.periodStart < this.periodMs) return none;
    const dirtied = this.dirtiedBytes;
    const sent = this.transferredBytes;
    this.start(nowMs);
    const threshold = (sent * this.trigger) / 100;
    let changed = false;
    if (dirtied > threshold && ++this.dirtyRateHighCount >= 2) {
      this.dirtyRateHighCount = 0;
      const next = this.pct === 0 ? Math.min(this.initial, this.max) : Math.min(this.pct + this.increment, this.max);
      changed = next !== this.pct;
      this.pct = next;
    }
    return { pct: this.pct, changed, periodEnded: true, bytesDirtiedPeriod: dirtied, bytesTransferredPeriod: sent };
  }
}

/** The throttle steps auto-converge takes from 0: initial, +increment..., max. */
export function throttleSteps(initialPct: number, incrementPct: number, maxPct: number): number[] {
  const out = [Math.min(initialPct, maxPct)];
  while (out[out.length - 1]! < maxPct) out.push(Math.min(out[out.length - 1]! + incrementPct, maxPct));
  return out;
}
