// struct ioband_device: one shared backend ("share") and the requests of every VM
// using it. The vhost-worker calls submit() for each request, complete() when the
// backend finishes one, nextDispatchable() to pull what may go now, and nextWakeup()
// to know how long it may sleep. Pure: time comes from the injected clock (ns).
import { IobandGroup, type IobandRequest } from "./group";
import type { IobandDeviceState, IobandPolicy, PolicyName } from "./policy";
import { RangeBwPolicy } from "./rangebw";
import { ROOT_CGROUP_ID } from "./cgroup";
import { EBUSY, EEXIST, EINVAL, SHORT_MAX, strictStrtol, simpleStrtol } from "./strtol";
import { WeightPolicy } from "./weight";

export const DEFAULT_IO_THROTTLE = 4;
export const DEFAULT_IO_LIMIT = 128;
/** IOBAND_NAME_MAX */
export const IOBAND_NAME_MAX = 31;
/** New epochs tried in one nextDispatchable() before a held group is let through anyway. */
const MAX_RESTARTS = 8;

/**
 * What submit() did with a request:
 * - "dispatch": issue it to the backend now;
 * - "urgent": issue it now, it bypassed the throttle (g_urgent_bios);
 * - "queued": held; it will come out of nextDispatchable();
 * - "queued-block": held, and the group's queue is full (g_should_block): the
 *   submitter must not submit more for this group until shouldBlock() is false.
 */
export type SubmitResult = "dispatch" | "urgent" | "queued" | "queued-block";

/** A dm-ioband target mapped over the share (ti->private's head group and its children). */
export class IobandHead<R extends IobandRequest = IobandRequest> {
  /** The head group stands for the root cgroup (id 1) and every unattached cgroup. */
  readonly defaultGroup: IobandGroup<R>;
  /** c_group_root: attached blkio cgroups by id. */
  readonly groups = new Map<number, IobandGroup<R>>();

  constructor(
    readonly name: string,
    readonly device: IobandDevice<R>,
  ) {
    this.defaultGroup = new IobandGroup<R>(ROOT_CGROUP_ID, this);
  }

  /** ioband_group_find() plus the seed's `(id == 1) ? head : ...`. */
  find(id: number): IobandGroup<R> | undefined {
    return id === ROOT_CGROUP_ID ? this.defaultGroup : this.groups.get(id);
  }
}

export interface IobandDeviceOptions {
  /** The share name (g_name), at most IOBAND_NAME_MAX characters. */
  name: string;
  policy: PolicyName;
  /** Policy table argument: the token pool for weight policies (0 = default). */
  tokenPool?: number;
  ioThrottle?: number;
  ioLimit?: number;
  /** The backend queue depth; io_limit 0 means 3 * nrRequests / 2 as in dm-ioband. */
  nrRequests?: number;
  /** Monotonic clock in nanoseconds. */
  clock: () => number;
}

function makePolicy<R extends IobandRequest>(name: PolicyName, dev: IobandDeviceState<R>, clock: () => number, tokenPool: number): IobandPolicy<R> {
  switch (name) {
    case "weight":
      return new WeightPolicy<R>(dev, false, tokenPool);
    case "weight-iosize":
      return new WeightPolicy<R>(dev, true, tokenPool);
    case "range-bw":
      return new RangeBwPolicy<R>(dev, clock);
  }
}

export class IobandDevice<R extends IobandRequest = IobandRequest> implements IobandDeviceState<R> {
  readonly name: string;
  policy: IobandPolicy<R>;
  ioThrottle: number;
  ioLimit: number;
  readonly nrRequests: number;
  readonly heads: IobandHead<R>[] = [];
  /** g_groups: every group of every head, the order ties are broken in. */
  readonly groups: IobandGroup<R>[] = [];
  /** g_issued: dispatched, not completed (urgent included). */
  issued = 0;
  /** Requests held in group queues (g_blocked). */
  blocked = 0;
  private readonly clock: () => number;
  /** The group chosen last; ties go to the next one after it (round robin). */
  private lastIndex = -1;

  constructor(opts: IobandDeviceOptions) {
    if (opts.name.length === 0 || opts.name.length > IOBAND_NAME_MAX || /\s/.test(opts.name)) {
      throw new RangeError(`ioband device name must be 1..${IOBAND_NAME_MAX} characters without spaces`);
    }
    this.name = opts.name;
    this.clock = opts.clock;
    this.nrRequests = opts.nrRequests ?? 128;
    this.ioLimit = opts.ioLimit ?? DEFAULT_IO_LIMIT;
    this.ioThrottle = opts.ioThrottle ?? DEFAULT_IO_THROTTLE;
    if (!(this.ioThrottle >= 1 && this.ioThrottle <= this.ioLimit && this.ioLimit <= SHORT_MAX)) {
      throw new RangeError("ioband device needs 1 <= io_throttle <= io_limit <= 32767");
    }
    this.policy = makePolicy<R>(opts.policy, this, this.clock, opts.tokenPool ?? 0);
  }

  /** Map a new dm-ioband target (head) over this share; param is the root group's setting. */
  addHead(name: string, param: string | null = null): IobandHead<R> {
    if (name.length === 0 || /\s/.test(name)) throw new RangeError("ioband head name must be non-empty without spaces");
    if (this.heads.some((h) => h.name === name)) throw new RangeError(`ioband head ${name} already exists on ${this.name}`);
    const head = new IobandHead<R>(name, this);
    const r = this.addGroup(head.defaultGroup, param);
    if (r < 0) throw new RangeError(`ioband head ${name}: invalid parameter ${JSON.stringify(param)}`);
    this.heads.push(head);
    return head;
  }

  head(name: string): IobandHead<R> | undefined {
    return this.heads.find((h) => h.name === name);
  }

  private addGroup(gp: IobandGroup<R>, param: string | null): number {
    gp.index = this.groups.length;
    this.groups.push(gp);
    const r = this.policy.groupCtr(gp, param);
    if (r < 0) {
      // A constructor that fails has changed nothing shared (it checks before set_weight).
      this.groups.pop();
      gp.index = -1;
    }
    return r;
  }

  /** ioband_group_attach(): a new group for a blkio cgroup id. 0 or -errno. */
  attachGroup(head: IobandHead<R>, id: number, param: string | null): number {
    if (!Number.isInteger(id) || id < 0 || id === ROOT_CGROUP_ID) return -EINVAL;
    if (head.groups.has(id)) return -EEXIST;
    const gp = new IobandGroup<R>(id, head);
    const r = this.addGroup(gp, param);
    if (r === 0) head.groups.set(id, gp);
    return r;
  }

  /**
   * ioband_group_detach(): an unknown id is -EINVAL as in the kernel. Requests the
   * group still holds move to the head's default group: nothing acknowledged is lost.
   */
  detachGroup(head: IobandHead<R>, id: number): number {
    const gp = head.groups.get(id);
    if (!gp || id === ROOT_CGROUP_ID) return -EINVAL;
    this.policy.groupDtr(gp);
    head.groups.delete(id);
    this.groups.splice(gp.index, 1);
    for (let i = 0; i < this.groups.length; i++) this.groups[i]!.index = i;
    this.lastIndex = -1;
    for (let r = gp.queue.shift(); r !== undefined; r = gp.queue.shift()) head.defaultGroup.queue.push(r);
    return 0;
  }

  /** Switch policy ("policy" message): every group restarts with the new policy's default. */
  setPolicy(name: PolicyName, tokenPool = 0): void {
    for (const gp of this.groups) this.policy.groupDtr(gp);
    this.policy = makePolicy<R>(name, this, this.clock, tokenPool);
    for (const gp of this.groups) this.policy.groupCtr(gp, null);
  }

  private groupOf(req: R, head: IobandHead<R>): IobandGroup<R> {
    return head.groups.get(req.cgroupId) ?? head.defaultGroup;
  }

  /**
   * ioband_map(): urgent requests go straight through; a request goes straight
   * through if nothing is held and the policy gives its group the right; otherwise it
   * is held in its group's queue. After "queued"/"queued-block" the caller drains
   * nextDispatchable(), which may now pick this or another group's request.
   */
  submit(req: R, head: IobandHead<R> | undefined = this.heads[0]): SubmitResult {
    if (!head) throw new Error(`ioband device ${this.name} has no head`);
    const gp = this.groupOf(req, head);
    const now = this.clock();
    if (req.urgent) {
      this.policy.prepare(gp, req.bytes, true, now);
      this.account(gp, req);
      return "urgent";
    }
    // Straight through only when nobody is held: otherwise the choice belongs to
    // choose_best_group(), or a group that resubmits on every completion would
    // overtake held groups of equal priority.
    if (this.blocked === 0 && this.issued < this.ioLimit && this.policy.canSubmit(gp, now) > 0) {
      this.policy.prepare(gp, req.bytes, false, now);
      this.account(gp, req);
      return "dispatch";
    }
    gp.queue.push(req);
    this.blocked++;
    return gp.queue.length >= gp.limit || this.blocked >= this.ioLimit ? "queued-block" : "queued";
  }

  private account(gp: IobandGroup<R>, req: R): void {
    this.issued++;
    gp.dispatchedIos++;
    gp.dispatchedBytes += req.bytes;
  }

  /** ioband_end_io(): one dispatched request finished. */
  complete(_req: R): void {
    if (this.issued > 0) this.issued--;
  }

  /**
   * g_should_block (is_queue_full: c_blocked >= c_limit) for the group a request of
   * this cgroup would join, or io_limit requests held on the whole device.
   */
  shouldBlock(cgroupId: number, head: IobandHead<R> | undefined = this.heads[0]): boolean {
    if (!head) return false;
    const gp = head.groups.get(cgroupId) ?? head.defaultGroup;
    return gp.queue.length >= gp.limit || this.blocked >= this.ioLimit;
  }

  /**
   * ioband_conduct() one request at a time: choose_best_group() (highest g_can_submit,
   * ties round robin), within room_for_bio (io_limit); when no group may go,
   * g_restart_bios (a new epoch for weight) and try once more. Null: nothing may go
   * now; call again after a completion or at nextWakeup().
   */
  nextDispatchable(now: number = this.clock()): R | null {
    if (this.blocked === 0 || this.issued >= this.ioLimit) return null;
    for (let attempt = 0; attempt < MAX_RESTARTS; attempt++) {
      const gp = this.chooseBestGroup(now, false);
      if (gp) return this.take(gp, now);
      if (!this.policy.restart(now)) return null;
    }
    // The policy keeps granting new epochs yet every held group is still in debt
    // (urgent requests are charged too). New epochs are only granted when the device
    // is lightly loaded, so let the next held group go rather than stall.
    const gp = this.chooseBestGroup(now, true);
    return gp ? this.take(gp, now) : null;
  }

  private take(gp: IobandGroup<R>, now: number): R {
    const req = gp.queue.shift()!;
    this.blocked--;
    this.policy.prepare(gp, req.bytes, false, now);
    this.account(gp, req);
    this.lastIndex = gp.index;
    return req;
  }

  private chooseBestGroup(now: number, any: boolean): IobandGroup<R> | null {
    const n = this.groups.length;
    let best: IobandGroup<R> | null = null;
    let highest = 0;
    for (let k = 1; k <= n; k++) {
      const gp = this.groups[(this.lastIndex + k + n) % n]!;
      if (gp.queue.length === 0) continue;
      if (any) return gp;
      const pri = this.policy.canSubmit(gp, now);
      if (pri > highest) {
        highest = pri;
        best = gp;
      }
    }
    return best;
  }

  /** When (ns) to call nextDispatchable() again if no completion arrives first; null = wait for one. */
  nextWakeup(now: number = this.clock()): number | null {
    if (this.blocked === 0 || this.issued >= this.ioLimit) return null;
    const t = this.policy.nextWakeup(now);
    return t === null ? null : Math.max(t, now);
  }

  /**
   * __ioband_message(): "reset", "io_throttle N", "io_limit N", "type cgroup",
   * "attach ID", "detach ID", "policy NAME", or "<cmd> [<id>:]<value>" for the policy.
   * Returns 0 or -errno as the kernel does.
   */
  message(argv: readonly string[], head: IobandHead<R> | undefined = this.heads[0]): number {
    if (!head) return -EINVAL;
    if (argv.length === 1 && argv[0] === "reset") {
      for (const gp of this.groups) gp.dispatchedIos = gp.dispatchedBytes = 0;
      return 0;
    }
    if (argv.length !== 2) return -EINVAL; // "Unrecognised band message received."
    const [cmd, arg] = argv as [string, string];
    switch (cmd) {
      case "io_throttle": {
        let val = strictStrtol(arg);
        if (val === null || val < 0 || val > SHORT_MAX) return -EINVAL;
        if (val === 0) val = DEFAULT_IO_THROTTLE;
        if (val > this.ioLimit) return -EINVAL;
        this.ioThrottle = val;
        return 0;
      }
      case "io_limit": {
        let val = strictStrtol(arg);
        if (val === null || val < 0 || val > SHORT_MAX) return -EINVAL;
        // "The block layer accepts I/O requests up to 50% over nr_requests."
        if (val === 0) val = Math.trunc((3 * this.nrRequests) / 2);
        if (val < this.ioThrottle) return -EINVAL;
        this.ioLimit = val;
        this.policy.ioLimitChanged();
        return 0;
      }
      case "type":
        // Every head virtmesh maps is of the "cgroup" type.
        return arg === "cgroup" ? 0 : -EINVAL;
      case "attach": {
        const id = strictStrtol(arg);
        if (id === null) return -EINVAL;
        return this.attachGroup(head, id, null);
      }
      case "detach": {
        const id = strictStrtol(arg);
        if (id === null) return -EINVAL;
        return this.detachGroup(head, id);
      }
      case "policy": {
        if (arg !== "weight" && arg !== "weight-iosize" && arg !== "range-bw") return -EINVAL;
        if (this.blocked > 0 || this.issued > 0) return -EBUSY;
        this.setPolicy(arg);
        return 0;
      }
      default:
        return this.setParam(head, cmd, arg);
    }
  }

  /** ioband_set_param() / parse_group_param(): "<id>:<value>" names a group, else the head. */
  private setParam(head: IobandHead<R>, cmd: string, value: string): number {
    let gp: IobandGroup<R> | undefined = head.defaultGroup;
    let val = value;
    let cut = -1;
    for (let i = 0; i < value.length; i++) {
      if (value[i] === "=" || value[i] === ":" || value[i] === ",") {
        cut = i;
        break;
      }
    }
    if (cut >= 0) {
      const n = simpleStrtol(value, 0);
      if (n.end !== cut || cut === 0) return -EINVAL;
      gp = head.find(n.value);
      if (!gp) return -EINVAL; // "id=%ld not found."
      val = value.slice(cut + 1);
    }
    return this.policy.setParam(gp, cmd, val);
  }

  /**
   * ioband_cgroup_show_device():
   *   seq_printf(m, "%s policy=%s io_throttle=%d io_limit=%d", ...); g_show_device; '\n';
   *   then for each head: seq_printf(m, "  %s\n", name);
   */
  showDevice(): string {
    let s = `${this.name} policy=${this.policy.name} io_throttle=${this.ioThrottle} io_limit=${this.ioLimit}${this.policy.showDevice()}\n`;
    for (const h of this.heads) s += `  ${h.name}\n`;
    return s;
  }
}
