// virtmesh ioband …: the blkio-cgroup control language of seed 001 against a running
// stack's vhost-worker (IobandService). Reads print what the cgroupfs files would show;
// writes print nothing, like `echo … > blkio.settings`; errors are one line.
//
// The stack is found as the other drive commands find it: state.json in --state-dir
// (default $VIRTMESH_STATE_DIR) for the NATS URL, else NATS_URL; then the registry
// (svc.<host>.vhost-worker, vm.<vm>). Without NATS, the service records in state.json.
import { credentials, status as Status, type ServiceError } from "@grpc/grpc-js";
import { ConfigError, checkName } from "@virtmesh/config";
import { connectNats, drainNats, Registry } from "@virtmesh/nats";
import { callUnary, ioband as pb } from "@virtmesh/proto";
import { defaultStateDir, pidAlive, readState } from "./state";

import { CliError, UsageError } from "./errors";

export interface IobandValues {
  host?: string;
  cgroup?: string;
  "state-dir"?: string;
}

export const IOBAND_USAGE = `usage: virtmesh ioband <command> [--host H] [--state-dir DIR]
  devices [--cgroup /]                                  read blkio.devices
  devices write <cgroup> "<share-or-device> <param> <value>"
                                                        write blkio.devices (root cgroup only)
  settings <cgroup>                                     read blkio.settings
  settings write <cgroup> "<device> [<value>]"          attach/update (weight N or range-bw min:max),
                                                        or detach with the device alone
  cgroup create <path> | remove <path> | list [<path>]  the blkio cgroup tree
  attach <vm> <device> <cgroup>                         charge a VM block device to a cgroup (or move it)
--host: the host whose vhost-worker to use (default: the VM's host for attach, else the
stack's first host).`;

type Plan =
  | { op: "readDevices"; cgroup: string }
  | { op: "writeDevices" | "writeSettings"; cgroup: string; line: string }
  | { op: "readSettings"; cgroup: string }
  | { op: "createCgroup" | "removeCgroup"; path: string }
  | { op: "listCgroups"; under: string }
  | { op: "attach"; vm: string; device: string; cgroup: string };

// One line, like every CLI error; `virtmesh ioband help` prints the whole usage.
const usage = (why?: string) => new UsageError(`${why ?? "missing ioband command"}; usage: virtmesh ioband devices|settings|cgroup|attach … (see 'virtmesh ioband help')`);

function cgroupArg(what: string, v: string | undefined): string {
  if (v === undefined) throw usage(`${what} is missing`);
  if (!v.startsWith("/")) throw usage(`${what} '${v}' must be an absolute cgroup path such as / or /vm1`);
  return v;
}

/** Positionals -> what to do. Everything after the cgroup of a write is the line, joined by spaces. */
export function planIoband(values: IobandValues, pos: string[]): Plan | "help" {
  const [sub, ...rest] = pos;
  const words = (n: number) => {
    if (rest.length !== n) throw usage(`'ioband ${pos.slice(0, 2).join(" ")}' takes ${n} argument${n === 1 ? "" : "s"}`);
  };
  switch (sub) {
    case "help":
      return "help";
    case "devices":
    case "settings": {
      if (rest[0] === "write") {
        const cgroup = cgroupArg("<cgroup>", rest[1]);
        if (rest.length < 3) throw usage(`'ioband ${sub} write' needs <cgroup> and the line to write`);
        const line = rest.slice(2).join(" ");
        return { op: sub === "devices" ? "writeDevices" : "writeSettings", cgroup, line };
      }
      if (sub === "devices") {
        if (rest.length > 0) throw usage(`'ioband devices' takes no argument (use --cgroup, or 'devices write')`);
        return { op: "readDevices", cgroup: cgroupArg("--cgroup", values.cgroup ?? "/") };
      }
      if (values.cgroup !== undefined && rest.length === 0) return { op: "readSettings", cgroup: cgroupArg("--cgroup", values.cgroup) };
      words(1);
      return { op: "readSettings", cgroup: cgroupArg("<cgroup>", rest[0]) };
    }
    case "cgroup": {
      const [verb, path, ...extra] = rest;
      if (extra.length) throw usage(`'ioband cgroup ${verb}' takes one path`);
      if (verb === "create" || verb === "remove") return { op: verb === "create" ? "createCgroup" : "removeCgroup", path: cgroupArg("<path>", path) };
      if (verb === "list") return { op: "listCgroups", under: path === undefined ? "/" : cgroupArg("<path>", path) };
      throw usage(`'ioband cgroup' needs create, remove or list`);
    }
    case "attach": {
      words(3);
      const [vm, device, cgroup] = rest as [string, string, string];
      try {
        checkName("vm", vm);
        checkName("device", device);
      } catch (e) {
        if (e instanceof ConfigError) throw new UsageError(e.message);
        throw e;
      }
      return { op: "attach", vm, device, cgroup: cgroupArg("<cgroup>", cgroup) };
    }
    default:
      throw usage(sub === undefined ? undefined : `unknown ioband command '${sub}'`);
  }
}


interface Target {
  host: string;
  grpc: string;
}

/** Which vhost-worker to talk to: --host, else the VM's host (attach), else the stack's first host. */
async function findTarget(values: IobandValues, plan: Plan): Promise<Target> {
  let wantHost: string | undefined;
  if (values.host !== undefined) {
    try {
      wantHost = checkName("--host", values.host);
    } catch (e) {
      if (e instanceof ConfigError) throw new UsageError(e.message);
      throw e;
    }
  }
  const dir = values["state-dir"] ?? defaultStateDir();
  const state = readState(dir);
  const live = state && pidAlive(state.supervisorPid) ? state : undefined;
  const natsUrl = live?.nats.url || process.env.NATS_URL;
  if (natsUrl) {
    const nc = await connectNats(natsUrl, "virtmesh-cli-ioband", 5000);
    try {
      const registry = await Registry.open(nc);
      if (wantHost === undefined && plan.op === "attach") {
        const placement = await registry.getVm(plan.vm);
        if (placement) wantHost = placement.host;
      }
      const workers = (await registry.listServices()).filter((s) => s.service === "vhost-worker");
      if (wantHost === undefined) {
        const first = live?.hosts.find((h) => workers.some((w) => w.host === h));
        if (first) wantHost = first;
        else if (workers.length === 1) wantHost = workers[0]!.host;
        else if (workers.length > 1) throw new CliError(`several hosts have a vhost-worker (${workers.map((w) => w.host).join(", ")}): pick one with --host`);
        else throw new CliError(`no vhost-worker is registered in NATS at ${natsUrl}`);
      }
      const w = workers.find((s) => s.host === wantHost);
      if (!w) throw new CliError(`host '${wantHost}' has no vhost-worker registered (hosts with one: ${workers.map((s) => s.host).join(", ") || "none"})`);
      return { host: w.host, grpc: w.grpc };
    } finally {
      await drainNats(nc);
    }
  }
  if (!live) throw new CliError(`no running stack in ${dir} (start one with 'virtmesh up') and NATS_URL is not set`);
  const rec = live.services.find((s) => s.name === "vhost-worker" && s.grpc !== "" && (wantHost === undefined || s.host === wantHost));
  if (!rec) throw new CliError(`no vhost-worker${wantHost ? ` on host '${wantHost}'` : ""} in ${dir}/state.json`);
  return { host: rec.host, grpc: rec.grpc };
}

/** "blkio.settings write in /vm1 on src: INVALID_ARGUMENT: …" */
function failed(what: string, e: unknown): CliError {
  const se = e as ServiceError;
  const code = typeof se.code === "number" ? Status[se.code] : undefined;
  return new CliError(`${what}: ${code ? `${code}: ` : ""}${(se.details || se.message || String(e)).replace(/\s*\n\s*/g, " ")}`);
}

/** Entry point for `virtmesh ioband …`; returns the exit code. */
export async function ioband(values: IobandValues, positionals: string[]): Promise<number> {
  const plan = planIoband(values, positionals);
  if (plan === "help") {
    process.stdout.write(`${IOBAND_USAGE}\n`);
    return 0;
  }
  const t = await findTarget(values, plan);
  const client = new pb.IobandServiceClient(t.grpc, credentials.createInsecure());
  const on = `on ${t.host}`;
  const out = (s: string) => process.stdout.write(s);
  try {
    switch (plan.op) {
      case "readDevices": {
        const r = await callUnary(client, client.readDevices, { cgroup: plan.cgroup }).catch((e: unknown) => {
          throw failed(`blkio.devices read in ${plan.cgroup} ${on}`, e);
        });
        out(r.text);
        return 0;
      }
      case "readSettings": {
        const r = await callUnary(client, client.readSettings, { cgroup: plan.cgroup }).catch((e: unknown) => {
          throw failed(`blkio.settings read in ${plan.cgroup} ${on}`, e);
        });
        out(r.text);
        return 0;
      }
      case "writeDevices":
      case "writeSettings": {
        const file = plan.op === "writeDevices" ? "blkio.devices" : "blkio.settings";
        const m = plan.op === "writeDevices" ? client.writeDevices : client.writeSettings;
        await callUnary(client, m, { cgroup: plan.cgroup, line: plan.line }).catch((e: unknown) => {
          throw failed(`${file} write ${JSON.stringify(plan.line)} in ${plan.cgroup} ${on}`, e);
        });
        return 0;
      }
      case "createCgroup": {
        const r = await callUnary(client, client.createCgroup, { path: plan.path }).catch((e: unknown) => {
          throw failed(`cgroup create ${plan.path} ${on}`, e);
        });
        out(`${r.path} id=${r.id}\n`);
        return 0;
      }
      case "removeCgroup":
        await callUnary(client, client.removeCgroup, { cgroup: plan.path }).catch((e: unknown) => {
          throw failed(`cgroup remove ${plan.path} ${on}`, e);
        });
        return 0;
      case "listCgroups": {
        const r = await callUnary(client, client.listCgroups, {}).catch((e: unknown) => {
          throw failed(`cgroup list ${on}`, e);
        });
        const under = plan.under.replace(/\/+$/, "");
        const shown = r.cgroups.filter((c) => under === "" || c.path === under || c.path.startsWith(`${under}/`));
        if (shown.length === 0) throw new CliError(`cgroup list ${plan.under} ${on}: NOT_FOUND: cgroup ${JSON.stringify(plan.under)} does not exist`);
        out(shown.map((c) => `${c.path} id=${c.id}\n`).join(""));
        return 0;
      }
      case "attach":
        await callUnary(client, client.attachDevice, { vm: plan.vm, device: plan.device, cgroup: plan.cgroup }).catch((e: unknown) => {
          throw failed(`attach ${plan.vm}/${plan.device} to ${plan.cgroup} ${on}`, e);
        });
        return 0;
    }
  } finally {
    client.close();
  }
}

/** The options `virtmesh ioband` needs in main.ts's OPTIONS (besides state-dir and help). */
export const IOBAND_OPTIONS = {
  host: { type: "string" },
  cgroup: { type: "string" },
  "state-dir": { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

