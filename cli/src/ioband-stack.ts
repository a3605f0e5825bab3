// A live stack for dm-ioband runs (issue 5): one host, several VMs (guest-driver ->
// vhost-worker -> completion-thread over shared memory) whose block devices all go through
// one ioband device (VIRTMESH_IOBAND_DEVICES + VIRTMESH_IOBAND_BACKEND), the weights set
// through IobandService (the blkio-cgroup control language), fio run on every VM at once.
// Used by `virtmesh bench ioband` and e2e/ioband-datapath.test.ts.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { randomBytes } from "node:crypto";
import { credentials } from "@grpc/grpc-js";
import { callUnary, guest, ioband, type UnaryMethod } from "@virtmesh/proto";
import { Stack } from "./stack";

const ROOT = resolve(__dirname, "..", "..");
const HOST = "h1";

export interface IobandLiveStackOptions {
  vms: string[];
  /** VIRTMESH_IOBAND_DEVICES, e.g. "ioband1:weight". */
  devices: string;
  /** VIRTMESH_IOBAND_BACKEND: the ioband device every VM device goes through. */
  backend: string;
  diskBytes: number;
  log?: (line: string) => void;
  env?: Record<string, string>;
}

/** The bench's gRPC calls: a long deadline, the stack runs three VMs on two cores. */
const call = <Req, Res>(c: object, fn: UnaryMethod<Req, Res>, req: Req, timeoutMs = 30_000): Promise<Res> => callUnary(c, fn, req, timeoutMs);

export class IobandLiveStack {
  private readonly guests = new Map<string, guest.GuestServiceClient>();
  private ctl: ioband.IobandServiceClient | null = null;

  private constructor(
    readonly stack: Stack,
    readonly stateDir: string,
    readonly vms: string[],
  ) {}

  static async start(o: IobandLiveStackOptions): Promise<IobandLiveStack> {
    const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-ioband-live-"));
    const stack = new Stack({
      root: ROOT,
      stateDir,
      hosts: [HOST],
      vms: o.vms.map((vm) => ({ vm, host: HOST })),
      basePort: 0,
      shmBase: "/dev/shm",
      stackId: randomBytes(3).toString("hex"),
      env: {
        VIRTMESH_DISK_BYTES: String(o.diskBytes),
        VIRTMESH_DISK_BACKEND: "file",
        VIRTMESH_IOBAND_DEVICES: o.devices,
        VIRTMESH_IOBAND_BACKEND: o.backend,
        VIRTMESH_BLK_TRACE_EVERY: "0",
        ...o.env,
      },
      log: o.log ?? (() => undefined),
    });
    const live = new IobandLiveStack(stack, stateDir, o.vms);
    try {
      await stack.start();
      const snap = stack.snapshot();
      const vw = snap.services.find((s) => s.name === "vhost-worker" && s.host === HOST)!;
      live.ctl = new ioband.IobandServiceClient(vw.grpc, credentials.createInsecure());
      for (const vm of o.vms) {
        const gd = snap.services.find((s) => s.instance === `guest-driver-${vm}`)!;
        live.guests.set(vm, new guest.GuestServiceClient(gd.grpc, credentials.createInsecure()));
      }
      // Every VM's block device is set up (BLK_SET_BACKEND went through the worker).
      for (const vm of o.vms) {
        const deadline = Date.now() + 20_000;
        for (;;) {
          const c = live.guests.get(vm)!;
          const st = await call(c, c.getState, {});
          if (st.devices.length > 0) break;
          if (Date.now() > deadline) throw new Error(`${vm} has no block device after 20 s`);
          await new Promise((r) => setTimeout(r, 100));
        }
      }
    } catch (e) {
      await live.stop();
      throw e;
    }
    return live;
  }

  /** The blkio-cgroup control language over gRPC (IobandService). */
  get control(): ioband.IobandServiceClient {
    return this.ctl!;
  }

  async createCgroup(path: string): Promise<void> {
    await call(this.ctl!, this.ctl!.createCgroup, { path });
  }
  async attach(vm: string, device: string, cgroup: string): Promise<void> {
    await call(this.ctl!, this.ctl!.attachDevice, { vm, device, cgroup });
  }
  async writeSettings(cgroup: string, line: string): Promise<void> {
    await call(this.ctl!, this.ctl!.writeSettings, { cgroup, line });
  }
  async writeDevices(line: string): Promise<void> {
    await call(this.ctl!, this.ctl!.writeDevices, { cgroup: "/", line });
  }
  async readSettings(cgroup: string): Promise<string> {
    return (await call(this.ctl!, this.ctl!.readSettings, { cgroup })).text;
  }
  async readDevices(): Promise<string> {
    return (await call(this.ctl!, this.ctl!.readDevices, { cgroup: "/" })).text;
  }

  /** The block device name of a VM (the guest-driver's GetState). */
  async deviceOf(vm: string): Promise<string> {
    const c = this.guests.get(vm)!;
    return (await call(c, c.getState, {})).devices[0]!.split(" ")[0]!;
  }

  /** Each VM in its own cgroup /<vm>, attached to `ioband` with the given setting. */
  async configure(backend: string, settings: Record<string, string>): Promise<void> {
    for (const [vm, value] of Object.entries(settings)) {
      const cg = `/${vm}`;
      const list = await call(this.ctl!, this.ctl!.listCgroups, {});
      if (!list.cgroups.some((c) => c.path === cg)) await this.createCgroup(cg);
      await this.attach(vm, await this.deviceOf(vm), cg);
      await this.writeSettings(cg, `${backend} ${value}`);
    }
  }

  /** GuestService.RunFio on every VM at once. */
  async fioAll(req: Partial<guest.FioRequest>): Promise<Map<string, guest.FioResult>> {
    const full: guest.FioRequest = { rw: "randwrite", blockSize: 4096, iodepth: 16, numjobs: 1, sizeBytes: 0, runtimeMs: 3000, verify: "", rwmixRead: 0, spinlock: "", pvSpinlock: "", ...req };
    const rs = await Promise.all(
      this.vms.map(async (vm) => {
        const c = this.guests.get(vm)!;
        return [vm, await call(c, c.runFio, full, full.runtimeMs + 20_000)] as const;
      }),
    );
    return new Map(rs);
  }

  async stop(): Promise<void> {
    for (const c of this.guests.values()) c.close();
    this.ctl?.close();
    try {
      await this.stack.stop();
    } finally {
      rmSync(this.stateDir, { recursive: true, force: true });
    }
  }
}

/** Bytes a fio run moved, per ms of its runtime. */
export function fioBytesPerS(r: guest.FioResult, blockSize: number): number {
  const ios = Number(r.readIos) + Number(r.writeIos);
  return r.runtimeMs > 0 ? (ios * blockSize * 1000) / Number(r.runtimeMs) : 0;
}
