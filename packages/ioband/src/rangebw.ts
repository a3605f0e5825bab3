// The "range-bw" policy (drivers/md/dm-ioband-rangebw.c, with the seed's
// policy_range_bw_show_group): each group gets at least min and at most max KiB/s.
// dm-ioband does this with per-second token periods and time slices driven by
// jiffies and a kernel timer; here each group has two token buckets in bytes driven
// by the injected clock, which keeps the same contract (groups under their minimum
// go first, no group exceeds its maximum) and gives the worker an exact wakeup time.
import type { IobandGroup, IobandRequest } from "./group";
import type { IobandDeviceState, IobandPolicy } from "./policy";
import { EINVAL, INT_MAX, simpleStrtol, strictStrtol } from "./strtol";

const NS_PER_S = 1e9;
/** Bytes per configured unit: dm-ioband's bandwidths are "Kbyte unit" (convert_bw_to_token). */
export const RANGE_BW_UNIT_BYTES = 1024;
/** A group owed service may bank up to time_slice_base (HZ/10) of its minimum. */
const MIN_BURST_NS = 100_000_000;
/** ... and may run ahead of its maximum by at most range_time_slice_base (HZ/50). */
export const RANGE_BW_MAX_BURST_NS = 20_000_000;
const MAX_BURST_NS = RANGE_BW_MAX_BURST_NS;
/** MINBW_IO_MODE priorities sit above every leftover priority. */
const MINBW_PRIO_BASE = 1_000;
const OVER_IO_RATE = 4;
/** POLICY_PARAM_DELIM */
const DELIMS = "=:,";

export class RangeBwPolicy<R extends IobandRequest> implements IobandPolicy<R> {
  readonly name = "range-bw" as const;
  /** g_min_bw_total / g_max_bw_total in KiB/s. */
  minBwTotal = 0;
  maxBwTotal = 0;
  /** Leftover dispatches so far: the longer a group has waited for one, the higher it goes. */
  private leftoverSeq = 0;

  constructor(
    private readonly dev: IobandDeviceState<R>,
    private readonly clock: () => number,
  ) {}

  groupCtr(gp: IobandGroup<R>, param: string | null): number {
    gp.minBw = 0;
    gp.maxBw = 0;
    gp.refilledAt = this.clock();
    return this.setParam(gp, "range-bw", param);
  }

  groupDtr(gp: IobandGroup<R>): void {
    this.setRangeBw(gp, 0, 0);
  }

  /**
   * policy_range_bw_param(). "range-bw" takes "min:max" (any of "=:,"), checked as
   * the seed checks it: 0 <= min <= INT_MAX/2, 0 <= max <= INT_MAX/2, min <= max.
   * Not copied: with no delimiter the C code's strchr() matches the terminating NUL
   * and parses past the end of the string; an empty number parses as 0; and the
   * "min-bw"/"max-bw" commands test a `val` that is never parsed.
   */
  setParam(gp: IobandGroup<R>, cmd: string | null, value: string | null): number {
    if (cmd === null || cmd === "range-bw") {
      let min = 0;
      let max = 0; // DEFAULT_RANGE_BW "0:0"
      if (value !== null) {
        const a = simpleStrtol(value, 0);
        if (a.end === 0 || a.end >= value.length || !DELIMS.includes(value[a.end]!)) return -EINVAL;
        const b = simpleStrtol(value, a.end + 1);
        if (b.end === a.end + 1 || b.end !== value.length) return -EINVAL;
        min = a.value;
        max = b.value;
      }
      if (!(0 <= min && min <= INT_MAX / 2 && 0 <= max && max <= INT_MAX / 2 && min <= max)) return -EINVAL;
      this.setRangeBw(gp, min, max);
      return 0;
    }
    if (cmd === "min-bw" || cmd === "max-bw") {
      const val = value === null ? null : strictStrtol(value);
      if (val === null || val < 0 || val > INT_MAX / 2) return -EINVAL;
      if (cmd === "min-bw") {
        if (gp.maxBw !== 0 && val > gp.maxBw) return -EINVAL;
        this.setRangeBw(gp, val, gp.maxBw);
      } else {
        if (val !== 0 && val < gp.minBw) return -EINVAL;
        this.setRangeBw(gp, gp.minBw, val);
      }
      return 0;
    }
    return -EINVAL;
  }

  /** set_range_bw(): totals, and c_limit in proportion to the minimum (OVER_IO_RATE). */
  private setRangeBw(gp: IobandGroup<R>, min: number, max: number): void {
    this.minBwTotal += min - gp.minBw;
    this.maxBwTotal += max - gp.maxBw;
    gp.minBw = min;
    gp.maxBw = max;
    // A new range starts with full buckets.
    gp.minTokens = (min * RANGE_BW_UNIT_BYTES * MIN_BURST_NS) / NS_PER_S;
    gp.maxTokens = (max * RANGE_BW_UNIT_BYTES * MAX_BURST_NS) / NS_PER_S;
    this.ioLimitChanged();
  }

  ioLimitChanged(): void {
    for (const p of this.dev.groups) {
      p.limit = this.minBwTotal === 0 ? 1 : Math.trunc((this.dev.ioLimit * 2 * p.minBw) / this.minBwTotal / OVER_IO_RATE) + 1;
    }
  }

  private refill(gp: IobandGroup<R>, now: number): void {
    const dt = now - gp.refilledAt;
    if (dt <= 0) return;
    gp.refilledAt = now;
    if (gp.minBw > 0) {
      const rate = gp.minBw * RANGE_BW_UNIT_BYTES;
      const cap = (rate * MIN_BURST_NS) / NS_PER_S;
      gp.minTokens = Math.min(cap, gp.minTokens + (rate * dt) / NS_PER_S);
    }
    if (gp.maxBw > 0) {
      const rate = gp.maxBw * RANGE_BW_UNIT_BYTES;
      const cap = (rate * MAX_BURST_NS) / NS_PER_S;
      gp.maxTokens = Math.min(cap, gp.maxTokens + (rate * dt) / NS_PER_S);
    }
  }

  /**
   * has_right_to_issue() / range_bw_priority(): over the maximum -> no right
   * (NO_IO_MODE); under the minimum -> MINBW_IO_MODE, the more it is owed the
   * sooner; otherwise the leftover bandwidth, only while fewer than io_throttle
   * requests are in flight, so that a group owed its minimum never queues behind
   * a deep backlog of leftover I/O.
   */
  canSubmit(gp: IobandGroup<R>, now: number): number {
    this.refill(gp, now);
    if (gp.maxBw > 0 && gp.maxTokens <= 0) return 0;
    if (gp.minBw > 0 && gp.minTokens > 0) {
      const cap = (gp.minBw * RANGE_BW_UNIT_BYTES * MIN_BURST_NS) / NS_PER_S;
      return MINBW_PRIO_BASE + Math.trunc((gp.minTokens * MINBW_PRIO_BASE) / cap);
    }
    if (this.dev.issued >= this.dev.ioThrottle) return 0;
    // LEFTOVER_IO_MODE: dm-ioband draws a random priority; least recently served is
    // the deterministic equivalent.
    return 1 + Math.min(MINBW_PRIO_BASE - 2, this.leftoverSeq - gp.leftoverStamp);
  }

  /** range_bw_prepare_token(): charge the bytes against both buckets. */
  prepare(gp: IobandGroup<R>, bytes: number, _urgent: boolean, now: number): void {
    this.refill(gp, now);
    if (!(gp.minBw > 0 && gp.minTokens > 0)) gp.leftoverStamp = ++this.leftoverSeq;
    if (gp.minBw > 0) {
      // Service beyond the minimum is not a debt against it: floor at one burst.
      const cap = (gp.minBw * RANGE_BW_UNIT_BYTES * MIN_BURST_NS) / NS_PER_S;
      gp.minTokens = Math.max(-cap, gp.minTokens - bytes);
    }
    if (gp.maxBw > 0) gp.maxTokens -= bytes;
  }

  /** range_bw_restart_bios() returns 1: only time (or a completion) helps. */
  restart(_now: number): boolean {
    return false;
  }

  /** Replaces range_bw_timer_register(): when the first capped or owed group gets tokens. */
  nextWakeup(now: number): number | null {
    let best: number | null = null;
    const throttled = this.dev.issued >= this.dev.ioThrottle;
    for (const gp of this.dev.groups) {
      if (gp.queue.length === 0) continue;
      const dt = Math.max(0, now - gp.refilledAt);
      let wait = 0;
      if (gp.maxBw > 0) {
        const rate = gp.maxBw * RANGE_BW_UNIT_BYTES;
        const tokens = gp.maxTokens + (rate * dt) / NS_PER_S;
        if (tokens <= 0) wait = Math.ceil((-tokens * NS_PER_S) / rate) + 1;
      }
      if (wait === 0 && throttled) {
        if (gp.minBw === 0) continue; // leftover waits for a completion
        const rate = gp.minBw * RANGE_BW_UNIT_BYTES;
        const tokens = gp.minTokens + (rate * dt) / NS_PER_S;
        if (tokens <= 0) wait = Math.ceil((-tokens * NS_PER_S) / rate) + 1;
      }
      const t = now + wait;
      if (best === null || t < best) best = t;
    }
    return best;
  }

  /** g_show_device is NULL for range-bw: nothing after io_limit. */
  showDevice(): string {
    return "";
  }

  /** policy_range_bw_show_group: seq_printf(m, " range-bw=%d:%d", gp->c_min_bw, gp->c_max_bw) */
  showGroup(gp: IobandGroup<R>): string {
    return ` range-bw=${gp.minBw}:${gp.maxBw}`;
  }
}
