// dm-ioband in the vhost-blk data path (issue 5, seed 001): every VM block device bound
// to an ioband device submits its requests to the share (struct ioband_device) before
// they reach the backend. One IobandConductor per share plays ioband_conduct(): after
// each submit and completion it issues what nextDispatchable() lets go (requests of any
// VM device on the share) and arms ONE timer at nextWakeup() while requests are held.
import { performance } from "node:perf_hooks";
import { ConfigError } from "@virtmesh/config";
import type { IobandDevice, IobandRequest } from "@virtmesh/ioband";
import { IobandHostError, type IobandBinding, type IobandHost } from "./ioband";
import { IOBAND_NAME_RE } from "./ioband/config";

/** The ioband device (or share) every VM block device of this host goes through. */
export const IOBAND_BACKEND_ENV = "VIRTMESH_IOBAND_BACKEND";

/** What the data path does to issue a held request and to resume popping (VhostBlkDevice). */
export interface IobandIssuer {
  /** Issue the request of `head` to the backend now (it was held by the scheduler). */
  issueHeld(head: number): void;
  /** The group of this device's requests has room again: pop the ring again. */
  unblock(): void;
  readonly ioband: IobandBinding | null;
}

/**
 * The request object the scheduler queues, one per descriptor head of a device, made
 * at set-up and reused for every request of that head (no per-request allocation).
 */
export class IobandSlot implements IobandRequest {
  bytes = 0;
  cgroupId = 1;
  urgent = false;
  constructor(
    readonly owner: IobandIssuer,
    readonly head: number,
  ) {}
}

/** ioband_conduct() for one share: drains held requests, and one timer for nextWakeup(). */
export class IobandConductor {
  private timer: NodeJS.Timeout | null = null;
  private timerAt = Infinity;
  private pumping = false;
  private again = false;
  /** Devices that stopped popping on "queued-block" (g_should_block); usually empty. */
  private readonly blocked: IobandIssuer[] = [];
  private readonly onTimer = (): void => {
    this.timer = null;
    this.timerAt = Infinity;
    this.pump();
  };

  constructor(readonly dev: IobandDevice<IobandRequest>) {}

  /** A device's group queue is full: it stops popping until shouldBlock() is false. */
  block(owner: IobandIssuer): void {
    if (!this.blocked.includes(owner)) this.blocked.push(owner);
  }

  /** Issue everything the policy lets go now; then wake blocked devices and arm the timer. */
  pump(): void {
    if (this.pumping) {
      this.again = true;
      return;
    }
    this.pumping = true;
    try {
      do {
        this.again = false;
        for (let r = this.dev.nextDispatchable(); r !== null; r = this.dev.nextDispatchable()) {
          const s = r as IobandSlot;
          s.owner.issueHeld(s.head);
        }
      } while (this.again);
    } finally {
      this.pumping = false;
    }
    if (this.blocked.length > 0) this.wakeBlocked();
    this.arm();
  }

  private wakeBlocked(): void {
    for (let i = this.blocked.length - 1; i >= 0; i--) {
      const o = this.blocked[i]!;
      const b = o.ioband;
      if (b === null || !this.dev.shouldBlock(b.cgroupId, b.head)) {
        this.blocked.splice(i, 1);
        o.unblock();
      }
    }
  }

  /** One timer per share, at the earliest nextWakeup(); none while nothing is held. */
  private arm(): void {
    if (this.dev.blocked === 0) return;
    const t = this.dev.nextWakeup();
    if (t === null) return; // a completion will come first
    if (this.timer !== null && this.timerAt <= t) return;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timerAt = t;
    const delayMs = Math.max(0, t / 1e6 - performance.now());
    this.timer = setTimeout(this.onTimer, delayMs);
    this.timer.unref();
  }

  /** Forget a device (RESET_OWNER): nothing of it is held any more (stop() drained it). */
  forget(owner: IobandIssuer): void {
    const i = this.blocked.indexOf(owner);
    if (i >= 0) this.blocked.splice(i, 1);
    if (this.dev.blocked === 0 && this.dev.issued === 0 && this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
      this.timerAt = Infinity;
    }
  }
}

const conductors = new WeakMap<IobandDevice<IobandRequest>, IobandConductor>();

/** The conductor of a share (one per IobandDevice, shared by every VM device on it). */
export function conductorFor(dev: IobandDevice<IobandRequest>): IobandConductor {
  let c = conductors.get(dev);
  if (!c) {
    c = new IobandConductor(dev);
    conductors.set(dev, c);
  }
  return c;
}

/** How the device table binds VM block devices at BLK_SET_BACKEND and unbinds them at RESET_OWNER. */
export interface IobandBinder {
  /** Throws IobandHostError (the caller maps it to EINVAL). */
  bind(vm: string, device: string, cgroup: string | undefined): IobandBinding;
  unbind(vm: string, device: string): void;
}

/**
 * VIRTMESH_IOBAND_BACKEND=<name>: every VM block device of this host goes through the
 * ioband device `name` (one of VIRTMESH_IOBAND_DEVICES: all VMs share its backend and
 * compete by cgroup); if `name` is no ioband device, it is a share, created with the
 * weight policy on first use, and each VM device gets its own ioband device
 * `<vm>-<device>` over it. Unset or empty: no scheduling, the data path is unchanged.
 */
export function iobandBinder(host: IobandHost, env: NodeJS.ProcessEnv = process.env): IobandBinder | undefined {
  const name = env[IOBAND_BACKEND_ENV];
  if (name === undefined || name === "") return undefined;
  if (!IOBAND_NAME_RE.test(name)) throw new ConfigError(`${IOBAND_BACKEND_ENV}=${name}: must be 1-31 letters, digits, '_', '.' or '-'`);
  return {
    bind(vm, device, cgroup) {
      if (host.head(name)) return host.bindVmDevice(vm, device, name, cgroup);
      return host.setUpVmDevice(vm, device, { share: name, cgroup });
    },
    unbind(vm, device) {
      host.unbindVmDevice(vm, device);
    },
  };
}

export { IobandHostError };
