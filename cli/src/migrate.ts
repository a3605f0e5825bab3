// virtmesh migrate: live migration through the cluster's migration-manager.
//   virtmesh migrate <vm> --to HOST [--bandwidth 1G] [--downtime-limit 300] [--auto-converge]
//       [--dirty-reporting precopy|stop-only] [--skip-ballooned] [--free-page-hinting]
//       [--max-time MS] [--json]
//   virtmesh migrate status [ID] [--json]
//   virtmesh migrate cancel ID
// The manager is found as every command finds a service: the stack's NATS (state.json,
// else NATS_URL), then the registry (svc.cluster.migration-manager).
import { parseArgs } from "node:util";
import { credentials, Metadata, type ServiceError } from "@grpc/grpc-js";
import { ConfigError, checkName } from "@virtmesh/config";
import { connectNats, drainNats, Registry } from "@virtmesh/nats";
import { callUnary, migration } from "@virtmesh/proto";
import { defaultStateDir, readState } from "./state";
import { CliError, UsageError } from "./errors";
import { formatBytes } from "./balloon";
import { phaseName } from "@virtmesh/migration";

const P = migration.MigrationPhase;
type Status = migration.MigrationStatus;

export const MIGRATE_USAGE = `usage: virtmesh migrate <vm> --to HOST [--bandwidth 1G] [--downtime-limit MS] [--auto-converge]
                        [--dirty-reporting precopy|stop-only] [--skip-ballooned] [--free-page-hinting]
                        [--max-time MS] [--json]
       virtmesh migrate status [ID] [--json]
       virtmesh migrate cancel ID`;

const OPTIONS = {
  to: { type: "string" },
  bandwidth: { type: "string" },
  "downtime-limit": { type: "string" },
  "auto-converge": { type: "boolean" },
  "dirty-reporting": { type: "string" },
  "skip-ballooned": { type: "boolean" },
  "free-page-hinting": { type: "boolean" },
  "max-time": { type: "string" },
  json: { type: "boolean" },
  "state-dir": { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

const UNITS: Record<string, number> = { "": 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** "1G", "500M", "100000" -> bytes per second (binary units, an optional "B" or "/s"). */
export function parseBandwidth(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?(?:\/s)?$/i.exec(s.trim());
  if (!m) throw new UsageError(`--bandwidth ${s} is not a rate: bytes per second, or with K, M, G or T (e.g. 1G, 500M)`);
  const v = Math.round(Number(m[1]) * UNITS[m[2]!.toLowerCase()]!);
  if (!Number.isSafeInteger(v) || v < 4096) throw new UsageError(`--bandwidth ${s} must be at least 4K (one page per second)`);
  return v;
}

function intFlag(flag: string, s: string | undefined, min: number, max: number): number {
  if (s === undefined) return 0;
  const v = Number(s);
  if (!/^\d+$/.test(s.trim()) || !Number.isSafeInteger(v) || v < min || v > max) throw new UsageError(`--${flag} ${s} must be an integer number of milliseconds in [${min}, ${max}]`);
  return v;
}

type MigrateValues = ReturnType<typeof parse>["values"];

function parse(args: string[]) {
  try {
    return parseArgs({ args, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError(`${(e as Error).message.split("\n")[0]!} (see 'virtmesh migrate --help')`);
  }
}

/** The StartMigrationRequest for `migrate <vm> ...` flags; one clear line for a bad one. */
export function startRequest(vmArg: string, v: MigrateValues): migration.StartMigrationRequest {
  let vm: string;
  let to: string;
  try {
    vm = checkName("vm", vmArg);
    if (!v.to) throw new UsageError("--to HOST is required (see 'virtmesh migrate --help')");
    to = checkName("host", v.to);
  } catch (e) {
    if (e instanceof ConfigError) throw new UsageError(e.message);
    throw e;
  }
  const dr = v["dirty-reporting"] ?? "precopy";
  if (dr !== "precopy" && dr !== "stop-only") throw new UsageError(`--dirty-reporting ${dr} must be precopy or stop-only`);
  return migration.StartMigrationRequest.fromPartial({
    vm,
    destinationHost: to,
    bandwidthBytesPerS: v.bandwidth === undefined ? 0 : parseBandwidth(v.bandwidth),
    downtimeLimitMs: intFlag("downtime-limit", v["downtime-limit"], 1, 2_000_000),
    autoConverge: v["auto-converge"] ?? false,
    dirtyReporting: dr === "precopy" ? migration.DirtyReporting.DIRTY_REPORTING_PRECOPY : migration.DirtyReporting.DIRTY_REPORTING_STOP_ONLY,
    skipBallooned: v["skip-ballooned"] ?? false,
    freePageHinting: v["free-page-hinting"] ?? false,
    maxTotalMs: intFlag("max-time", v["max-time"], 1, 3_600_000),
  });
}

const rate = (n: number) => `${formatBytes(n)}/s`;

const isFinal = (p: migration.MigrationPhase) => p === P.MIGRATION_PHASE_COMPLETED || p === P.MIGRATION_PHASE_FAILED || p === P.MIGRATION_PHASE_CANCELLED;

/** One line: phase, a bar of memory sent, round, remaining, dirty rate, throttle. */
export function progressLine(s: Status, width = 24): string {
  const total = s.totalBytes || 1;
  const done = Math.max(0, Math.min(1, 1 - s.remainingBytes / total));
  const filled = Math.round(done * width);
  const exp = s.expectedDowntimeMs === 0xffffffff ? "∞" : `${s.expectedDowntimeMs}`;
  return (
    `${s.id} [${"#".repeat(filled)}${".".repeat(width - filled)}] ${(done * 100).toFixed(0).padStart(3)}% ${phaseName(s.phase)}` +
    ` round ${s.round} sent ${formatBytes(s.transferredBytes)} left ${formatBytes(s.remainingBytes)}` +
    ` dirty ${rate(s.dirtyRateBytesPerS)} bw ${rate(s.bandwidthBytesPerS)} throttle ${s.throttlePct}% expected ${exp}/${s.downtimeLimitMs} ms`
  );
}

/** The final report (QEMU's `info migrate`, plus the integrity check and the trace). */
export function formatReport(s: Status): string {
  const exp = s.expectedDowntimeMs === 0xffffffff ? "unbounded" : `${s.expectedDowntimeMs} ms`;
  const lines = [
    `migration ${s.id}: ${s.vm} ${s.sourceHost} -> ${s.destinationHost}: ${phaseName(s.phase)}${s.error ? ` (${s.error})` : ""}`,
    `  total        ${s.totalMs} ms (setup ${s.setupMs} ms)`,
    `  downtime     ${s.phase === P.MIGRATION_PHASE_COMPLETED ? `${s.actualDowntimeMs} ms` : "-"} (limit ${s.downtimeLimitMs} ms, expected ${exp})` +
      (s.phase === P.MIGRATION_PHASE_COMPLETED ? (s.actualDowntimeMs <= s.downtimeLimitMs ? " within the limit" : " OVER the limit") : ""),
    `  memory       ${formatBytes(s.totalBytes)}; transferred ${formatBytes(s.transferredBytes)}; zero pages ${s.zeroPages}; skipped pages ${s.skippedPages}; remaining ${formatBytes(s.remainingBytes)}`,
    `  rate         dirty ${rate(s.dirtyRateBytesPerS)}; bandwidth ${rate(s.bandwidthBytesPerS)}; ${s.pagesPerS} pages/s; throttle ${s.throttlePct}%`,
    `  device state ${formatBytes(s.deviceStateBytes)}, save + load ${s.deviceStateMs} ms`,
    `  rounds       ${s.rounds.length} (dirty syncs ${s.round})`,
  ];
  if (s.rounds.length) {
    lines.push("    round      pages       zero      bytes      ms   bandwidth  dirty vcpu/dev/vfio  dirty rate  expected  throttle");
    for (const r of s.rounds) {
      const e = r.expectedDowntimeMs === 0xffffffff ? "∞" : `${r.expectedDowntimeMs}`;
      lines.push(
        `    ${String(r.round).padStart(5)} ${String(r.pages).padStart(10)} ${String(r.zeroPages).padStart(10)} ${formatBytes(r.bytes).padStart(10)} ${String(r.durationMs).padStart(7)} ${rate(r.bandwidthBytesPerS).padStart(11)}  ${`${r.dirtyVcpu}/${r.dirtyDevice}/${r.dirtyVfio}`.padStart(19)} ${rate(r.dirtyRateBytesPerS).padStart(11)} ${`${e} ms`.padStart(9)} ${`${r.throttlePct}%`.padStart(9)}`,
      );
    }
  }
  const ck = s.sourceChecksum || s.destinationChecksum;
  lines.push(`  integrity    ${ck ? (s.memoryMatch ? `memory checksums match (${s.sourceChecksum})` : `memory checksums DIFFER (source ${s.sourceChecksum}, destination ${s.destinationChecksum})`) : "not checked (no switchover)"}`);
  lines.push(`  trace        ${s.traceId || "-"}`);
  return lines.join("\n") + "\n";
}

function statusJson(s: Status): unknown {
  return migration.MigrationStatus.toJSON(s);
}

function failed(what: string, e: unknown): CliError {
  const se = e as ServiceError;
  return new CliError(`${what}: ${se.details || se.message}`);
}

async function withManager<T>(values: MigrateValues, fn: (c: migration.MigrationServiceClient) => Promise<T>): Promise<T> {
  const dir = values["state-dir"] ?? defaultStateDir();
  const natsUrl = readState(dir)?.nats.url ?? process.env.NATS_URL;
  if (!natsUrl) throw new CliError(`no running stack in ${dir} (start one with 'virtmesh up') and NATS_URL is not set`);
  const nc = await connectNats(natsUrl, "virtmesh-cli-migrate", 5000);
  let client: migration.MigrationServiceClient | undefined;
  try {
    const registry = await Registry.open(nc);
    const svc = await registry.getService("cluster", "migration-manager");
    if (!svc) throw new CliError("the migration-manager is not registered (is the stack up?)");
    client = new migration.MigrationServiceClient(svc.grpc, credentials.createInsecure(), { "grpc.max_receive_message_length": 64 << 20 });
    return await fn(client);
  } finally {
    client?.close();
    await drainNats(nc);
  }
}

/** Follows a migration to its final phase: WatchMigration, GetMigration polls if the stream breaks. */
export async function follow(c: migration.MigrationServiceClient, id: string, onStatus: (s: Status) => void): Promise<Status> {
  let last: Status | undefined;
  await new Promise<void>((resolve) => {
    const stream = c.watchMigration({ id }, new Metadata());
    stream.on("data", (s: Status) => {
      last = s;
      onStatus(s);
    });
    stream.on("error", () => resolve());
    stream.on("end", () => resolve());
  });
  while (!last || !isFinal(last.phase)) {
    await new Promise((r) => setTimeout(r, 500));
    try {
      last = await callUnary(c, c.getMigration, { id });
      onStatus(last);
    } catch (e) {
      const se = e as ServiceError;
      if (se.code === 5) throw failed(`GetMigration(${id})`, e);
    }
  }
  return last;
}

async function start(vmArg: string, values: MigrateValues): Promise<number> {
  const req = startRequest(vmArg, values);
  return withManager(values, async (c) => {
    const first = await callUnary(c, c.startMigration, req).catch((e: unknown) => {
      throw failed(`StartMigration(${req.vm} -> ${req.destinationHost})`, e);
    });
    const tty = !values.json && process.stdout.isTTY === true;
    if (!values.json) process.stdout.write(`${first.id}: migrating ${first.vm} ${first.sourceHost} -> ${first.destinationHost} (trace ${first.traceId || "-"})\n`);
    // Ctrl-C cancels the migration (the source keeps running) and waits for the rollback.
    let interrupted = false;
    const onInt = () => {
      if (interrupted) process.exit(130);
      interrupted = true;
      process.stderr.write(`\ncancelling ${first.id} (Ctrl-C again to stop waiting)\n`);
      void callUnary(c, c.cancelMigration, { id: first.id }).catch((e: unknown) => process.stderr.write(`virtmesh: ${failed("CancelMigration", e).message}\n`));
    };
    process.on("SIGINT", onInt);
    let lastKey = "";
    let drawn = false;
    try {
      const final = await follow(c, first.id, (s) => {
        if (values.json) return;
        if (tty) {
          const cols = process.stdout.columns || 120;
          process.stdout.write(`\r${progressLine(s).slice(0, cols - 1).padEnd(cols - 1)}`);
          drawn = true;
          return;
        }
        const key = `${s.phase}/${s.round}`;
        if (key !== lastKey) {
          lastKey = key;
          process.stdout.write(`${progressLine(s)}\n`);
        }
      });
      if (drawn) process.stdout.write("\n");
      process.stdout.write(values.json ? `${JSON.stringify(statusJson(final), null, 2)}\n` : formatReport(final));
      return final.phase === P.MIGRATION_PHASE_COMPLETED ? 0 : 1;
    } finally {
      process.off("SIGINT", onInt);
    }
  });
}

async function status(id: string | undefined, values: MigrateValues): Promise<number> {
  return withManager(values, async (c) => {
    if (id) {
      const s = await callUnary(c, c.getMigration, { id }).catch((e: unknown) => {
        throw failed(`GetMigration(${id})`, e);
      });
      process.stdout.write(values.json ? `${JSON.stringify(statusJson(s), null, 2)}\n` : formatReport(s));
      return 0;
    }
    const { migrations } = await callUnary(c, c.listMigrations, {}).catch((e: unknown) => {
      throw failed("ListMigrations", e);
    });
    if (values.json) {
      process.stdout.write(`${JSON.stringify(migrations.map(statusJson), null, 2)}\n`);
      return 0;
    }
    if (!migrations.length) {
      process.stdout.write("no migrations\n");
      return 0;
    }
    process.stdout.write("ID              VM        FROM -> TO       PHASE          TOTAL ms  DOWNTIME ms  ROUNDS  ERROR\n");
    for (const s of migrations) {
      process.stdout.write(
        `${s.id.padEnd(15)} ${s.vm.padEnd(9)} ${`${s.sourceHost} -> ${s.destinationHost}`.padEnd(16)} ${phaseName(s.phase).padEnd(14)} ${String(s.totalMs).padStart(8)}  ${String(s.actualDowntimeMs).padStart(11)}  ${String(s.rounds.length).padStart(6)}  ${s.error}\n`,
      );
    }
    return 0;
  });
}

async function cancel(id: string, values: MigrateValues): Promise<number> {
  return withManager(values, async (c) => {
    const s = await callUnary(c, c.cancelMigration, { id }).catch((e: unknown) => {
      throw failed(`CancelMigration(${id})`, e);
    });
    const final = await follow(c, id, () => {});
    if (values.json) process.stdout.write(`${JSON.stringify(statusJson(final), null, 2)}\n`);
    else process.stdout.write(`${id}: ${phaseName(s.phase)} -> ${phaseName(final.phase)}${final.error ? ` (${final.error})` : ""}\n`);
    return final.phase === P.MIGRATION_PHASE_CANCELLED ? 0 : 1;
  });
}

/** Entry point for `virtmesh migrate …` (its own flags); returns the exit code. */
export async function migrate(args: string[]): Promise<number> {
  const { values, positionals } = parse(args);
  if (values.help) {
    process.stdout.write(`${MIGRATE_USAGE}\n`);
    return 0;
  }
  const [first, second, ...extra] = positionals;
  if (!first) throw new UsageError(MIGRATE_USAGE.split("\n")[0]!);
  if (first === "status") {
    if (extra.length) throw new UsageError("usage: virtmesh migrate status [ID] [--json]");
    return status(second, values);
  }
  if (first === "cancel") {
    if (!second || extra.length) throw new UsageError("usage: virtmesh migrate cancel ID");
    return cancel(second, values);
  }
  if (second !== undefined) throw new UsageError(`unexpected argument '${second}' (see 'virtmesh migrate --help')`);
  return start(first, values);
}
