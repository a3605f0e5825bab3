// The "weight" and "weight-iosize" policies of dm-ioband (drivers/md/dm-ioband-policy.c,
// with the seed's g_show_device / g_show_group hunks): tokens per epoch proportional
// to each group's weight, a new global epoch when the active groups have spent theirs,
// leftover tokens carried into the next epoch, and a group that sat out several epochs
// refilled for at most g_carryover of them.
import type { IobandGroup, IobandRequest } from "./group";
import type { IobandDeviceState, IobandPolicy } from "./policy";
import { EINVAL, INT_MAX, SHORT_MAX, strictStrtol } from "./strtol";

export const DEFAULT_WEIGHT = 100;
export const DEFAULT_TOKENPOOL = 2048;
const DEFAULT_BUCKET = 2;
const IOBAND_IOPRIO_BASE = 100;
const TOKEN_BATCH_UNIT = 20;
const PROCEED_THRESHOLD = 8;
const LOCAL_ACTIVE_RATIO = 8;
const GLOBAL_ACTIVE_RATIO = 16;
const OVERCOMMIT_RATE = 4;
/** PAGE_SHIFT - 9: weight-iosize counts 512-byte sectors, its bucket is 8x larger. */
const IOSIZE_TOKEN_UNIT = 3;

const idiv = (a: number, b: number): number => Math.trunc(a / b);

export class WeightPolicy<R extends IobandRequest> implements IobandPolicy<R> {
  readonly name: "weight" | "weight-iosize";
  // struct ioband_device members of the weight policy.
  epoch = 0;
  weightTotal = 0;
  tokenBucket = 0;
  carryover = 0;
  tokenLeft = 0;
  tokenExtra = 0;
  private readonly tokenUnit: number;
  private current: IobandGroup<R> | null = null;
  private dominant: IobandGroup<R> | null = null;
  /** g_expired: kept for parity with the C state; read by nothing else here. */
  expired: IobandGroup<R> | null = null;
  private yieldMark = 0;

  /**
   * policy_weight_init / w2_policy_weight_init. `tokenPool` is the optional table
   * argument (0 = DEFAULT_TOKENPOOL); negative is -EINVAL there, a thrown error here.
   */
  constructor(
    private readonly dev: IobandDeviceState<R>,
    iosize: boolean,
    tokenPool = 0,
  ) {
    if (!Number.isInteger(tokenPool) || tokenPool < 0) throw new RangeError("weight policy: token pool must be a non-negative integer");
    this.name = iosize ? "weight-iosize" : "weight";
    this.tokenUnit = iosize ? IOSIZE_TOKEN_UNIT : 0;
    this.initTokenBucket(tokenPool);
    this.tokenLeft = this.tokenBucket;
  }

  /** init_token_bucket(): the bucket follows io_limit; the pool sets how many epochs carry over. */
  private initTokenBucket(val: number): void {
    this.tokenBucket = (this.dev.ioLimit * 2 * DEFAULT_BUCKET) << this.tokenUnit;
    if (!val) val = DEFAULT_TOKENPOOL << this.tokenUnit;
    if (val < this.tokenBucket) val = this.tokenBucket;
    this.carryover = idiv(val, this.tokenBucket);
    this.tokenLeft = 0;
  }

  /** set_weight(): every weight change re-deals the tokens and queue limits of all groups. */
  private setWeight(gp: IobandGroup<R>, w: number): void {
    this.weightTotal += w - gp.weight;
    gp.weight = w;
    const groups = this.dev.groups;
    if (this.weightTotal === 0) {
      for (const p of groups) p.token = p.tokenInitial = p.limit = 1;
    } else {
      for (const p of groups) {
        p.token = p.tokenInitial = idiv(this.tokenBucket * p.weight, this.weightTotal) + 1;
        p.limit = idiv(idiv(this.dev.ioLimit * 2 * p.weight, this.weightTotal), OVERCOMMIT_RATE) + 1;
      }
    }
  }

  groupCtr(gp: IobandGroup<R>, param: string | null): number {
    gp.myEpoch = this.epoch;
    gp.weight = 0;
    gp.consumed = 0;
    return this.setParam(gp, "weight", param);
  }

  groupDtr(gp: IobandGroup<R>): void {
    this.setWeight(gp, 0);
    this.dominant = null;
    this.expired = null;
    if (this.current === gp) this.current = null;
  }

  /** policy_weight_param() as patched by the seed (`!cmd ||` for blkio.settings). */
  setParam(gp: IobandGroup<R>, cmd: string | null, value: string | null): number {
    const val = value === null ? null : strictStrtol(value);
    if (cmd === null || cmd === "weight") {
      if (value === null) this.setWeight(gp, DEFAULT_WEIGHT);
      else if (val !== null && 0 < val && val <= SHORT_MAX) this.setWeight(gp, val);
      else return -EINVAL;
      return 0;
    }
    if (cmd === "token") {
      // The kernel reads an uninitialised val when no value is given, and truncates a
      // long into int: both are refused here.
      if (val !== null && val > 0 && val <= INT_MAX) {
        this.initTokenBucket(val);
        this.setWeight(gp, gp.weight);
        this.tokenExtra = 0;
        return 0;
      }
      return -EINVAL;
    }
    if (cmd === "io_limit") {
      this.ioLimitChanged();
      return 0;
    }
    return -EINVAL;
  }

  ioLimitChanged(): void {
    this.initTokenBucket(this.tokenBucket * this.carryover);
    const first = this.dev.groups[0];
    if (first) this.setWeight(first, first.weight);
  }

  /** get_token(): the tokens a group would have, counting epochs it has not claimed yet. */
  private getToken(gp: IobandGroup<R>): number {
    let token = gp.token;
    let allowance = this.epoch - gp.myEpoch;
    if (allowance) {
      if (allowance > this.carryover) allowance = this.carryover;
      token += gp.tokenInitial * allowance;
    }
    return token;
  }

  /** get_token() for inspection: the tokens a group could spend right now. */
  effectiveTokens(gp: IobandGroup<R>): number {
    return this.getToken(gp);
  }

  /** iopriority(): the fraction of its epoch's tokens a group still holds, 1..(100 x carryover). */
  private iopriority(gp: IobandGroup<R>): number {
    return idiv(this.getToken(gp) * IOBAND_IOPRIO_BASE, gp.tokenInitial) + 1;
  }

  /** make_epoch(): claim the epochs this group missed, at most g_carryover of them. */
  private makeEpoch(gp: IobandGroup<R>): number {
    let allowance = this.epoch - gp.myEpoch;
    if (!allowance) return 0;
    if (allowance > this.carryover) allowance = this.carryover;
    gp.myEpoch = this.epoch;
    return allowance;
  }

  /** is_token_left(): g_can_submit. */
  canSubmit(gp: IobandGroup<R>, _now: number): number {
    if (gp.token > 0) return this.iopriority(gp);
    const allowance = this.makeEpoch(gp);
    if (!allowance) return 0;
    let delta = gp.tokenInitial * allowance;
    this.tokenLeft -= delta;
    // Leftover tokens of the previous epoch are shared out in proportion to weight.
    const extra = idiv(this.tokenExtra * gp.tokenInitial, this.tokenBucket - idiv(this.tokenExtra, 2));
    delta += extra;
    gp.token += delta;
    gp.consumed = 0;
    if (gp === this.current) this.yieldMark += delta;
    return gp.token > 0 ? this.iopriority(gp) : 0;
  }

  /** prepare_token() / w2_prepare_token() -> consume_token(). */
  prepare(gp: IobandGroup<R>, bytes: number, urgent: boolean, _now: number): void {
    const count = this.tokenUnit === 0 ? 1 : Math.max(1, Math.ceil(bytes / 512));
    if (gp.consumed * LOCAL_ACTIVE_RATIO < gp.tokenInitial && gp.consumed * GLOBAL_ACTIVE_RATIO < this.tokenBucket) {
      // Not really active yet: it cannot hold back a new epoch.
    } else if (!this.dominant || this.getToken(gp) > this.getToken(this.dominant)) {
      this.dominant = gp;
    }
    if (this.epoch === gp.myEpoch && gp.token > 0 && gp.token - count <= 0) {
      this.expired = gp;
      if (this.dominant === gp) this.dominant = null;
    }
    if (gp !== this.current) {
      this.current = gp;
      this.yieldMark = gp.token - (TOKEN_BATCH_UNIT << this.tokenUnit);
    }
    // Tokens may go negative: a debt paid from the next epoch (urgent requests too).
    gp.token -= count;
    gp.consumed += count;
    if (gp.token <= this.yieldMark && !urgent) this.current = null; // R_YIELD
  }

  /**
   * make_global_epoch(): g_restart_bios. Refused while the dominant group still holds
   * more than 1/PROCEED_THRESHOLD of its tokens and io_throttle requests are in flight:
   * below io_throttle the device is lightly loaded and anyone may proceed.
   */
  restart(_now: number): boolean {
    const gp = this.dominant;
    if (gp) {
      const iopri = this.iopriority(gp);
      if (iopri * PROCEED_THRESHOLD > IOBAND_IOPRIO_BASE && this.dev.issued >= this.dev.ioThrottle) return false;
    }
    this.epoch++;
    this.tokenExtra = this.tokenLeft;
    if (this.tokenExtra < 0) this.tokenExtra = 0;
    this.tokenLeft = this.tokenBucket;
    this.expired = null;
    this.dominant = null;
    return true;
  }

  nextWakeup(_now: number): number | null {
    return null; // epochs advance on dispatch and completion, not on time
  }

  /** policy_weight_show_device: seq_printf(m, " token=%d carryover=%d", g_token_bucket, g_carryover) */
  showDevice(): string {
    return ` token=${this.tokenBucket} carryover=${this.carryover}`;
  }

  /** policy_weight_show_group: seq_printf(m, " weight=%d", gp->c_weight) */
  showGroup(gp: IobandGroup<R>): string {
    return ` weight=${gp.weight}`;
  }
}
