// The host's dm-ioband state: the blkio cgroup tree, the ioband devices (shares and their
// dm devices), and which VM block device goes through which dm device in which cgroup.
// One per vhost-worker. The control language works on `control`; the data path looks a
// VM device up once at set-up time and then reads `binding.cgroupId` per request.
import { checkName, ConfigError } from "@virtmesh/config";
import {
  addIobandDevice,
  attachVmDevice,
  createIobandControl,
  IobandDevice,
  type ControlResult,
  type IobandChangeEvent,
  type IobandControlContext,
  type IobandHead,
  type IobandRequest,
  type PolicyName,
} from "@virtmesh/ioband";
import { IOBAND_NAME_RE } from "./config";

export interface IobandBackendOptions {
  policy: PolicyName;
  /** Weight policies' token pool (0: the default). */
  tokenPool?: number;
  ioThrottle?: number;
  ioLimit?: number;
  /** The backend's queue depth (io_limit 0 means 3 * nrRequests / 2). */
  nrRequests?: number;
}

/** What the data path holds for one VM block device (vm, device). */
export interface IobandBinding {
  readonly vm: string;
  readonly device: string;
  /** The share the device's requests are scheduled on: submit / complete / nextDispatchable. */
  readonly ioband: IobandDevice<IobandRequest>;
  /** The dm-ioband device over the share: pass it to ioband.submit(req, head). */
  readonly head: IobandHead<IobandRequest>;
  /**
   * The blkio cgroup id the device's requests are charged to (get_blkio_cgroup_id()).
   * Updated in place when the device is moved to another cgroup: read it per request.
   */
  cgroupId: number;
}

/** Events published on `virtmesh.<host>.vhost-worker.ioband`: the control language's, plus topology. */
export type IobandHostEvent =
  | IobandChangeEvent
  | { kind: "share"; action: "add"; device: string; policy: PolicyName }
  | { kind: "ioband-device"; action: "add"; device: string; head: string }
  | { kind: "binding"; action: "bind" | "unbind"; vm: string; device: string; head: string; cgroupId: number };

export interface IobandHostOptions {
  /** Called for every change (the service publishes it on NATS). */
  publish?: (event: IobandHostEvent) => void;
  /** Monotonic clock in ns for the policies; defaults to performance.now(). */
  clock?: () => number;
}

export class IobandHostError extends Error {
  override readonly name = "IobandHostError";
}

const defaultClock = () => Math.floor(performance.now() * 1e6);

export class IobandHost {
  readonly control: IobandControlContext;
  private readonly bindings = new Map<string, IobandBinding>();
  private readonly publish: (event: IobandHostEvent) => void;
  private readonly clock: () => number;

  constructor(opts: IobandHostOptions = {}) {
    this.publish = opts.publish ?? (() => undefined);
    this.clock = opts.clock ?? defaultClock;
    this.control = createIobandControl({
      onChange: (e) => {
        // A moved VM device takes its new cgroup with its very next request.
        if (e.kind === "vm-device") {
          const b = this.bindings.get(`${e.vm}/${e.device}`);
          if (b) b.cgroupId = e.cgroupId;
        }
        this.publish(e);
      },
    });
  }

  /** The share (struct ioband_device) called `name`, if any. */
  share(name: string): IobandDevice<IobandRequest> | undefined {
    return this.control.devices.find((d) => d.name === name);
  }

  /** The dm-ioband device (head) called `name`, on whichever share it is. */
  head(name: string): IobandHead<IobandRequest> | undefined {
    for (const d of this.control.devices) {
      const h = d.head(name);
      if (h) return h;
    }
    return undefined;
  }

  private checkNewName(name: string, own?: IobandDevice<IobandRequest>): void {
    if (!IOBAND_NAME_RE.test(name)) throw new IobandHostError(`ioband name '${name}' must be 1-31 letters, digits, '_', '.' or '-'`);
    for (const d of this.control.devices) {
      if (d !== own && d.name === name) throw new IobandHostError(`ioband name ${name} is already a share`);
      if (d.head(name)) throw new IobandHostError(`ioband name ${name} is already a device on ${d.name}`);
    }
  }

  /** One shared backend scheduled by dm-ioband (a share): the data path calls it per backend. */
  addBackend(name: string, opts: IobandBackendOptions): IobandDevice<IobandRequest> {
    this.checkNewName(name);
    let dev: IobandDevice<IobandRequest>;
    try {
      dev = new IobandDevice<IobandRequest>({ name, policy: opts.policy, tokenPool: opts.tokenPool, ioThrottle: opts.ioThrottle, ioLimit: opts.ioLimit, nrRequests: opts.nrRequests, clock: this.clock });
    } catch (e) {
      throw new IobandHostError(`ioband share ${name}: ${(e as Error).message}`);
    }
    const r = addIobandDevice(this.control, dev);
    if (!r.ok) throw new IobandHostError(r.message);
    this.publish({ kind: "share", action: "add", device: name, policy: opts.policy });
    return dev;
  }

  /** A dm-ioband device (head) over a share; `param` is the root cgroup's weight or range-bw. */
  addDevice(share: string, name: string, param: string | null = null): IobandHead<IobandRequest> {
    const dev = this.share(share);
    if (!dev) throw new IobandHostError(`no ioband share named ${share}`);
    this.checkNewName(name, dev);
    let head: IobandHead<IobandRequest>;
    try {
      head = dev.addHead(name, param);
    } catch (e) {
      throw new IobandHostError((e as Error).message);
    }
    this.publish({ kind: "ioband-device", action: "add", device: share, head: name });
    return head;
  }

  /**
   * The data path sets a VM block device up over the dm-ioband device `head`. With
   * `cgroup` the device is charged to it (as the AttachDevice RPC does); without, it keeps
   * the cgroup it was attached to before (AttachDevice may come first), else the root.
   */
  bindVmDevice(vm: string, device: string, head: string, cgroup?: string): IobandBinding {
    try {
      checkName("vm", vm);
      checkName("device", device);
    } catch (e) {
      if (e instanceof ConfigError) throw new IobandHostError(e.message);
      throw e;
    }
    const key = `${vm}/${device}`;
    if (this.bindings.has(key)) throw new IobandHostError(`${key} is already set up over ${this.bindings.get(key)!.head.name}`);
    const h = this.head(head);
    if (!h) throw new IobandHostError(`no ioband device named ${head}`);
    const binding: IobandBinding = { vm, device, ioband: h.device, head: h, cgroupId: this.control.cgroups.cgroupIdOf(vm, device) };
    this.bindings.set(key, binding);
    if (cgroup !== undefined) {
      const r = this.attachVmDevice(vm, device, cgroup);
      if (!r.ok) {
        this.bindings.delete(key);
        throw new IobandHostError(r.message);
      }
    }
    this.publish({ kind: "binding", action: "bind", vm, device, head: h.name, cgroupId: binding.cgroupId });
    return binding;
  }

  /**
   * The one call the data path needs at set-up: the share `opts.share` (created with
   * `opts.policy`, default weight, if it does not exist yet), a dm-ioband device over it
   * (`opts.head`, default `<vm>-<device>`, created if needed), and the binding.
   */
  setUpVmDevice(vm: string, device: string, opts: { share: string; policy?: PolicyName; head?: string; cgroup?: string }): IobandBinding {
    const headName = opts.head ?? `${vm}-${device}`;
    const existing = this.head(headName);
    if (existing && existing.device.name !== opts.share) throw new IobandHostError(`ioband device ${headName} is on share ${existing.device.name}, not ${opts.share}`);
    if (!existing) {
      if (!this.share(opts.share)) this.addBackend(opts.share, { policy: opts.policy ?? "weight" });
      this.addDevice(opts.share, headName);
    }
    return this.bindVmDevice(vm, device, headName, opts.cgroup);
  }

  /** The VM device is torn down (RESET_OWNER); its cgroup assignment stays for a later set-up. */
  unbindVmDevice(vm: string, device: string): boolean {
    const b = this.bindings.get(`${vm}/${device}`);
    if (!b) return false;
    this.bindings.delete(`${vm}/${device}`);
    this.publish({ kind: "binding", action: "unbind", vm, device, head: b.head.name, cgroupId: b.cgroupId });
    return true;
  }

  /** The binding of a set-up VM device. A map lookup: call it at set-up, not per request. */
  lookup(vm: string, device: string): IobandBinding | undefined {
    return this.bindings.get(`${vm}/${device}`);
  }

  /** Charge a VM block device to a cgroup, or move it (the AttachDevice RPC). */
  attachVmDevice(vm: string, device: string, cgroup: string): ControlResult {
    // VM and device names become NATS subject tokens (virtmesh.vm.<vm>.ioband).
    try {
      checkName("vm", vm);
      checkName("device", device);
    } catch (e) {
      if (e instanceof ConfigError) return { ok: false, code: "INVALID_ARGUMENT", message: e.message };
      throw e;
    }
    return attachVmDevice(this.control, vm, device, cgroup);
  }
}
