// Issue 11's must-show on the live stack: vm1 migrates between hosts src and dst while idle,
// while its vCPUs dirty memory, while a verified fio runs across the switchover, with its
// balloon inflated; back and forth; a cancelled migration leaves the source running. Every
// completed migration passes the integrity checks (memory checksums on both sides at
// switchover, the dirtying pattern on the destination, fio --verify, the disk seen from the
// new host), and its trace crosses all six services on both hosts.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { credentials, type Client } from "@grpc/grpc-js";
import { callUnary, guest, migration } from "@virtmesh/proto";
import { connectNats, drainNats, Registry } from "@virtmesh/nats";
import { OtlpReceiver, type ReceivedSpan } from "@virtmesh/telemetry";
import { virtmesh, pidAlive, run, BIN, until, sleep, type RunResult } from "./helpers";

const MIB = 1 << 20;
const Phase = migration.MigrationPhase;

interface StateJson {
  supervisorPid: number;
  nats: { pid: number; url: string };
  services: { name: string; instance: string; host: string; pid: number; grpc: string }[];
  shmDirs: string[];
}

const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-migration-"));
const receiver = new OtlpReceiver();
let env: NodeJS.ProcessEnv;
let state: StateJson;
let mm: migration.MigrationServiceClient;
const clients: Client[] = [];
const traces: { id: string; from: string; to: string }[] = [];

function readStateJson(): StateJson {
  return JSON.parse(readFileSync(join(stateDir, "state.json"), "utf8")) as StateJson;
}

function guestOn(host: string): guest.GuestServiceClient {
  const s = readStateJson().services.find((x) => x.instance === "guest-driver-vm1" && x.host === host);
  assert.ok(s, `no guest-driver-vm1 on ${host}`);
  const c = new guest.GuestServiceClient(s.grpc, credentials.createInsecure());
  clients.push(c);
  return c;
}

async function placement(): Promise<{ host: string; state: string }> {
  const nc = await connectNats(state.nats.url, "e2e-migration", 5000);
  try {
    const p = await (await Registry.open(nc)).getVm("vm1");
    assert.ok(p, "vm1 is registered");
    return { host: p.host, state: p.state };
  } finally {
    await drainNats(nc);
  }
}

const FINAL = new Set([Phase.MIGRATION_PHASE_COMPLETED, Phase.MIGRATION_PHASE_FAILED, Phase.MIGRATION_PHASE_CANCELLED]);

async function waitFinal(id: string, timeoutMs = 180_000): Promise<migration.MigrationStatus> {
  return until(
    `migration ${id} to end`,
    async () => {
      const s = await callUnary(mm, mm.getMigration, { id });
      return FINAL.has(s.phase) ? s : undefined;
    },
    timeoutMs,
  );
}

function request(from: string, to: string, o: Partial<migration.StartMigrationRequest> = {}): migration.StartMigrationRequest {
  return {
    vm: "vm1",
    sourceHost: from,
    destinationHost: to,
    bandwidthBytesPerS: 0,
    downtimeLimitMs: 300,
    autoConverge: false,
    dirtyReporting: migration.DirtyReporting.DIRTY_REPORTING_PRECOPY,
    skipBallooned: false,
    freePageHinting: false,
    maxTotalMs: 0,
    throttleInitialPct: 0,
    throttleIncrementPct: 0,
    throttleMaxPct: 0,
    ...o,
  };
}

/** No file of vm1 in `host`'s shared-memory directory. */
function vmFilesOn(host: string): string[] {
  const dir = state.shmDirs.find((d) => d.endsWith(`-${host}`));
  assert.ok(dir, `no shm dir for ${host}`);
  return existsSync(dir) ? readdirSync(dir).filter((f) => f.includes("vm1")) : [];
}

/** A completed migration and everything the issue checks after one. */
async function migrateAndCheck(from: string, to: string, o: Partial<migration.StartMigrationRequest> = {}): Promise<migration.MigrationStatus> {
  const started = await callUnary(mm, mm.startMigration, request(from, to, o));
  const s = await waitFinal(started.id);
  assert.equal(s.phase, Phase.MIGRATION_PHASE_COMPLETED, `migration ${s.id} ended ${migration.migrationPhaseToJSON(s.phase)}: ${s.error}`);
  assert.equal(s.memoryMatch, true, "guest memory checksums match at switchover");
  assert.equal(s.sourceChecksum, s.destinationChecksum);
  assert.ok(s.round >= 1 && s.rounds.length >= 1, "at least the bulk round ran");
  assert.ok(s.transferredBytes > 0);
  assert.ok(s.actualDowntimeMs >= 0 && s.totalMs > 0);
  assert.match(s.traceId, /^[0-9a-f]{32}$/);
  traces.push({ id: s.traceId, from, to });
  const p = await placement();
  assert.deepEqual(p, { host: to, state: "RUN_STATE_RUNNING" });
  const now = await callUnary(guestOn(to), guestOn(to).getState, {});
  assert.equal(now.state, guest.RunState.RUN_STATE_RUNNING);
  const old = await callUnary(guestOn(from), guestOn(from).getState, {});
  assert.equal(old.state, guest.RunState.RUN_STATE_INCOMING, "the source waits for the way back");
  assert.deepEqual(vmFilesOn(from), [], "the source released the VM's memory and rings");
  return s;
}

function fio(args: string[]): Promise<RunResult> {
  return run(process.execPath, [BIN, "fio", ...args], env, 180_000);
}

before(async () => {
  await receiver.start();
  env = {
    ...process.env,
    VIRTMESH_STATE_DIR: stateDir,
    OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
    OTEL_BSP_SCHEDULE_DELAY: "200",
    VIRTMESH_GUEST_MEMORY_BYTES: String(64 * MIB),
    VIRTMESH_DISK_BYTES: String(64 * MIB),
    VIRTMESH_GUEST_VCPUS: "2",
    // 32 slots of 1 MiB buffers fit a 64 MiB guest.
    VIRTMESH_BLK_QUEUE_SIZE: "32",
  };
  delete env.NATS_URL;
  const r = await virtmesh(["up"], env);
  assert.equal(r.code, 0, `virtmesh up failed: ${r.stderr}`);
  state = readStateJson();
  const m = state.services.find((s) => s.name === "migration-manager");
  assert.ok(m);
  mm = new migration.MigrationServiceClient(m.grpc, credentials.createInsecure());
  clients.push(mm);
});

after(async () => {
  for (const c of clients) c.close();
  const pids = state ? [state.supervisorPid, state.nats.pid, ...readStateJson().services.map((s) => s.pid)] : [];
  const r = await virtmesh(["down"], env, 90_000);
  for (const pid of pids) if (pidAlive(pid)) process.kill(pid, "SIGKILL");
  await receiver.stop();
  rmSync(stateDir, { recursive: true, force: true });
  assert.equal(r.code, 0, `virtmesh down failed: ${r.stderr}`);
});

test("an idle guest migrates src -> dst and its disk serves verified I/O there", async () => {
  await migrateAndCheck("src", "dst");
  const f = await fio(["--rw", "randrw", "--verify", "crc32c", "--size", "4m", "--json"]);
  assert.equal(f.code, 0, f.stderr);
  const out = JSON.parse(f.stdout) as { host: string; result: guest.FioResult };
  assert.equal(out.host, "dst");
  assert.equal(out.result.verifyErrors, 0);
});

test("a guest dirtying memory below the bandwidth migrates back and its pattern holds", async () => {
  const g = guestOn("dst");
  await callUnary(g, g.startStress, { workingSetBytes: 8 * MIB, dirtyRateBytesPerS: 4 * MIB, vcpus: 1 });
  await until("the walk to get going", async () => ((await callUnary(g, g.getStress, {})).pagesWritten > 4096 ? true : undefined), 30_000);
  const s = await migrateAndCheck("dst", "src", { bandwidthBytesPerS: 256 * MIB });
  assert.ok(s.rounds.some((r) => r.round > 0 && r.dirtyVcpu > 0), "pre-copy rounds found pages the vCPUs dirtied");
  const h = guestOn("src");
  const v = await callUnary(h, h.verifyStress, {});
  assert.equal(v.mismatches, 0, v.firstMismatch);
  assert.ok(v.pagesChecked >= 2048);
  const before = (await callUnary(h, h.getStress, {})).pagesWritten;
  await until("the walk to go on at the destination", async () => ((await callUnary(h, h.getStress, {})).pagesWritten > before ? true : undefined), 30_000);
  await callUnary(h, h.stopStress, {});
});

test("a verified fio running across the migration finishes on the destination with zero errors", async () => {
  const running = fio(["--rw", "randrw", "--verify", "crc32c", "--size", "8m", "--runtime", "6s", "--json"]);
  await sleep(1500);
  await migrateAndCheck("src", "dst");
  const f = await running;
  assert.equal(f.code, 0, f.stderr || f.stdout);
  const out = JSON.parse(f.stdout) as { result: guest.FioResult };
  assert.equal(out.result.verifyErrors, 0);
  assert.ok(out.result.readIos + out.result.writeIos > 0);
});

test("ballooned pages are skipped and counted, and the balloon stays inflated on the destination", async () => {
  const b = await virtmesh(["balloon", "set", "vm1", "16M", "--json"], env, 60_000);
  assert.equal(b.code, 0, b.stderr);
  const s = await migrateAndCheck("dst", "src", { skipBallooned: true });
  assert.ok(s.skippedPages >= 4096, `skipped ${s.skippedPages} pages`);
  const st = await virtmesh(["balloon", "stats", "vm1", "--json"], env, 60_000);
  assert.equal(st.code, 0, st.stderr);
  const j = JSON.parse(st.stdout) as { host: string; actualPages: number };
  assert.equal(j.host, "src");
  assert.equal(j.actualPages, 4096);
  const d = await virtmesh(["balloon", "set", "vm1", "0"], env, 60_000);
  assert.equal(d.code, 0, d.stderr);
});

test("a cancelled migration leaves the source guest running and nothing on the destination", async () => {
  const g = guestOn("src");
  // Flat out over a 4 MiB/s link: it cannot converge, so it is still in pre-copy rounds.
  await callUnary(g, g.startStress, { workingSetBytes: 16 * MIB, dirtyRateBytesPerS: 0, vcpus: 1 });
  const started = await callUnary(mm, mm.startMigration, request("src", "dst", { bandwidthBytesPerS: 4 * MIB }));
  const during = await until("a pre-copy round after the bulk one", async () => {
    const s = await callUnary(mm, mm.getMigration, { id: started.id });
    return (s.phase === Phase.MIGRATION_PHASE_PRECOPY && s.round >= 1) || FINAL.has(s.phase) ? s : undefined;
  }, 90_000);
  assert.equal(during.phase, Phase.MIGRATION_PHASE_PRECOPY, during.error);
  await callUnary(mm, mm.cancelMigration, { id: started.id });
  const s = await waitFinal(started.id);
  assert.equal(s.phase, Phase.MIGRATION_PHASE_CANCELLED, s.error);
  assert.deepEqual(await placement(), { host: "src", state: "RUN_STATE_RUNNING" });
  assert.equal((await callUnary(g, g.getState, {})).state, guest.RunState.RUN_STATE_RUNNING);
  const d = guestOn("dst");
  assert.equal((await callUnary(d, d.getState, {})).state, guest.RunState.RUN_STATE_INCOMING);
  await until("dst to hold no file of vm1", () => (vmFilesOn("dst").length === 0 ? true : undefined), 30_000);
  const before = (await callUnary(g, g.getStress, {})).pagesWritten;
  await until("the source guest to go on dirtying", async () => ((await callUnary(g, g.getStress, {})).pagesWritten > before ? true : undefined), 30_000);
  await callUnary(g, g.stopStress, {});
});

test("each migration's trace crosses all six services on both hosts", async () => {
  assert.ok(traces.length >= 2);
  const hostServices = ["shm-sidecar", "vhost-worker", "completion-thread", "balloon-host", "guest-driver"];
  for (const t of traces) {
    // Span services are named <service>@<host>.
    const want = ["migration-manager@cluster", ...hostServices.flatMap((x) => [`${x}@${t.from}`, `${x}@${t.to}`])];
    const seen = await until(
      `trace ${t.id} to hold every service on both hosts`,
      () => {
        const spans = receiver.trace(t.id);
        const names = new Set(spans.map((s) => s.service));
        return want.every((w) => names.has(w)) ? spans : undefined;
      },
      30_000,
    ).catch((err: Error) => {
      throw new Error(`${err.message}; services seen: ${[...new Set(receiver.trace(t.id).map((s) => s.service))].join(", ")}`);
    });
    const byId = new Map(seen.map((s: ReceivedSpan) => [s.spanId, s]));
    const edges = new Set<string>();
    for (const s of seen) {
      const p = byId.get(s.parentSpanId);
      if (p && p.service !== s.service) edges.add(`${p.service} -> ${s.service}`);
    }
    for (const e of [
      `migration-manager@cluster -> shm-sidecar@${t.from}`,
      `shm-sidecar@${t.from} -> shm-sidecar@${t.to}`, // the page stream
      `migration-manager@cluster -> guest-driver@${t.from}`,
      `migration-manager@cluster -> guest-driver@${t.to}`,
      `guest-driver@${t.from} -> vhost-worker@${t.from}`,
      `guest-driver@${t.to} -> vhost-worker@${t.to}`,
      `guest-driver@${t.to} -> balloon-host@${t.to}`,
    ]) {
      assert.ok(edges.has(e), `${e} in trace ${t.id}; edges: ${[...edges].join("; ")}`);
    }
  }
});
