// virtmesh stress <vm> --working-set 64M [--dirty-rate 100M] [--vcpus N] [--json]
// virtmesh stress <vm> stop|status|verify [--json]
// The guest's memory-dirtying workload (QEMU migration-test's pattern) on its vCPU threads.
import type { ServiceError } from "@grpc/grpc-js";
import { callUnary, guest } from "@virtmesh/proto";
import { formatBytes, parseSize } from "./balloon";
import { CliError, UsageError } from "./errors";
import { openGuest, vmName } from "./guest";

export const STRESS_USAGE =
  "usage: virtmesh stress <vm> --working-set SIZE [--dirty-rate SIZE/s] [--vcpus N] | stress <vm> stop|status|verify   [--json]";

export interface StressValues {
  json?: string | boolean;
  "state-dir"?: string;
  "working-set"?: string;
  "dirty-rate"?: string;
  vcpus?: string;
}

function formatStatus(s: guest.StressStatus, where: string): string {
  if (!s.running && s.pagesWritten === 0) return `${where}: no dirtying workload running`;
  return (
    `${where}: dirtying workload ${s.running ? "running" : "stopped"}: working set ${formatBytes(s.workingSetBytes)} at 0x${s.workingSetAddr.toString(16)} on ${s.vcpus} vCPU(s); ` +
    `${s.pagesWritten} page writes, ${s.passes} passes, ${formatBytes(Math.round(s.dirtyRateBytesPerS))}/s dirtied` +
    (s.throttlePct ? `, throttled ${s.throttlePct} %` : "")
  );
}

export async function stress(values: StressValues, positionals: string[]): Promise<number> {
  const [vmArg, sub = "start", ...extra] = positionals;
  const vm = vmName(vmArg, STRESS_USAGE);
  if (extra.length || !["start", "stop", "status", "verify"].includes(sub)) throw new UsageError(STRESS_USAGE);
  let req: guest.StressRequest | undefined;
  if (sub === "start") {
    if (!values["working-set"]) throw new UsageError(`stress needs --working-set (e.g. 64M). ${STRESS_USAGE}`);
    const ws = parseSize(values["working-set"]);
    if (ws <= 0 || ws % 4096 !== 0) throw new UsageError(`--working-set ${values["working-set"]} must be a positive multiple of 4 KiB`);
    const rate = values["dirty-rate"] === undefined ? 0 : parseSize(values["dirty-rate"].replace(/\/s$/i, ""));
    const vcpus = values.vcpus === undefined ? 1 : Number(values.vcpus);
    if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > 64) throw new UsageError(`--vcpus ${values.vcpus} must be an integer in [1, 64]`);
    req = { workingSetBytes: ws, dirtyRateBytesPerS: rate, vcpus };
  } else if (values["working-set"] || values["dirty-rate"] || values.vcpus) {
    throw new UsageError(`stress ${sub} takes no --working-set, --dirty-rate or --vcpus`);
  }
  const g = await openGuest(vm, values["state-dir"]);
  const where = `${vm}@${g.host}`;
  const c = g.client;
  const failed = (what: string) => (e: unknown) => {
    const se = e as ServiceError;
    throw new CliError(`${what} on guest-driver-${vm}@${g.host}: ${se.details || se.message}`);
  };
  try {
    if (sub === "verify") {
      const r = await callUnary(c, c.verifyStress, {}).catch(failed("VerifyStress"));
      if (values.json) process.stdout.write(`${JSON.stringify({ vm, host: g.host, ...r })}\n`);
      else process.stdout.write(`${where}: ${r.pagesChecked} pages checked, ${r.mismatches} break the pattern${r.firstMismatch ? ` (first: ${r.firstMismatch})` : ""}\n`);
      return r.mismatches === 0 ? 0 : 1;
    }
    const s =
      sub === "start"
        ? await callUnary(c, c.startStress, req!).catch(failed("StartStress"))
        : sub === "stop"
          ? await callUnary(c, c.stopStress, {}).catch(failed("StopStress"))
          : await callUnary(c, c.getStress, {}).catch(failed("GetStress"));
    process.stdout.write(values.json ? `${JSON.stringify({ vm, host: g.host, ...s })}\n` : `${formatStatus(s, where)}\n`);
    return 0;
  } finally {
    g.close();
  }
}
