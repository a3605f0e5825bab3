// virtmesh fio: run the guest's fio-like workload on a running stack's VM and print
// fio-like text or JSON. Options (all strings unless noted; wired by cli/src/main.ts):
//   --rw read|write|randread|randwrite|randrw   --bs 4k   --iodepth 32   --numjobs N
//   --size S (per job, default 64m)   --runtime T (10s, 500ms, 2m; plain number = seconds; 0/absent = one pass)
//   --verify crc32c   --rwmixread P (randrw, default 50)   --json (boolean)   --vm NAME   --state-dir DIR
//   --lock ticket|queue   --pv on|off   (the guest's virtqueue spinlock for this run; default: the guest's)
// Exit status: 0 when every I/O succeeded and verified, 1 otherwise.
import { Metadata } from "@grpc/grpc-js";
import { resolve } from "node:path";
import { guest } from "@virtmesh/proto";
import { defaultStateDir, pidAlive, readState } from "./state";
import { CliError, UsageError } from "./errors";
import { openGuest } from "./guest";
import type { Values } from "./main";

export type FioValues = Pick<Values, "rw" | "bs" | "iodepth" | "numjobs" | "size" | "runtime" | "verify" | "rwmixread" | "json" | "vm" | "state-dir" | "lock" | "pv">;

const UNITS: Record<string, number> = { "": 1, b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/** fio-style sizes: 4k, 64m, 1g (binary units), or plain bytes. */
export function parseSize(what: string, s: string): number {
  const m = /^(\d+)([kmgt]?)(i?b)?$/i.exec(s.trim());
  if (!m) throw new UsageError(`--${what} ${s} is not a size (e.g. 4k, 64m, 1g)`);
  const v = Number(m[1]) * UNITS[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(v)) throw new UsageError(`--${what} ${s} is too large`);
  return v;
}

/** fio-style times: 10s, 500ms, 2m, 1h; a plain number is seconds. Returns ms. */
export function parseTime(s: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(s.trim());
  if (!m) throw new UsageError(`--runtime ${s} is not a time (e.g. 10s, 500ms, 2m)`);
  const mult = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? "s") as "ms" | "s" | "m" | "h"];
  return Math.round(Number(m[1]) * mult);
}

function intOpt(what: string, s: string | undefined, dflt: number, min: number, max: number): number {
  if (s === undefined) return dflt;
  const v = Number(s);
  if (!Number.isInteger(v) || v < min || v > max) throw new UsageError(`--${what} ${s} must be an integer in [${min}, ${max}]`);
  return v;
}

export function fioRequest(v: FioValues): guest.FioRequest {
  const rw = v.rw ?? "randread";
  if (!["read", "write", "randread", "randwrite", "randrw"].includes(rw)) throw new UsageError(`--rw ${rw} must be read|write|randread|randwrite|randrw`);
  const verify = v.verify ?? "";
  if (verify !== "" && verify !== "crc32c") throw new UsageError(`--verify ${verify} must be crc32c`);
  const spinlock = v.lock ?? "";
  if (spinlock !== "" && spinlock !== "ticket" && spinlock !== "queue") throw new UsageError(`--lock ${spinlock} must be ticket or queue`);
  const pvSpinlock = v.pv ?? "";
  if (pvSpinlock !== "" && pvSpinlock !== "on" && pvSpinlock !== "off") throw new UsageError(`--pv ${pvSpinlock} must be on or off`);
  return {
    rw,
    blockSize: parseSize("bs", v.bs ?? "4k"),
    iodepth: intOpt("iodepth", v.iodepth, 1, 1, 1024),
    numjobs: intOpt("numjobs", v.numjobs, 1, 1, 64),
    sizeBytes: parseSize("size", v.size ?? "64m"),
    runtimeMs: v.runtime === undefined ? 0 : parseTime(v.runtime),
    verify,
    rwmixRead: intOpt("rwmixread", v.rwmixread, 50, 0, 100),
    spinlock,
    pvSpinlock,
  };
}

function human(n: number): string {
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return n.toFixed(0);
}

export function formatFio(req: guest.FioRequest, r: guest.FioResult, who: string): string {
  const secs = Math.max(r.runtimeMs, 1) / 1000;
  const lines = [
    `${who}: (g=0): rw=${req.rw}, bs=${req.blockSize}B, iodepth=${req.iodepth}, numjobs=${req.numjobs}, size=${req.sizeBytes}B${req.verify ? `, verify=${req.verify}` : ""}`,
  ];
  if (r.readIos) lines.push(`  read: IOPS=${human(r.readIos / secs)}, BW=${((r.readIos * req.blockSize) / 1e6 / secs).toFixed(1)}MB/s (${r.readIos} ios)`);
  if (r.writeIos) lines.push(`  write: IOPS=${human(r.writeIos / secs)}, BW=${((r.writeIos * req.blockSize) / 1e6 / secs).toFixed(1)}MB/s (${r.writeIos} ios)`);
  lines.push(`  total: IOPS=${human(r.iops)}, BW=${r.mbPerS.toFixed(1)}MB/s, run=${r.runtimeMs}msec`);
  lines.push(`  clat percentiles (usec): 50.00th=[${r.latP50Us.toFixed(1)}], 99.00th=[${r.latP99Us.toFixed(1)}], 99.90th=[${r.latP999Us.toFixed(1)}]`);
  const l = r.spinlock;
  if (l) {
    lines.push(
      `  vq->lock: ${l.kind} spinlock, PV ${l.pv ? "on" : "off"}${l.unfair ? ", unfair" : ""}; ${l.vcpus} vCPUs on ${l.hostCores} host cores (${(l.vcpus / Math.max(l.hostCores, 1)).toFixed(1)}x)`,
      `    ${l.acquisitions} acquisitions, ${l.slowpath} contended, ${l.spins} spins, ${l.halts} halts (${l.haltedMs.toFixed(1)} ms), ${l.kicks} kicks, ${l.spuriousWakes} spurious wakes${l.steals ? `, ${l.steals} steals` : ""}`,
    );
  }
  if (req.verify) lines.push(`  verify: ${r.verifyErrors} errors`);
  else if (r.verifyErrors) lines.push(`  errors: ${r.verifyErrors}`);
  for (const f of r.verifyFailures) lines.push(`    ${f}`);
  if (r.verifyErrors > r.verifyFailures.length) lines.push(`    ... ${r.verifyErrors - r.verifyFailures.length} more`);
  return lines.join("\n") + "\n";
}

export async function fio(values: FioValues, _positionals: string[]): Promise<number> {
  const req = fioRequest(values);
  const dir = resolve(values["state-dir"] ?? defaultStateDir());
  const s = readState(dir);
  if (!s || !pidAlive(s.supervisorPid)) throw new CliError(`no virtmesh stack is running (state dir ${dir}); run 'virtmesh up' first`);
  const vm = values.vm ?? "vm1";
  // The guest-driver that runs the VM now (each other host has an incoming one).
  const g = await openGuest(vm, dir);
  const client = g.client;
  const svc = { host: g.host };
  const timeout = (req.runtimeMs || 0) + 15 * 60_000;
  try {
    const res = await new Promise<guest.FioResult>((ok, fail) =>
      client.runFio(req, new Metadata(), { deadline: Date.now() + timeout }, (err, r) => (err ? fail(new CliError(`fio on ${vm}: ${err.details || err.message}`)) : ok(r!))),
    );
    if (values.json) {
      const out = {
        vm,
        host: svc.host,
        params: { rw: req.rw, bs: req.blockSize, iodepth: req.iodepth, numjobs: req.numjobs, size: req.sizeBytes, runtimeMs: req.runtimeMs, verify: req.verify || null, rwmixread: req.rwmixRead, lock: req.spinlock || null, pv: req.pvSpinlock || null },
        result: res,
      };
      process.stdout.write(JSON.stringify(out, null, 2) + "\n");
    } else process.stdout.write(formatFio(req, res, `${vm}@${svc.host}`));
    return res.verifyErrors === 0 ? 0 : 1;
  } finally {
    client.close();
  }
}
