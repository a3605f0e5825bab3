// A deterministic model of VMs sharing one backend through an IobandDevice: each group
// keeps `iodepth` requests outstanding (closed loop, like fio with iodepth=N), the
// backend serves dispatched requests one at a time in order at deviceBytesPerS, and
// time is a fake clock advanced from event to event. Used by the tests and the bench.
import { IobandDevice } from "./device";
import type { IobandRequest } from "./group";
import { RequestQueue } from "./group";
import type { PolicyName } from "./policy";

export interface SimGroup {
  name: string;
  /** weight policy: 1..32767 */
  weight?: number;
  /** range-bw policy, KiB/s as blkio.settings takes them */
  rangeBw?: { minKBps: number; maxKBps: number };
}

export interface SimulateOptions {
  groups: SimGroup[];
  deviceBytesPerS: number;
  durationS: number;
  requestBytes: number;
  iodepth: number;
  /** Default: "range-bw" if any group has rangeBw, else "weight". */
  policy?: PolicyName;
  ioThrottle?: number;
  ioLimit?: number;
  /** The idle root group's setting (default: the policy's default). */
  rootParam?: string;
  /** Completions before this time are not counted (default 10% of durationS). */
  warmupS?: number;
}

export interface SimulateResult {
  /** Bytes completed per group inside the measurement window. */
  bytes: Record<string, number>;
  bytesPerS: Record<string, number>;
  /** Each group's fraction of all bytes completed in the window. */
  shares: Record<string, number>;
  windowS: number;
  /** Largest number of requests the device ever had in flight. */
  maxIssued: number;
  /** Longest a group ever waited between two of its completions once it had I/O queued (s). */
  maxGapS: Record<string, number>;
}

interface SimRequest extends IobandRequest {
  bytes: number;
  cgroupId: number;
  urgent: boolean;
  group: number;
  finishAt: number;
}

const NS = 1e9;

export function simulateShares(opts: SimulateOptions): SimulateResult {
  const { groups, deviceBytesPerS, durationS, requestBytes, iodepth } = opts;
  if (groups.length === 0) throw new RangeError("simulateShares: no groups");
  if (!(deviceBytesPerS > 0 && durationS > 0 && requestBytes > 0 && iodepth >= 1)) throw new RangeError("simulateShares: rates, duration, size and iodepth must be positive");
  const anyRange = groups.some((g) => g.rangeBw !== undefined);
  const policy: PolicyName = opts.policy ?? (anyRange ? "range-bw" : "weight");
  let now = 0;
  const dev = new IobandDevice<SimRequest>({ name: "sim", policy, clock: () => now, ioThrottle: opts.ioThrottle, ioLimit: opts.ioLimit });
  const head = dev.addHead("sim0", opts.rootParam ?? null);
  groups.forEach((g, i) => {
    const param = policy === "range-bw" ? `${g.rangeBw?.minKBps ?? 0}:${g.rangeBw?.maxKBps ?? 0}` : String(g.weight ?? 100);
    const r = dev.attachGroup(head, i + 2, param);
    if (r < 0) throw new RangeError(`simulateShares: group ${g.name}: invalid ${policy} setting ${param}`);
  });

  // Every request object is allocated once; a lane reuses its own.
  const waiting = groups.map(() => new RequestQueue<SimRequest>());
  groups.forEach((_g, i) => {
    for (let k = 0; k < iodepth; k++) waiting[i]!.push({ bytes: requestBytes, cgroupId: i + 2, urgent: false, group: i, finishAt: 0 });
  });
  const backend = new RequestQueue<SimRequest>();
  let backendTail = 0;
  const serviceNs = (bytes: number) => (bytes * NS) / deviceBytesPerS;
  const issue = (r: SimRequest) => {
    backendTail = Math.max(now, backendTail) + serviceNs(r.bytes);
    r.finishAt = backendTail;
    backend.push(r);
  };

  const end = durationS * NS;
  const warm = (opts.warmupS ?? durationS / 10) * NS;
  const bytes = new Array<number>(groups.length).fill(0);
  const lastDone = new Array<number>(groups.length).fill(0);
  const maxGap = new Array<number>(groups.length).fill(0);
  let maxIssued = 0;

  const pump = () => {
    let progress = true;
    while (progress) {
      progress = false;
      for (let i = 0; i < groups.length; i++) {
        const w = waiting[i]!;
        // g_should_block: a submitter sleeps while its group's queue is full.
        while (w.length > 0 && !dev.shouldBlock(i + 2, head)) {
          const r = w.shift()!;
          const res = dev.submit(r, head);
          if (res === "dispatch" || res === "urgent") issue(r);
          progress = true;
        }
      }
      for (let r = dev.nextDispatchable(now); r !== null; r = dev.nextDispatchable(now)) {
        issue(r);
        progress = true;
      }
      if (dev.issued > maxIssued) maxIssued = dev.issued;
    }
  };

  let guard = 0;
  while (true) {
    pump();
    const done = backend.peek();
    const wake = dev.nextWakeup(now);
    let t = done ? done.finishAt : Number.POSITIVE_INFINITY;
    if (wake !== null && wake < t) t = wake;
    if (!Number.isFinite(t)) throw new Error("simulateShares: scheduler stalled with nothing in flight");
    if (t > end) break;
    if (t <= now) {
      // A wakeup that is already due but dispatched nothing: step the clock.
      if (++guard > 1000) throw new Error("simulateShares: scheduler spins without progress");
      t = now + 1000;
    } else guard = 0;
    now = t;
    for (let r = backend.peek(); r !== undefined && r.finishAt <= now; r = backend.peek()) {
      backend.shift();
      dev.complete(r);
      const g = r.group;
      if (r.finishAt >= warm) {
        bytes[g]! += r.bytes;
        const gap = r.finishAt - lastDone[g]!;
        if (lastDone[g]! > 0 && gap > maxGap[g]!) maxGap[g] = gap;
      }
      lastDone[g] = r.finishAt;
      waiting[g]!.push(r);
    }
  }

  const windowS = (end - warm) / NS;
  const total = bytes.reduce((a, b) => a + b, 0);
  const out: SimulateResult = { bytes: {}, bytesPerS: {}, shares: {}, windowS, maxIssued, maxGapS: {} };
  groups.forEach((g, i) => {
    out.bytes[g.name] = bytes[i]!;
    out.bytesPerS[g.name] = bytes[i]! / windowS;
    out.shares[g.name] = total > 0 ? bytes[i]! / total : 0;
    out.maxGapS[g.name] = maxGap[i]! / NS;
  });
  return out;
}
