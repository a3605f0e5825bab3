// Issue 16 item 4: the launcher supervises every service it started (backoff, restart limit,
// every death and restart in launcher.log), and a CLI call that cannot reach a dead service
// prints one line naming it and what `status` says of it. Also the launcher's plan: an
// incoming guest-driver for each VM on every other host (the migration's destination).
// The stack runs in this process (the real Stack) and writes state.json and launcher.log as
// `virtmesh __supervise` does, so the real `virtmesh` CLI reads it. No guest-driver runs: the
// VM's placement is written to the registry here, which is all `balloon stats` resolves.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { appendFileSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import type { NatsConnection } from "@nats-io/transport-node";
import { connectNats, drainNats, Registry } from "@virtmesh/nats";
import { DEFAULT_SUPERVISION, Stack, restartDelay, shmDirFor, type StackOptions } from "../cli/src/stack";
import { writeState } from "../cli/src/state";
import { ROOT, pidAlive, until, virtmesh } from "./helpers";

const HOST = "sv";
const VM = "svvm";
// Long enough that a CLI call made right after the kill falls in the gap, deterministically.
const BACKOFF_MS = 15_000;
const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-sup-"));
const launcherLog = join(stateDir, "launcher.log");
let stack: Stack;
let nc: NatsConnection | undefined;
let pids: number[] = [];

function options(o: Partial<StackOptions> = {}): StackOptions {
  return {
    root: ROOT,
    stateDir,
    hosts: [HOST],
    vms: [],
    basePort: 0,
    shmBase: "/dev/shm",
    stackId: randomBytes(3).toString("hex"),
    env: {},
    log: (l) => appendFileSync(launcherLog, `${new Date().toISOString()} launcher: ${l}\n`),
    ...o,
  };
}

before(async () => {
  stack = new Stack(options({ supervision: { initialBackoffMs: BACKOFF_MS, maxBackoffMs: BACKOFF_MS, maxRestarts: 1 } }));
  const startedAt = new Date().toISOString();
  stack.onChange = () => writeState(stateDir, { ...stack.snapshot(), ready: true, startedAt });
  await stack.start();
  stack.onChange();
  pids = stack.snapshot().services.map((s) => s.pid);
  nc = await connectNats(stack.snapshot().nats.url, "e2e-supervision", 10_000);
  await (await Registry.open(nc)).putVm({ vm: VM, host: HOST, state: "RUN_STATE_RUNNING" });
});

after(async () => {
  await drainNats(nc);
  const all = [...pids, ...stack.snapshot().services.map((s) => s.pid), stack.snapshot().nats.pid];
  await stack.stop();
  for (const pid of all) if (pid > 0 && pidAlive(pid)) process.kill(pid, "SIGKILL");
  rmSync(stateDir, { recursive: true, force: true });
});

const env = () => ({ ...process.env, VIRTMESH_STATE_DIR: stateDir });
const balloonHost = () => stack.snapshot().services.find((s) => s.instance === "balloon-host")!;

test("restartDelay: 250 ms doubling to the cap, then the limit", () => {
  const p = DEFAULT_SUPERVISION;
  const now = 1_000_000;
  const times: number[] = [];
  const delays: (number | undefined)[] = [];
  for (let i = 0; i < 6; i++) {
    const d = restartDelay(p, times, now);
    delays.push(d);
    times.push(now);
  }
  assert.deepEqual(delays, [250, 500, 1000, 2000, 4000, undefined]);
  // Restarts older than the window no longer count.
  assert.equal(restartDelay(p, [now - p.windowMs - 1, now - p.windowMs], now), 250);
  assert.equal(restartDelay({ ...p, maxRestarts: 20 }, Array(10).fill(now) as number[], now), p.maxBackoffMs);
});

test("the plan: an incoming guest-driver for each VM on every other host, on by default with 2+ hosts", () => {
  const two = new Stack(options({ hosts: ["a", "b", "c"], vms: [{ vm: "vm1", host: "b" }] }));
  const gds = two.plan().filter((s) => s.name === "guest-driver");
  assert.deepEqual(gds.map((s) => `${s.instance}@${s.host}:${s.role}`), ["guest-driver-vm1@b:vm", "guest-driver-vm1@a:incoming", "guest-driver-vm1@c:incoming"]);
  for (const g of gds) {
    assert.equal(g.env.VIRTMESH_VM, "vm1");
    assert.equal(g.env.VIRTMESH_INCOMING, g.role === "incoming" ? "1" : "0");
    assert.equal(g.env.VIRTMESH_SHM_DIR, shmDirFor(two.o, g.host));
    // Shared storage: both sides open the same image.
    assert.equal(g.env.VIRTMESH_DISK, join(stateDir, "disks", "vm1.img"));
  }
  const off = new Stack(options({ hosts: ["a", "b"], vms: [{ vm: "vm1", host: "a" }], incoming: false }));
  assert.deepEqual(off.plan().filter((s) => s.name === "guest-driver").map((s) => s.host), ["a"]);
  const one = new Stack(options({ hosts: ["a"], vms: [{ vm: "vm1", host: "a" }] }));
  assert.deepEqual(one.plan().filter((s) => s.name === "guest-driver").map((s) => s.role), ["vm"]);
});

test("balloon-host killed: one clear CLI line during the gap, then restarted, all in launcher.log", async () => {
  const victim = balloonHost();
  process.kill(victim.pid, "SIGKILL");
  await until("the launcher to schedule the restart", () => (balloonHost().restartAt ? true : undefined), 20_000);

  const r = await virtmesh(["balloon", "stats", VM, "--state-dir", stateDir], env(), 60_000);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0]!, /^virtmesh: GetStats\(svvm\) on balloon-host@sv: balloon-host@sv is unreachable \(connection refused\); status: it died \(killed by SIGKILL\); the launcher restarts it at \d\d:\d\d:\d\d\.\d{3} \(restart 1\)/);
  assert.doesNotMatch(r.stderr, /No connection established|ECONNREFUSED|Last error/);

  const back = await until("balloon-host restarted and healthy", () => {
    const s = balloonHost();
    return s.state === "running" && s.pid !== victim.pid ? s : undefined;
  }, 60_000);
  pids.push(back.pid);
  assert.equal(back.restarts, 1);
  const st = await virtmesh(["status", "--json", "--state-dir", stateDir], env(), 30_000);
  const json = JSON.parse(st.stdout) as { services: { instance: string; healthy: boolean; restarts: number }[] };
  assert.equal(st.code, 0, st.stdout);
  assert.ok(json.services.every((s) => s.healthy), st.stdout);
  assert.equal(json.services.find((s) => s.instance === "balloon-host")!.restarts, 1);

  const log = readFileSync(launcherLog, "utf8");
  assert.ok(log.includes(`balloon-host@sv (pid ${victim.pid}) died: killed by SIGKILL`), log);
  assert.match(log, new RegExp(`restarting balloon-host@sv in ${BACKOFF_MS} ms \\(restart 1, 1 in the last 60 s\\)`));
  assert.ok(log.includes(`balloon-host@sv (pid ${back.pid}) healthy on`), log);
});

test("past the restart limit the launcher gives up, logs it, and the CLI says so", async () => {
  const victim = balloonHost();
  process.kill(victim.pid, "SIGKILL");
  await until("the launcher to give up", () => (balloonHost().state === "failed" ? true : undefined), 20_000);
  const log = readFileSync(launcherLog, "utf8");
  assert.ok(log.includes(`balloon-host@sv (pid ${victim.pid}) died: killed by SIGKILL`), log);
  assert.match(log, /giving up on balloon-host@sv: it died after 1 restarts within 60 s \(last: killed by SIGKILL\)/);
  const r = await virtmesh(["balloon", "stats", VM, "--state-dir", stateDir], env(), 60_000);
  assert.equal(r.code, 1);
  assert.match(r.stderr.trim(), /^virtmesh: GetStats\(svvm\) on balloon-host@sv: balloon-host@sv is unreachable \(connection refused\); status: it kept dying \(killed by SIGKILL\); the launcher gave up after 1 restarts/);
  assert.equal(r.stderr.trim().split("\n").length, 1);
});

test("stop leaves no process and no shared memory of the stack", async () => {
  const snap = stack.snapshot();
  const all = [...pids, ...snap.services.map((s) => s.pid), snap.nats.pid];
  await stack.stop();
  for (const pid of all) assert.equal(pid > 0 && pidAlive(pid), false, `pid ${pid} still alive`);
  for (const d of snap.shmDirs) assert.equal(existsSync(d), false, `${d} left behind`);
  assert.deepEqual(readdirSync("/dev/shm").filter((f) => f.includes(`virtmesh-${snap.stackId}-`)), []);
  // The stack made nothing outside its state dir besides the shm dirs it just removed.
  assert.ok(readFileSync(launcherLog, "utf8").length > 0);
});
