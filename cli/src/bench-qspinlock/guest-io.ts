// `virtmesh bench qspinlock`, second part (issue 7 item 3): the guest's own
// I/O path under its spinlock. A live stack (null backend, so the device is
// never the bottleneck) whose guest has 4x as many vCPU threads as the host
// has cores; fio randread 4k runs one job per vCPU, every job contending on the
// virtqueue's lock (vq->lock) to submit and the boot CPU taking it to reap.
// Rows: IOPS and lock statistics for ticket and queue locks, PV off and on, at
// 1x, 2x and 4x (quick: 4x only). Summary: guest_fio_pv_speedup_4x (queue
// lock, PV on IOPS over PV off IOPS at 4x).
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import * as grpc from "@grpc/grpc-js";
import type { BenchRow } from "@virtmesh/bench";
import { guest } from "@virtmesh/proto";
import { Stack } from "../stack";

const REPO_ROOT = resolve(__dirname, "../../..");
const VM = "vm1";
const HOST = "bench-qspinlock";
const IODEPTH = 4;
/** Null disk; every job gets 1/64 of it, so up to 64 jobs fit. */
const DISK_BYTES = 2 ** 34;

export interface GuestIoResult {
  rows: BenchRow[];
  summary: Record<string, number | boolean | null>;
  params: Record<string, unknown>;
}

function runFio(c: guest.GuestServiceClient, req: guest.FioRequest): Promise<guest.FioResult> {
  return new Promise((ok, fail) => {
    c.runFio(req, new grpc.Metadata(), { deadline: Date.now() + req.runtimeMs + 120_000 }, (e, r) => (e ? fail(new Error(e.details || e.message)) : ok(r!)));
  });
}

export async function runGuestIoBench(opts: { quick: boolean; onProgress?: (line: string) => void }): Promise<GuestIoResult> {
  const say = opts.onProgress ?? (() => undefined);
  const cores = availableParallelism();
  const factors = opts.quick ? [4] : [1, 2, 4];
  const runtimeMs = opts.quick ? 1000 : 3000;
  // The queue (128 descriptors, one slot kept for control requests) and the guest's 64
  // vCPUs bound the jobs a run can have; a host with many cores gets less than 4x.
  const maxJobs = Math.min(64, Math.floor(127 / IODEPTH));
  const vcpus = Math.min(4 * cores, maxJobs);
  const dir = mkdtempSync(join(tmpdir(), "virtmesh-bench-qspinlock-"));
  const stackId = randomBytes(3).toString("hex");
  const stack = new Stack({
    root: REPO_ROOT,
    stateDir: dir,
    hosts: [HOST],
    vms: [{ vm: VM, host: HOST }],
    natsUrl: undefined,
    basePort: 0,
    shmBase: "/dev/shm",
    stackId,
    env: {
      VIRTMESH_STATE_DIR: dir,
      VIRTMESH_DISK_BACKEND: "null",
      VIRTMESH_DISK_BYTES: String(DISK_BYTES),
      VIRTMESH_BLK_TRACE_EVERY: "0",
      VIRTMESH_GUEST_VCPUS: String(vcpus),
    },
    log: () => undefined,
  });
  const rows: BenchRow[] = [];
  const iops = new Map<string, number>();
  let client: guest.GuestServiceClient | null = null;
  try {
    say(`guest I/O under vq->lock: starting a stack (null disk, ${vcpus} guest vCPUs on ${cores} host cores)`);
    await stack.start();
    const gd = stack.snapshot().services.find((s) => s.instance === `guest-driver-${VM}`);
    if (!gd?.grpc) throw new Error("the bench stack's guest-driver is not serving");
    client = new guest.GuestServiceClient(gd.grpc, grpc.credentials.createInsecure());
    const base = { rw: "randread", blockSize: 4096, iodepth: IODEPTH, sizeBytes: DISK_BYTES / 64, verify: "", rwmixRead: 0 };
    // Start the vCPU threads and touch the path once, unmeasured.
    await runFio(client, { ...base, numjobs: vcpus, runtimeMs: 300, spinlock: "queue", pvSpinlock: "on" });
    for (const f of factors) {
      const numjobs = Math.min(f * cores, vcpus);
      const row: BenchRow = { section: "guest-fio", numjobs, host_cores: cores, overcommit: Math.round((numjobs / cores) * 100) / 100 };
      // A-B-B-A per lock kind, so a drift in the machine's load hits PV off and on alike.
      for (const kind of ["ticket", "queue"] as const) {
        const got: Record<string, number[]> = { off: [], on: [] };
        const stats: Record<string, guest.SpinlockStats[]> = { off: [], on: [] };
        for (const pv of ["off", "on", "on", "off"] as const) {
          const r = await runFio(client, { ...base, numjobs, runtimeMs: runtimeMs / 2, spinlock: kind, pvSpinlock: pv });
          if (r.verifyErrors > 0) throw new Error(`${kind} PV ${pv} at ${f}x: ${r.verifyErrors} failed requests: ${r.verifyFailures[0] ?? ""}`);
          got[pv]!.push(r.iops);
          stats[pv]!.push(r.spinlock!);
        }
        for (const pv of ["off", "on"] as const) {
          const mean = (got[pv]![0]! + got[pv]![1]!) / 2;
          iops.set(`${kind}-${pv}-${f}`, mean);
          row[`${kind}_pv_${pv}_iops`] = Math.round(mean);
          const s = stats[pv]!;
          row[`${kind}_pv_${pv}_contended_pct`] = Math.round((1000 * s.reduce((a, x) => a + x.slowpath, 0)) / Math.max(1, s.reduce((a, x) => a + x.acquisitions, 0))) / 10;
          if (pv === "on") {
            row[`${kind}_pv_halts`] = s.reduce((a, x) => a + x.halts, 0);
            row[`${kind}_pv_kicks`] = s.reduce((a, x) => a + x.kicks, 0);
          }
        }
        row[`${kind}_pv_speedup`] = Math.round((100 * iops.get(`${kind}-on-${f}`)!) / Math.max(1e-9, iops.get(`${kind}-off-${f}`)!)) / 100;
        say(`  ${f}x (${numjobs} jobs): ${kind} lock PV off ${Math.round(iops.get(`${kind}-off-${f}`)!)} IOPS, PV on ${Math.round(iops.get(`${kind}-on-${f}`)!)} IOPS`);
      }
      rows.push(row);
    }
  } finally {
    client?.close();
    await stack.stop(); // removes the stack's shared-memory directories too
    rmSync(dir, { recursive: true, force: true });
  }
  const ratio = (kind: string, f: number): number | null => {
    const on = iops.get(`${kind}-on-${f}`);
    const off = iops.get(`${kind}-off-${f}`);
    return on !== undefined && off !== undefined && off > 0 ? Math.round((100 * on) / off) / 100 : null;
  };
  return {
    rows,
    summary: { guest_fio_pv_speedup_4x: ratio("queue", 4), guest_fio_ticket_pv_speedup_4x: ratio("ticket", 4), guest_fio_overcommit_at_4x: Math.round((vcpus / cores) * 100) / 100 },
    params: {
      guest_fio: {
        backend: "null",
        rw: "randread",
        bs: 4096,
        iodepth: IODEPTH,
        guest_vcpus: vcpus,
        runtime_ms_per_mode: runtimeMs,
        order: "per lock kind: PV off, on, on, off (half the runtime each), IOPS averaged per mode",
        vcpus_note: "one guest vCPU thread per job plus the boot CPU, which takes the interrupts",
      },
    },
  };
}
