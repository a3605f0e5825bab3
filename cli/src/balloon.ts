// virtmesh balloon set <vm> <size> | stats <vm> [--json]
// Finds the running stack's NATS (state.json, else NATS_URL), the VM's host in the
// registry (vm.<vm>), and that host's balloon-host (svc.<host>.balloon-host).
import { credentials, type ServiceError } from "@grpc/grpc-js";
import { ConfigError, checkName } from "@virtmesh/config";
import { connectNats, drainNats, Registry } from "@virtmesh/nats";
import { balloon, callUnary } from "@virtmesh/proto";
import { defaultStateDir, readState } from "./state";

import { CliError, UsageError } from "./errors";

export interface BalloonValues {
  json?: string | boolean;
  "state-dir"?: string;
}

export const BALLOON_USAGE = "usage: virtmesh balloon set <vm> <size> | stats <vm> [--json]   (size: bytes, or with K/M/G/T suffix, binary units; 0 deflates fully)";

const UNITS: Record<string, number> = { "": 1, b: 1, k: 2 ** 10, kb: 2 ** 10, kib: 2 ** 10, m: 2 ** 20, mb: 2 ** 20, mib: 2 ** 20, g: 2 ** 30, gb: 2 ** 30, gib: 2 ** 30, t: 2 ** 40, tb: 2 ** 40, tib: 2 ** 40 };

/** "512M", "1.5G", "4096", "0" -> bytes (binary units). */
export function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([a-z]*)$/i.exec(s.trim());
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new UsageError(`size '${s}' is not a size: use bytes or a number with K, M, G or T (e.g. 512M, 1.5G)`);
  const bytes = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`size '${s}' is too large`);
  return bytes;
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}

const MODE_NAMES: Record<number, string> = {
  [balloon.BalloonMode.BALLOON_MODE_PFN]: "pfn",
  [balloon.BalloonMode.BALLOON_MODE_BITMAP]: "bitmap",
  [balloon.BalloonMode.BALLOON_MODE_REPORTING]: "reporting",
};


function failed(what: string, e: unknown): CliError {
  const se = e as ServiceError;
  return new CliError(`${what}: ${se.details || se.message}`);
}

export function formatStats(s: balloon.BalloonStats, host: string): string {
  const pages = (n: number) => `${n} pages (${formatBytes(n * 4096)})`;
  return [
    `${s.vm} on ${host}: balloon mode ${MODE_NAMES[s.mode] ?? "unknown"}`,
    `  target    ${pages(s.targetPages)}`,
    `  actual    ${pages(s.actualPages)}`,
    `  guest     free ${formatBytes(s.freeMemory)} of ${formatBytes(s.totalMemory)} (available ${formatBytes(s.availableMemory)}); swap in/out ${s.swapIn}/${s.swapOut}; faults major ${s.majorFaults} minor ${s.minorFaults}`,
    `  host      guest memory file allocated ${formatBytes(s.allocatedBytes)}; refused requests ${s.refusedRequests}`,
  ].join("\n");
}

/** Entry point for `virtmesh balloon …`; returns the exit code. */
export async function balloonCommand(values: BalloonValues, positionals: string[]): Promise<number> {
  const [sub, vmArg, sizeArg, ...extra] = positionals;
  if (sub !== "set" && sub !== "stats") throw new UsageError(BALLOON_USAGE);
  if (!vmArg || (sub === "set" && !sizeArg) || (sub === "stats" && sizeArg) || extra.length) throw new UsageError(BALLOON_USAGE);
  let vm: string;
  try {
    vm = checkName("vm", vmArg);
  } catch (e) {
    if (e instanceof ConfigError) throw new UsageError(e.message);
    throw e;
  }
  const targetBytes = sub === "set" ? parseSize(sizeArg!) : 0;

  const dir = values["state-dir"] ?? defaultStateDir();
  const natsUrl = readState(dir)?.nats.url ?? process.env.NATS_URL;
  if (!natsUrl) throw new CliError(`no running stack in ${dir} (start one with 'virtmesh up') and NATS_URL is not set`);
  const nc = await connectNats(natsUrl, "virtmesh-cli-balloon", 5000);
  let client: balloon.BalloonServiceClient | undefined;
  try {
    const registry = await Registry.open(nc);
    const placement = await registry.getVm(vm);
    if (!placement) throw new CliError(`vm '${vm}' is not registered (is its guest-driver running?)`);
    const svc = await registry.getService(placement.host, "balloon-host");
    if (!svc) throw new CliError(`vm '${vm}' runs on host ${placement.host}, which has no balloon-host registered`);
    client = new balloon.BalloonServiceClient(svc.grpc, credentials.createInsecure());
    const c = client;

    if (sub === "stats") {
      const s = await callUnary(c, c.getStats, { vm }).catch((e: unknown) => {
        throw failed(`GetStats(${vm}) on balloon-host@${placement.host}`, e);
      });
      process.stdout.write(values.json ? `${JSON.stringify({ ...s, host: placement.host, mode: MODE_NAMES[s.mode] ?? "unknown" }, null, 2)}\n` : `${formatStats(s, placement.host)}\n`);
      return 0;
    }

    const r = await callUnary(c, c.setTarget, { vm, targetBytes }).catch((e: unknown) => {
      throw failed(`SetTarget(${vm}, ${targetBytes}) on balloon-host@${placement.host}`, e);
    });
    // Follow the guest for a while: it moves the balloon on its config-change interrupt.
    const deadline = Date.now() + 30_000;
    let s = await callUnary(c, c.getStats, { vm });
    while (s.actualPages !== r.targetPages && Date.now() < deadline) {
      await new Promise((res) => setTimeout(res, 250));
      s = await callUnary(c, c.getStats, { vm });
    }
    const reached = s.actualPages === r.targetPages;
    if (values.json) {
      process.stdout.write(`${JSON.stringify({ vm, host: placement.host, targetPages: r.targetPages, actualPages: s.actualPages, reached, allocatedBytes: s.allocatedBytes })}\n`);
    } else {
      process.stdout.write(
        `${vm} on ${placement.host}: balloon target ${r.targetPages} pages (${formatBytes(r.targetPages * 4096)}); ` +
          (reached ? "the guest reached it" : `the guest is at ${s.actualPages} pages (still moving, or out of free pages)`) +
          `; guest memory file allocated ${formatBytes(s.allocatedBytes)}\n`,
      );
    }
    return 0;
  } finally {
    client?.close();
    await drainNats(nc);
  }
}

/** What the lead wires into main.ts: `case "balloon": return (require("./balloon") as typeof import("./balloon")).balloon(parsed.values, parsed.positionals);` */
export { balloonCommand as balloon };
