// virtmesh command line. Heavy modules (gRPC, the stack) are loaded per command so that
// `demo` can start OpenTelemetry before @grpc/grpc-js is first required.
import { parseArgs } from "node:util";

export const USAGE = `virtmesh — a distributed emulation of a KVM host's paravirtual I/O and memory stack

Usage: virtmesh <command> [options]

Stack:
  demo                 bring up hosts src and dst (and NATS unless NATS_URL is set), run the
                       demo across every service, print the report and the trace, tear down
  up                   start the same stack in the background and return when it is healthy
  status [--json]      report each service of the running stack (exit 1 if any is unhealthy)
  down                 stop the running stack; leaves no process and no shared-memory file

Drive a running stack:
  fio --rw read|write|randread|randwrite|randrw [--bs 4k] [--iodepth 32] [--numjobs N]
      [--size S] [--runtime T] [--verify crc32c] [--rwmixread P] [--vm vm1] [--json]
      [--lock ticket|queue] [--pv on|off]
                       fio-like workload on the guest's virtio-blk disk (vhost-blk, seed 000);
                       jobs run on the guest's vCPU threads (one each, up to
                       VIRTMESH_GUEST_VCPUS), contending on the virtqueue's spinlock
                       (seed 002; default: the guest's configured lock)
  balloon set <vm> <size> | stats <vm> [--json]
                       virtio-balloon target and statistics (seed 003)
  stress <vm> --working-set SIZE [--dirty-rate SIZE] [--vcpus N] | stress <vm> stop|status|verify
                       the guest's memory-dirtying workload on its vCPU threads (QEMU
                       migration-test's pattern); verify checks the pattern page by page
  migrate <vm> --to HOST [--bandwidth 1G] [--downtime-limit MS] [--auto-converge]
          [--dirty-reporting precopy|stop-only] [--skip-ballooned] [--free-page-hinting]
          [--max-time MS] [--json]
                       live migration (QEMU's pre-copy): dirty logging at every source,
                       rounds until the rest fits in the downtime limit (default 300 ms),
                       then stop-and-copy with the device state; progress bar and report
  migrate status [ID] [--json] | migrate cancel ID
                       a migration's record (all of them without ID); cancel one in
                       progress (the source guest keeps running)
  ioband devices|settings|cgroup|attach ... [--host H] [--cgroup /]
                       blkio-cgroup / dm-ioband control (seed 001); 'virtmesh ioband help'
  lockbench [--lock queue|ticket] [--pv on|off] [--vcpus N] [--iterations N]
            [--host-cores N] [--unfair] [--ple-window N] [--json]
                       the seed-002 lock micro-benchmark: N vCPU threads contending on
                       one guest spinlock, with halt/kick statistics

Benchmarks:
  bench <name> [--quick] [--json FILE]
                       name: ${"BENCHES"}

Options for demo and up:
  --hosts a,b          host names (default src,dst)
  --vm NAME            the VM to boot (default vm1)
  --vm-host HOST       host the VM boots on (default: the first host)
  --base-port N        give services consecutive gRPC ports from N (default 0: free ports)
  --state-dir DIR      where state.json and logs live (default $VIRTMESH_STATE_DIR or
                       $TMPDIR/virtmesh-<uid>)

Environment: NATS_URL (use this NATS instead of starting one), OTEL_EXPORTER_OTLP_ENDPOINT
(also send spans to this OTLP/HTTP endpoint, e.g. Jaeger's :4318), VIRTMESH_STATE_DIR,
VIRTMESH_SHM_DIR (parent of the hosts' shared-memory directories, default /dev/shm).
`;

export interface Values {
  json?: string | boolean;
  quick?: boolean;
  hosts?: string;
  vm?: string;
  "vm-host"?: string;
  "base-port"?: string;
  "state-dir"?: string;
  help?: boolean;
  lock?: string;
  pv?: string;
  vcpus?: string;
  iterations?: string;
  "host-cores"?: string;
  "ple-window"?: string;
  unfair?: boolean;
  host?: string;
  cgroup?: string;
  rw?: string;
  bs?: string;
  iodepth?: string;
  numjobs?: string;
  size?: string;
  runtime?: string;
  verify?: string;
  rwmixread?: string;
  "working-set"?: string;
  "dirty-rate"?: string;
}

import { UsageError } from "./errors";
export { UsageError };

export const OPTIONS = {
  json: { type: "string" },
  quick: { type: "boolean" },
  hosts: { type: "string" },
  vm: { type: "string" },
  "vm-host": { type: "string" },
  "base-port": { type: "string" },
  "state-dir": { type: "string" },
  help: { type: "boolean", short: "h" },
  lock: { type: "string" },
  pv: { type: "string" },
  vcpus: { type: "string" },
  iterations: { type: "string" },
  "host-cores": { type: "string" },
  "ple-window": { type: "string" },
  unfair: { type: "boolean" },
  host: { type: "string" },
  cgroup: { type: "string" },
  rw: { type: "string" },
  bs: { type: "string" },
  iodepth: { type: "string" },
  numjobs: { type: "string" },
  size: { type: "string" },
  runtime: { type: "string" },
  verify: { type: "string" },
  rwmixread: { type: "string" },
  "working-set": { type: "string" },
  "dirty-rate": { type: "string" },
} as const;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === "help" || cmd === "--help" || cmd === "-h") {
    const { BENCH_NAMES } = require("./bench") as typeof import("./bench");
    process.stdout.write(USAGE.replace("BENCHES", BENCH_NAMES.join(", ")));
    return 0;
  }
  // migrate parses its own flags (cli/src/migrate.ts).
  if (cmd === "migrate") return (require("./migrate") as typeof import("./migrate")).migrate(rest);
  // `--json FILE` for bench; a plain `--json` flag for status.
  const options = cmd === "bench" ? OPTIONS : { ...OPTIONS, json: { type: "boolean" } as const };
  let parsed: { values: Values; positionals: string[] };
  try {
    parsed = parseArgs({ args: rest, options, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message.split("\n")[0]!);
  }
  if (parsed.values.help) {
    const { BENCH_NAMES } = require("./bench") as typeof import("./bench");
    process.stdout.write(USAGE.replace("BENCHES", BENCH_NAMES.join(", ")));
    return 0;
  }
  switch (cmd) {
    case "demo":
      return (require("./demo") as typeof import("./demo")).demo(parsed.values, parsed.positionals);
    case "up":
      return (require("./commands") as typeof import("./commands")).up(parsed.values, parsed.positionals);
    case "__supervise":
      return (require("./commands") as typeof import("./commands")).supervise(parsed.values);
    case "status":
      return (require("./commands") as typeof import("./commands")).status(parsed.values, parsed.positionals);
    case "down":
      return (require("./commands") as typeof import("./commands")).down(parsed.values, parsed.positionals);
    case "fio":
      return (require("./fio") as typeof import("./fio")).fio(parsed.values, parsed.positionals);
    case "balloon":
      return (require("./balloon") as typeof import("./balloon")).balloon(parsed.values, parsed.positionals);
    case "ioband":
      return (require("./ioband") as typeof import("./ioband")).ioband(parsed.values, parsed.positionals);
    case "stress":
      return (require("./stress") as typeof import("./stress")).stress(parsed.values, parsed.positionals);
    case "lockbench":
      return (require("./lockbench") as typeof import("./lockbench")).lockbench(parsed.values, parsed.positionals);
    case "bench":
      return (require("./bench") as typeof import("./bench")).bench(parsed.values, parsed.positionals);
    default:
      throw new UsageError(`unknown command '${cmd}' (run 'virtmesh help')`);
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    const err = e as Error;
    const known = ["UsageError", "StackStartError", "ConfigError", "NatsServerMissingError", "NatsUnreachableError", "CliError"];
    process.stderr.write(`virtmesh: ${known.includes(err.name) ? err.message : (err.stack ?? String(e))}\n`);
    process.exit(err.name === "UsageError" ? 2 : 1);
  },
);
