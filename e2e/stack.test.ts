// Issue 2's must-show: `virtmesh up`, `status --json`, `down` with every service healthy; one
// trace crossing all six services over gRPC and NATS, seen by an OTLP receiver started
// here; a SIGKILLed service noticed by `status` and by the launcher's log.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, existsSync, rmSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { credentials, Metadata } from "@grpc/grpc-js";
import { probe } from "@virtmesh/proto";
import { OtlpReceiver, type ReceivedSpan } from "@virtmesh/telemetry";
import { virtmesh, pidAlive, until } from "./helpers";

interface StatusJson {
  running: boolean;
  services: { name: string; instance: string; host: string; healthy: boolean; pid: number; grpc: string }[];
}

const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-stack-"));
const receiver = new OtlpReceiver();
let env: NodeJS.ProcessEnv;
let pids: number[] = [];
let shmDirs: string[] = [];

async function status(): Promise<{ code: number | null; json: StatusJson }> {
  const r = await virtmesh(["status", "--json"], env, 30_000);
  return { code: r.code, json: JSON.parse(r.stdout) as StatusJson };
}

before(async () => {
  await receiver.start();
  env = {
    ...process.env,
    VIRTMESH_STATE_DIR: stateDir,
    OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
    OTEL_BSP_SCHEDULE_DELAY: "200",
  };
  delete env.NATS_URL;
  const r = await virtmesh(["up"], env);
  assert.equal(r.code, 0, `virtmesh up failed: ${r.stderr}`);
  assert.match(r.stdout, /migration-manager/);
  const state = JSON.parse(readFileSync(join(stateDir, "state.json"), "utf8")) as { services: { pid: number }[]; nats: { pid: number }; supervisorPid: number; shmDirs: string[] };
  pids = [state.supervisorPid, state.nats.pid, ...state.services.map((s) => s.pid)];
  shmDirs = state.shmDirs;
});

after(async () => {
  // Clean up even when a test failed: down, then kill whatever is left.
  const r = await virtmesh(["down"], env, 90_000);
  for (const pid of pids) if (pidAlive(pid)) process.kill(pid, "SIGKILL");
  await receiver.stop();
  rmSync(stateDir, { recursive: true, force: true });
  assert.equal(r.code, 0, `virtmesh down failed: ${r.stderr}`);
});

test("status --json reports every service of both hosts healthy", async () => {
  const { code, json } = await status();
  assert.equal(code, 0);
  assert.equal(json.running, true);
  const names = new Set(json.services.map((s) => s.name));
  for (const n of ["shm-sidecar", "vhost-worker", "completion-thread", "balloon-host", "migration-manager", "guest-driver"]) assert.ok(names.has(n), `missing ${n}`);
  for (const h of ["src", "dst"]) assert.equal(json.services.filter((s) => s.host === h && s.name !== "guest-driver").length, 4);
  for (const h of ["src", "dst"]) assert.equal(json.services.filter((s) => s.host === h && s.name === "guest-driver").length, 1);
  assert.ok(json.services.every((s) => s.healthy), JSON.stringify(json.services));
  // Five per host, the incoming guest-driver included, and the migration-manager.
  assert.equal(json.services.length, 11);
});

test("one probe makes one trace whose parent->child edges cross all six services over gRPC and NATS", async () => {
  const { json } = await status();
  const mm = json.services.find((s) => s.name === "migration-manager")!;
  const traceId = randomBytes(16).toString("hex");
  const md = new Metadata();
  md.set("traceparent", `00-${traceId}-${randomBytes(8).toString("hex")}-01`);
  const G = probe.Transport.TRANSPORT_GRPC;
  const N = probe.Transport.TRANSPORT_NATS;
  const route: probe.ProbeHop[] = [
    { service: "shm-sidecar", host: "src", transport: N },
    { service: "vhost-worker", host: "src", transport: G },
    { service: "completion-thread", host: "src", transport: N },
    { service: "balloon-host", host: "src", transport: G },
    { service: "guest-driver-vm1", host: "src", transport: N },
    { service: "shm-sidecar", host: "dst", transport: G },
  ];
  const client = new probe.ProbeServiceClient(mm.grpc, credentials.createInsecure());
  const res = await new Promise<probe.ProbeResponse>((resolve, reject) =>
    client.probe({ route, payload: "e2e" }, md, { deadline: Date.now() + 30_000 }, (err, r) => (err ? reject(err) : resolve(r!))),
  );
  client.close();
  assert.deepEqual(
    res.visits.map((v) => `${v.service}@${v.host}`),
    ["migration-manager@cluster", "shm-sidecar@src", "vhost-worker@src", "completion-thread@src", "balloon-host@src", "guest-driver-vm1@src", "shm-sidecar@dst"],
  );
  assert.ok(res.visits.every((v) => v.traceId === traceId), "every service saw the same trace id");

  // Service-level edges from the spans: parent span's service -> child span's service.
  const expected = [
    "migration-manager@cluster -PRODUCER/CONSUMER-> shm-sidecar@src",
    "shm-sidecar@src -CLIENT/SERVER-> vhost-worker@src",
    "vhost-worker@src -PRODUCER/CONSUMER-> completion-thread@src",
    "completion-thread@src -CLIENT/SERVER-> balloon-host@src",
    "balloon-host@src -PRODUCER/CONSUMER-> guest-driver@src",
    "guest-driver@src -CLIENT/SERVER-> shm-sidecar@dst",
  ];
  const kinds = ["", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"];
  const edges = (spans: ReceivedSpan[]) => {
    const byId = new Map(spans.map((s) => [s.spanId, s]));
    const out = new Set<string>();
    for (const s of spans) {
      const p = byId.get(s.parentSpanId);
      if (p && p.service !== s.service) out.add(`${p.service} -${kinds[p.kind]}/${kinds[s.kind]}-> ${s.service}`);
    }
    return out;
  };
  const seen = await until(
    "the trace's spans from every service",
    () => {
      const e = edges(receiver.trace(traceId));
      return expected.every((x) => e.has(x)) ? e : undefined;
    },
    30_000,
  ).catch((err: Error) => {
    throw new Error(`${err.message}; edges seen: ${[...edges(receiver.trace(traceId))].join("; ")}`);
  });
  for (const x of expected) assert.ok(seen.has(x), x);
  const nats = receiver.trace(traceId).filter((s) => s.attributes["messaging.system"] === "nats");
  assert.ok(nats.length >= 6, "NATS spans carry messaging.system=nats");
});

test("a bad probe route gets INVALID_ARGUMENT and the service keeps serving", async () => {
  const { json } = await status();
  const mm = json.services.find((s) => s.name === "migration-manager")!;
  const client = new probe.ProbeServiceClient(mm.grpc, credentials.createInsecure());
  const call = (route: probe.ProbeHop[]) =>
    new Promise<{ code: number; details: string }>((resolve) =>
      client.probe({ route, payload: "" }, (err) => resolve({ code: err?.code ?? 0, details: err?.details ?? "" })),
    );
  const bad = await call([{ service: "../etc", host: "src", transport: probe.Transport.TRANSPORT_GRPC }]);
  assert.equal(bad.code, 3);
  assert.match(bad.details, /service '\.\.\/etc' is not a valid name/);
  const missing = await call([{ service: "shm-sidecar", host: "nowhere", transport: probe.Transport.TRANSPORT_GRPC }]);
  assert.equal(missing.code, 14);
  assert.match(missing.details, /shm-sidecar@nowhere is not registered/);
  const ok = await call([]);
  assert.equal(ok.code, 0);
  client.close();
});

test("a service killed with SIGKILL is noticed, logged and restarted by the launcher", async () => {
  const { json } = await status();
  const victim = json.services.find((s) => s.name === "balloon-host" && s.host === "dst")!;
  process.kill(victim.pid, "SIGKILL");
  const log = await until("the launcher's death and restart lines", () => {
    const l = readFileSync(join(stateDir, "launcher.log"), "utf8");
    return l.includes(`balloon-host@dst (pid ${victim.pid}) died: killed by SIGKILL`) && /restarting balloon-host@dst in \d+ ms/.test(l) ? l : undefined;
  }, 20_000);
  assert.ok(log);
  const back = await until(
    "status to report a new, healthy balloon-host@dst",
    async () => {
      const s = await status();
      const v = s.json.services.find((x) => x.instance === "balloon-host" && x.host === "dst");
      return s.code === 0 && v && v.healthy && v.pid !== victim.pid ? v : undefined;
    },
    60_000,
  );
  pids.push(back.pid);
});

test("down stops everything and leaves no process and no shared-memory file", async () => {
  const r = await virtmesh(["down"], env, 90_000);
  assert.equal(r.code, 0, r.stderr);
  for (const pid of pids) assert.equal(pidAlive(pid), false, `pid ${pid} still alive`);
  for (const d of shmDirs) assert.equal(existsSync(d), false, `${d} left behind`);
  assert.equal(existsSync(join(stateDir, "state.json")), false);
  const leftovers = readdirSync("/dev/shm").filter((f) => shmDirs.some((d) => d.endsWith(f)));
  assert.deepEqual(leftovers, []);
  const s = await virtmesh(["status", "--json"], env, 30_000);
  assert.equal(s.code, 3);
  assert.equal((JSON.parse(s.stdout) as StatusJson).running, false);
});
