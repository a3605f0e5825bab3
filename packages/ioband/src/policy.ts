// The policy method table of struct ioband_device (g_can_submit, g_prepare_bio,
// g_restart_bios, g_group_ctr, g_group_dtr, g_set_param, g_show_device, g_show_group),
// as an interface. Every method is pure with respect to the injected clock: `now` is
// passed in, in nanoseconds.
import type { IobandGroup, IobandRequest } from "./group";

export type PolicyName = "weight" | "weight-iosize" | "range-bw";
export const POLICY_NAMES: readonly PolicyName[] = ["weight", "weight-iosize", "range-bw"];

/** What a policy may read of its device. */
export interface IobandDeviceState<R extends IobandRequest> {
  readonly groups: readonly IobandGroup<R>[];
  /** g_issued: requests dispatched and not yet completed. */
  readonly issued: number;
  readonly ioThrottle: number;
  readonly ioLimit: number;
}

export interface IobandPolicy<R extends IobandRequest> {
  readonly name: PolicyName;
  /** g_group_ctr: initialise a new group with its parameter (null = default). 0 or -errno. */
  groupCtr(gp: IobandGroup<R>, param: string | null): number;
  /** g_group_dtr: the group is leaving the device (still in the group list, as in ioband_group_release). */
  groupDtr(gp: IobandGroup<R>): void;
  /** g_set_param: cmd null means the policy's own parameter (weight / range-bw). 0 or -errno. */
  setParam(gp: IobandGroup<R>, cmd: string | null, value: string | null): number;
  /** The device's io_limit changed: recompute buckets and per-group limits. */
  ioLimitChanged(): void;
  /** g_can_submit: 0 = no right now, else a priority (larger goes first). */
  canSubmit(gp: IobandGroup<R>, now: number): number;
  /** g_prepare_bio: charge a request that is being dispatched. */
  prepare(gp: IobandGroup<R>, bytes: number, urgent: boolean, now: number): void;
  /** g_restart_bios: nothing could be dispatched; true if a retry may now succeed. */
  restart(now: number): boolean;
  /** Earliest time (ns) at which a held request may become dispatchable without a completion. */
  nextWakeup(now: number): number | null;
  /** g_show_device text (" token=%d carryover=%d"), "" when the policy has none. */
  showDevice(): string;
  /** g_show_group text (" weight=%d" / " range-bw=%d:%d"). */
  showGroup(gp: IobandGroup<R>): string;
}
