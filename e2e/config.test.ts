// Bad configuration (issue 2): a service exits with one clear line; the launcher reports
// which service failed and why, and leaves nothing running.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startNatsServer, type NatsServerHandle } from "@virtmesh/nats";
import { service, virtmesh, pidAlive } from "./helpers";
import type { StackState } from "../cli/src/state";
import { readState } from "../cli/src/state";

let nats: NatsServerHandle;
const dirs: string[] = [];

before(async () => {
  nats = await startNatsServer();
});
after(async () => {
  await nats.stop();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function oneLine(stderr: string): string {
  const lines = stderr.split("\n").filter((l) => l.trim() !== "");
  assert.equal(lines.length, 1, `expected one line on stderr, got:\n${stderr}`);
  return lines[0]!;
}

const base = () => ({ ...process.env, NATS_URL: nats.url, VIRTMESH_HOST: "src", VIRTMESH_START_TIMEOUT_MS: "1500" });

test("a bad port stops a service with one line naming the variable", async () => {
  const r = await service("vhost-worker", { ...base(), VIRTMESH_GRPC_PORT: "99999" });
  assert.equal(r.code, 2);
  assert.match(oneLine(r.stderr), /^vhost-worker: bad configuration: VIRTMESH_GRPC_PORT=99999 is not a TCP port/);
});

test("unreachable NATS stops a service with one line", async () => {
  const r = await service("balloon-host", { ...base(), NATS_URL: "nats://127.0.0.1:1" });
  assert.equal(r.code, 2);
  assert.match(oneLine(r.stderr), /^balloon-host@src: cannot reach NATS at nats:\/\/127\.0\.0\.1:1/);
});

test("an unknown host name stops a host service with one line naming the known hosts", async () => {
  const r = await service("completion-thread", { ...base(), VIRTMESH_HOST: "nowhere" });
  assert.equal(r.code, 2);
  assert.match(oneLine(r.stderr), /^completion-thread@nowhere: unknown host 'nowhere': no shm-sidecar has registered it/);
});

test("a malformed host name and a malformed NATS URL are refused", async () => {
  const a = await service("vhost-worker", { ...base(), VIRTMESH_HOST: "Src/../x" });
  assert.match(oneLine(a.stderr), /VIRTMESH_HOST 'Src\/\.\.\/x' is not a valid name/);
  const b = await service("vhost-worker", { ...base(), NATS_URL: "http://127.0.0.1:4222" });
  assert.match(oneLine(b.stderr), /NATS_URL=http:\/\/127\.0\.0\.1:4222 has scheme http:/);
});

async function failingUp(args: string[], env: NodeJS.ProcessEnv): Promise<{ stderr: string; state: StackState | undefined; dir: string }> {
  const dir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-config-"));
  dirs.push(dir);
  const r = await virtmesh(["up", "--state-dir", dir, ...args], { ...env, VIRTMESH_START_TIMEOUT_MS: "1500" });
  assert.equal(r.code, 1, `up should fail: ${r.stdout}${r.stderr}`);
  const state = readState(dir);
  // Nothing is left running.
  for (const s of state?.services ?? []) assert.equal(pidAlive(s.pid), false, `${s.instance} still running`);
  if (state) assert.equal(pidAlive(state.supervisorPid), false);
  for (const d of state?.shmDirs ?? []) assert.equal(existsSync(d), false);
  return { stderr: r.stderr, state, dir };
}

test("the launcher reports which service failed and why: unknown host for the VM", async () => {
  const { stderr } = await failingUp(["--vm-host", "nowhere"], { ...process.env, NATS_URL: nats.url });
  assert.match(oneLine(stderr), /^virtmesh: guest-driver-vm1@nowhere failed to start: guest-driver-vm1@nowhere: unknown host 'nowhere'.*known hosts: .*dst.*src/);
});

test("the launcher reports which service failed and why: a port out of range", async () => {
  // 11 services from 65530: the seventh and later get ports above 65535.
  const { stderr } = await failingUp(["--base-port", "65530"], { ...process.env, NATS_URL: nats.url });
  assert.match(oneLine(stderr), /failed to start: [a-z-]+: bad configuration: VIRTMESH_GRPC_PORT=655\d\d is not a TCP port/);
});

test("the launcher reports unreachable NATS", async () => {
  const dir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-config-"));
  dirs.push(dir);
  const r = await virtmesh(["up", "--state-dir", dir], { ...process.env, NATS_URL: "nats://127.0.0.1:1" });
  assert.equal(r.code, 1);
  assert.match(oneLine(r.stderr), /cannot reach NATS at nats:\/\/127\.0\.0\.1:1/);
});

test("bad flags are one line and exit 2", async () => {
  const r = await virtmesh(["up", "--hosts", "src,SRC"], process.env);
  assert.equal(r.code, 1);
  assert.match(oneLine(r.stderr), /host 'SRC' is not a valid name/);
  const u = await virtmesh(["frobnicate"], process.env);
  assert.equal(u.code, 2);
  assert.match(oneLine(u.stderr), /unknown command 'frobnicate'/);
  const f = await virtmesh(["status", "--bogus"], process.env);
  assert.equal(f.code, 2);
  assert.match(oneLine(f.stderr), /Unknown option '--bogus'/);
});
