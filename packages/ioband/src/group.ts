// struct ioband_group: one blkio cgroup's share of an ioband device, with its own
// queue of held requests (c_blocked_bios). Policy state lives here as plain fields,
// like the C struct, so the hot path touches no maps and allocates nothing.
import type { IobandHead } from "./device";

/** What the scheduler needs from the caller's request object; it only queues references. */
export interface IobandRequest {
  /** Payload size in bytes (range-bw and weight-iosize charge by size). */
  readonly bytes: number;
  /** The blkio cgroup id the request is charged to (get_blkio_cgroup_id). */
  readonly cgroupId: number;
  /** Must not wait behind the throttle (flush, FUA): dm-ioband's g_urgent_bios. */
  readonly urgent?: boolean;
}

/** A growable ring of request references; grows by doubling, never shrinks. */
export class RequestQueue<R> {
  private buf: (R | undefined)[];
  private head = 0;
  length = 0;

  constructor(capacity = 16) {
    this.buf = new Array<R | undefined>(capacity).fill(undefined);
  }

  push(r: R): void {
    if (this.length === this.buf.length) this.grow();
    this.buf[(this.head + this.length) % this.buf.length] = r;
    this.length++;
  }

  shift(): R | undefined {
    if (this.length === 0) return undefined;
    const r = this.buf[this.head];
    this.buf[this.head] = undefined;
    this.head = (this.head + 1) % this.buf.length;
    this.length--;
    return r;
  }

  peek(): R | undefined {
    return this.length === 0 ? undefined : this.buf[this.head];
  }

  private grow(): void {
    const next = new Array<R | undefined>(this.buf.length * 2).fill(undefined);
    for (let i = 0; i < this.length; i++) next[i] = this.buf[(this.head + i) % this.buf.length];
    this.buf = next;
    this.head = 0;
  }
}

export class IobandGroup<R extends IobandRequest = IobandRequest> {
  /** c_blocked_bios: requests held until the policy lets them go. */
  readonly queue = new RequestQueue<R>();
  /** c_limit: held requests beyond which the submitter must block (g_should_block). */
  limit = 1;
  /** Index in the device's group list (g_groups), for round-robin tie breaking. */
  index = -1;

  // Counters for settings/stats and the benches.
  dispatchedIos = 0;
  dispatchedBytes = 0;

  // weight policy (dm-ioband-policy.c): c_weight, c_token, c_token_initial, c_my_epoch, c_consumed
  weight = 0;
  token = 0;
  tokenInitial = 0;
  myEpoch = 0;
  consumed = 0;

  // range-bw policy: c_min_bw / c_max_bw in KiB/s as configured, buckets in bytes.
  minBw = 0;
  maxBw = 0;
  minTokens = 0;
  maxTokens = 0;
  refilledAt = 0;
  /** Leftover dispatches of the device when this group last had one (fair sharing of the leftover). */
  leftoverStamp = 0;

  constructor(
    /** The blkio cgroup id (c_id); ROOT_CGROUP_ID for the head's default group. */
    readonly id: number,
    readonly head: IobandHead<R>,
  ) {}
}
