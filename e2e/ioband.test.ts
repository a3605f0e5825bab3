// Issue 5, part 3: the blkio-cgroup control language of seed 001 through a real stack.
// `virtmesh up` with VIRTMESH_IOBAND_DEVICES set, then every control-language error of the
// issue through the real command line (`virtmesh ioband …`), each as one line
// `virtmesh: …` with exit 1 and nothing changed; every change arrives on NATS with trace
// context; a bad VIRTMESH_IOBAND_DEVICES stops vhost-worker with one line.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { NatsConnection } from "@nats-io/transport-node";
import { connectNats, drainNats } from "@virtmesh/nats";
import { service, virtmesh, pidAlive, until, type RunResult } from "./helpers";

const DEVICES = "ioband1:weight,ioband2:weight@ioband1,ioband3:range-bw";
const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-ioband-"));
let env: NodeJS.ProcessEnv;
let pids: number[] = [];
let natsUrl = "";
let nc: NatsConnection | undefined;

interface Seen {
  subject: string;
  body: Record<string, unknown>;
  traceparent: string;
}
const seen: Seen[] = [];

function ioband(...args: string[]): Promise<RunResult> {
  return virtmesh(["ioband", ...args], env, 30_000);
}

async function ok(...args: string[]): Promise<string> {
  const r = await ioband(...args);
  assert.equal(r.code, 0, `ioband ${args.join(" ")}: ${r.stderr}`);
  assert.equal(r.stderr, "");
  return r.stdout;
}

/** One line on stderr, `virtmesh: … <STATUS>: …`, exit 1, nothing on stdout. */
function isError(r: RunResult, status: string, what: string): void {
  assert.equal(r.code, 1, `${what}: exit ${r.code}, stderr ${r.stderr}`);
  assert.equal(r.stdout, "", what);
  assert.match(r.stderr, /^virtmesh: [^\n]+\n$/, `${what}: one line`);
  assert.ok(r.stderr.includes(`: ${status}: `), `${what}: expected ${status}, got ${r.stderr}`);
}

/** Runs the cases a few at a time (each is a CLI process) and checks each error. */
async function errors(cases: [status: string, ...args: string[]][]): Promise<void> {
  for (let i = 0; i < cases.length; i += 4) {
    const batch = cases.slice(i, i + 4);
    const rs = await Promise.all(batch.map(([, ...args]) => ioband(...args)));
    rs.forEach((r, j) => isError(r, batch[j]![0], `ioband ${batch[j]!.slice(1).join(" ")}`));
  }
}

function events(subject: string): Seen[] {
  return seen.filter((s) => s.subject === subject);
}

const SRC = "virtmesh.src.vhost-worker.ioband";

/** A successful write is followed by its event: every event published before it has arrived too. */
async function barrier(): Promise<Seen[]> {
  const before = events(SRC).length;
  await ok("devices", "write", "/", "ioband1 reset");
  await until("the barrier event", () => (events(SRC).length > before && events(SRC).at(-1)!.body.kind === "device" ? true : undefined), 10_000);
  return events(SRC).slice(before, -1);
}

before(async () => {
  env = { ...process.env, VIRTMESH_STATE_DIR: stateDir, VIRTMESH_IOBAND_DEVICES: DEVICES };
  delete env.NATS_URL;
  const r = await virtmesh(["up"], env);
  assert.equal(r.code, 0, `virtmesh up failed: ${r.stderr}`);
  const state = JSON.parse(readFileSync(join(stateDir, "state.json"), "utf8")) as { services: { pid: number }[]; nats: { pid: number; url: string }; supervisorPid: number };
  pids = [state.supervisorPid, state.nats.pid, ...state.services.map((s) => s.pid)];
  natsUrl = state.nats.url;
  nc = await connectNats(natsUrl, "e2e-ioband", 5000);
  for (const subject of ["virtmesh.*.vhost-worker.ioband", "virtmesh.vm.*.ioband"]) {
    nc.subscribe(subject, {
      callback: (err, msg) => {
        if (err) return;
        seen.push({ subject: msg.subject, body: msg.json<Record<string, unknown>>(), traceparent: msg.headers?.get("traceparent") ?? "" });
      },
    });
  }
  await nc.flush();
});

after(async () => {
  await drainNats(nc);
  const r = await virtmesh(["down"], env, 90_000);
  for (const pid of pids) if (pidAlive(pid)) process.kill(pid, "SIGKILL");
  rmSync(stateDir, { recursive: true, force: true });
  assert.equal(r.code, 0, `virtmesh down failed: ${r.stderr}`);
});

test("devices read: each ioband share (policy, io_throttle, io_limit, token/carryover for weight) and the devices under it, on every host", async () => {
  const want = "ioband1 policy=weight io_throttle=4 io_limit=128 token=512 carryover=4\n  ioband1\n  ioband2\nioband3 policy=range-bw io_throttle=4 io_limit=128\n  ioband3\n";
  assert.equal(await ok("devices"), want);
  assert.equal(await ok("devices", "--host", "dst"), want);
  assert.equal(await ok("settings", "/"), "ioband1 weight=100\nioband2 weight=100\nioband3 range-bw=0:0\n");
});

test("changes: cgroup create, devices write, settings attach/update/detach, VM device attach; each one event with trace context", async () => {
  assert.equal(await ok("cgroup", "create", "/vm1"), "/vm1 id=2\n");
  assert.equal(await ok("cgroup", "create", "/vm2"), "/vm2 id=3\n");
  await ok("devices", "write", "/", "ioband1 io_throttle 8");
  await ok("devices", "write", "/", "ioband3", "io_limit", "64"); // the line may also come as words
  await ok("settings", "write", "/vm1", "ioband1 40");
  await ok("settings", "write", "/vm1", "ioband1 60");
  await ok("settings", "write", "/vm1", "ioband3 100:200");
  await ok("settings", "write", "/vm2", "ioband2 20");
  await ok("settings", "write", "/vm2", "ioband2");
  await ok("attach", "vm1", "vda", "/vm1");
  assert.equal(await ok("settings", "/vm1"), "ioband1 weight=60\nioband3 range-bw=100:200\n");
  assert.equal(await ok("settings", "/vm2"), "");
  assert.match(await ok("devices"), /^ioband1 policy=weight io_throttle=8 io_limit=128 .*\nioband3 policy=range-bw io_throttle=4 io_limit=64\n/s);
  assert.equal(await ok("cgroup", "list"), "/ id=1\n/vm1 id=2\n/vm2 id=3\n");

  const got = await until("10 change events", () => (events(SRC).length >= 10 ? events(SRC) : undefined), 10_000);
  const strip = ({ at: _at, ...rest }: Record<string, unknown>) => rest;
  assert.deepEqual(got.map((s) => strip(s.body)), [
    { host: "src", kind: "cgroup", action: "create", cgroup: "/vm1", cgroupId: 2 },
    { host: "src", kind: "cgroup", action: "create", cgroup: "/vm2", cgroupId: 3 },
    { host: "src", kind: "device", device: "ioband1", head: "ioband1", argv: ["io_throttle", "8"] },
    { host: "src", kind: "device", device: "ioband3", head: "ioband3", argv: ["io_limit", "64"] },
    { host: "src", kind: "settings", device: "ioband1", head: "ioband1", cgroup: "/vm1", cgroupId: 2, action: "attach", value: "40" },
    { host: "src", kind: "settings", device: "ioband1", head: "ioband1", cgroup: "/vm1", cgroupId: 2, action: "update", value: "60" },
    { host: "src", kind: "settings", device: "ioband3", head: "ioband3", cgroup: "/vm1", cgroupId: 2, action: "attach", value: "100:200" },
    { host: "src", kind: "settings", device: "ioband1", head: "ioband2", cgroup: "/vm2", cgroupId: 3, action: "attach", value: "20" },
    { host: "src", kind: "settings", device: "ioband1", head: "ioband2", cgroup: "/vm2", cgroupId: 3, action: "detach", value: null },
    { host: "src", kind: "vm-device", vm: "vm1", device: "vda", cgroup: "/vm1", cgroupId: 2 },
  ]);
  for (const s of got) assert.match(s.traceparent, /^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$/, "W3C trace context in the headers");
  const perVm = await until("the per-VM event", () => events("virtmesh.vm.vm1.ioband")[0], 10_000);
  assert.equal(perVm.body.kind, "vm-device");
  assert.equal(perVm.body.cgroup, "/vm1");
  assert.equal(events("virtmesh.dst.vhost-worker.ioband").length, 0, "dst saw none of src's changes");
});

test("devices write errors: not from the root cgroup -> permission denied; unknown name -> not found; bad arguments -> invalid argument", async () => {
  await errors([
    ["PERMISSION_DENIED", "devices", "write", "/vm1", "ioband1 io_throttle 16"],
    ["PERMISSION_DENIED", "devices", "write", "/vm1", "nosuch io_throttle 16"],
    ["NOT_FOUND", "devices", "write", "/", "nosuch io_throttle 16"],
    ["NOT_FOUND", "devices", "write", "/nope", "ioband1 io_throttle 16"],
    ["INVALID_ARGUMENT", "devices", "write", "/", ""],
    ["INVALID_ARGUMENT", "devices", "write", "/", "ioband1"],
    ["INVALID_ARGUMENT", "devices", "write", "/", "ioband1 io_throttle"],
    ["INVALID_ARGUMENT", "devices", "write", "/", "ioband1 io_throttle 16 17"],
    ["INVALID_ARGUMENT", "devices", "write", "/", "ioband1 io_throttle 32768"],
    ["INVALID_ARGUMENT", "devices", "write", "/", "ioband1 io_limit 4"],
    ["INVALID_ARGUMENT", "devices", "write", "/", "ioband1 policy fifo"],
    ["INVALID_ARGUMENT", "devices", "write", "/", "ioband1 bogus 1"],
    ["NOT_FOUND", "devices", "write", "/", "ioband1 attach 77"],
  ]);
  assert.deepEqual(await barrier(), [], "a refused write publishes nothing");
  assert.match(await ok("devices"), /^ioband1 policy=weight io_throttle=8 io_limit=128 /);
});

test("settings errors: argument count, unknown device, root detach, weight 1..32767, range-bw 0 <= min <= max <= INT_MAX/2", async () => {
  await errors([
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", ""],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband1 40 50"],
    ["NOT_FOUND", "settings", "write", "/vm2", "nosuch 40"],
    ["NOT_FOUND", "settings", "write", "/vm2", "ioband9"],
    ["NOT_FOUND", "settings", "write", "/nope", "ioband1 40"],
    ["NOT_FOUND", "settings", "/nope"],
    ["INVALID_ARGUMENT", "settings", "write", "/", "ioband1"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband1"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband1 0"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband1 32768"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband1 -5"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband1 4x"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm1", "ioband1 0"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband3 5"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband3 10:5"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband3 -1:5"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband3 0:1073741824"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm2", "ioband3 a:b"],
    ["INVALID_ARGUMENT", "settings", "write", "/vm1", "ioband3 300:200"],
  ]);
  assert.deepEqual(await barrier(), [], "a refused write publishes nothing");
  assert.equal(await ok("settings", "/vm1"), "ioband1 weight=60\nioband3 range-bw=100:200\n");
  assert.equal(await ok("settings", "/vm2"), "");
  // The bounds themselves are accepted.
  await ok("settings", "write", "/vm2", "ioband1 1");
  await ok("settings", "write", "/vm2", "ioband1 32767");
  await ok("settings", "write", "/vm2", "ioband3 0:1073741823");
  assert.equal(await ok("settings", "/vm2"), "ioband1 weight=32767\nioband3 range-bw=0:1073741823\n");
});

test("cgroups and VM devices: errors, and removing a cgroup detaches it from every device", async () => {
  await errors([
    ["INVALID_ARGUMENT", "cgroup", "create", "/vm1"],
    ["NOT_FOUND", "cgroup", "create", "/missing/child"],
    ["INVALID_ARGUMENT", "cgroup", "remove", "/"],
    ["NOT_FOUND", "cgroup", "remove", "/nope"],
    ["FAILED_PRECONDITION", "cgroup", "remove", "/vm1"], // vm1/vda is charged to it
    ["NOT_FOUND", "attach", "vm1", "vda", "/nope"],
    ["NOT_FOUND", "cgroup", "list", "/nope"],
  ]);
  const before = events(SRC).length;
  await ok("cgroup", "remove", "/vm2");
  assert.equal(await ok("cgroup", "list"), "/ id=1\n/vm1 id=2\n");
  await until("the remove events", () => (events(SRC).length >= before + 3 ? true : undefined), 10_000);
  assert.deepEqual(
    events(SRC)
      .slice(before)
      .map((s) => `${s.body.kind} ${s.body.action} ${s.body.head ?? ""} ${s.body.cgroup}`),
    ["settings detach ioband1 /vm2", "settings detach ioband3 /vm2", "cgroup remove  /vm2"],
  );
  await errors([["NOT_FOUND", "settings", "/vm2"]]);
  // Move the VM device back to the root: now /vm1 can go, and its settings go with it.
  await ok("attach", "vm1", "vda", "/");
  await ok("cgroup", "remove", "/vm1");
  assert.equal(await ok("settings", "/"), "ioband1 weight=100\nioband2 weight=100\nioband3 range-bw=0:0\n");
  assert.equal(await ok("cgroup", "list"), "/ id=1\n");
});

test("bad command lines are usage errors (exit 2, one line) and reach no service", async () => {
  for (const args of [[], ["devices", "write", "/"], ["settings", "write", "vm1", "ioband1 40"], ["attach", "vm1", "vda"], ["attach", "VM1", "vda", "/"], ["cgroup", "rename", "/a"], ["frob"]]) {
    const r = await ioband(...args);
    assert.equal(r.code, 2, `ioband ${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, /^virtmesh: [^\n]+\n$/);
  }
  const r = await ioband("devices", "--host", "nowhere");
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^virtmesh: host 'nowhere' has no vhost-worker registered/);
});

test("a bad VIRTMESH_IOBAND_DEVICES stops vhost-worker at start with one line", async () => {
  const r = await service("vhost-worker", { ...env, NATS_URL: natsUrl, VIRTMESH_HOST: "src", VIRTMESH_IOBAND_DEVICES: "ioband1:fifo", VIRTMESH_GRPC_PORT: "0" }, 30_000);
  assert.equal(r.code, 2, r.stderr);
  assert.equal(r.stderr, "vhost-worker@src: bad configuration: VIRTMESH_IOBAND_DEVICES=ioband1:fifo: policy 'fifo' of ioband1 is not one of weight, weight-iosize, range-bw\n");
  // The running vhost-worker@src still serves.
  assert.match(await ok("devices"), /^ioband1 policy=weight /);
});
