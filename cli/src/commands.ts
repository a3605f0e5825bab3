// virtmesh up | __supervise | status | down
import { spawn } from "node:child_process";
import { openSync, closeSync, appendFileSync, rmSync, mkdirSync, existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { randomBytes } from "node:crypto";
import { checkName, ConfigError } from "@virtmesh/config";
import { Stack, checkHealth, type StackOptions } from "./stack";
import { defaultStateDir, pidAlive, readState, statePath, writeState, type StackState } from "./state";
import type { Values } from "./main";

import { CliError } from "./errors";
export { CliError };

export const ROOT = resolve(__dirname, "..", "..");
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function stackOptions(v: Values, log: (line: string) => void, stackId?: string): StackOptions {
  try {
    const hosts = (v.hosts ?? "src,dst").split(",").map((h) => checkName("host", h.trim()));
    if (new Set(hosts).size !== hosts.length) throw new ConfigError(`--hosts ${v.hosts} names a host twice`);
    const vm = checkName("vm", v.vm ?? "vm1");
    const vmHost = checkName("--vm-host", v["vm-host"] ?? hosts[0]!);
    const basePort = v["base-port"] === undefined ? 0 : Number(v["base-port"]);
    if (!Number.isInteger(basePort) || basePort < 0 || basePort > 65535) {
      throw new ConfigError(`--base-port ${v["base-port"]} is not a port number (0..65535)`);
    }
    const shmBase = process.env.VIRTMESH_SHM_DIR || "/dev/shm";
    if (!shmBase.startsWith("/")) throw new ConfigError(`VIRTMESH_SHM_DIR=${shmBase} must be an absolute path`);
    return {
      root: ROOT,
      stateDir: resolve(v["state-dir"] ?? defaultStateDir()),
      hosts,
      vms: [{ vm, host: vmHost }],
      natsUrl: process.env.NATS_URL || undefined,
      basePort,
      shmBase,
      stackId: stackId ?? randomBytes(3).toString("hex"),
      env: {},
      log,
      // Every service is supervised (restart with backoff and a limit, cli/src/stack.ts):
      // vhost-worker and completion-thread resume their rings from shared memory, balloon-host
      // its ballooned pages, a guest-driver boots its VM afresh or waits for one again.
    };
  } catch (e) {
    if (e instanceof ConfigError) throw new CliError(e.message);
    throw e;
  }
}

function table(s: StackState, healthy: Map<string, boolean>): string {
  const rows = s.services.map((r) => [
    `${r.instance}`,
    r.host,
    String(r.pid),
    r.grpc || "-",
    healthy.get(`${r.host}/${r.instance}`) ? "healthy" : `UNHEALTHY${r.exit ? ` (${r.exit})` : ""}`,
  ]);
  const head = ["service", "host", "pid", "grpc", "health"];
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => r.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd();
  return [line(head), ...rows.map(line)].join("\n");
}

export async function up(v: Values, _pos: string[]): Promise<number> {
  const o = stackOptions(v, () => undefined);
  const prev = readState(o.stateDir);
  if (prev && pidAlive(prev.supervisorPid)) {
    throw new CliError(`a stack is already running from ${o.stateDir} (supervisor pid ${prev.supervisorPid}); run 'virtmesh down' first`);
  }
  rmSync(statePath(o.stateDir), { force: true });
  mkdirSync(o.stateDir, { recursive: true });
  const logFile = join(o.stateDir, "launcher.log");
  const fd = openSync(logFile, "a");
  const args = [join(ROOT, "bin", "virtmesh.cjs"), "__supervise", "--state-dir", o.stateDir, "--hosts", o.hosts.join(","), "--vm", o.vms[0]!.vm, "--vm-host", o.vms[0]!.host, "--base-port", String(o.basePort)];
  const child = spawn(process.execPath, args, { detached: true, stdio: ["ignore", fd, fd], env: process.env });
  closeSync(fd);
  child.unref();
  process.stdout.write(`starting virtmesh (supervisor pid ${child.pid}, log ${logFile})\n`);
  const deadline = Date.now() + 120_000;
  while (Date.now() < deadline) {
    const s = readState(o.stateDir);
    if (s?.error) {
      const until = Date.now() + 30_000;
      while (pidAlive(child.pid ?? 0) && Date.now() < until) await sleep(100);
      throw new CliError(s.error);
    }
    if (s?.ready) {
      const h = new Map(s.services.map((r) => [`${r.host}/${r.instance}`, true] as const));
      process.stdout.write(`${table(s, h)}\nNATS ${s.nats.url}${s.nats.managed ? ` (nats-server pid ${s.nats.pid})` : ""}\nstate ${statePath(o.stateDir)}\n`);
      return 0;
    }
    if (!pidAlive(child.pid ?? 0) && !s?.ready) {
      throw new CliError(`the supervisor exited before the stack was ready; see ${logFile}`);
    }
    await sleep(200);
  }
  throw new CliError(`the stack did not become ready within 120 s; see ${logFile}`);
}

export async function supervise(v: Values): Promise<number> {
  const log = (line: string) => process.stdout.write(`${new Date().toISOString()} launcher: ${line}\n`);
  const o = stackOptions(v, log);
  const stack = new Stack(o);
  const startedAt = new Date().toISOString();
  let ready = false;
  let error: string | undefined;
  const save = () => writeState(o.stateDir, { ...stack.snapshot(), ready, ...(error ? { error } : {}), startedAt });
  stack.onChange = save;
  let stopping: Promise<void> | undefined;
  const stop = (why: string) => {
    if (!stopping) {
      log(`stopping (${why})`);
      stopping = stack.stop().then(() => {
        rmSync(statePath(o.stateDir), { force: true });
        rmSync(join(o.stateDir, "nats"), { recursive: true, force: true });
        log("stopped");
      });
    }
    return stopping;
  };
  process.on("SIGTERM", () => void stop("SIGTERM").then(() => process.exit(0)));
  process.on("SIGINT", () => void stop("SIGINT").then(() => process.exit(0)));
  save();
  try {
    await stack.start();
  } catch (e) {
    const why = (e as Error).message;
    log(`start failed: ${why}`);
    await stack.stop();
    // Only now, with everything stopped, does `up` learn of the error and report it.
    error = why;
    save();
    return 1;
  }
  ready = true;
  save();
  log(`stack ${o.stackId} ready: ${stack.snapshot().services.length} services`);
  await new Promise(() => undefined);
  return 0;
}

export async function status(v: Values, _pos: string[]): Promise<number> {
  const dir = resolve(v["state-dir"] ?? defaultStateDir());
  const s = readState(dir);
  if (!s || !pidAlive(s.supervisorPid)) {
    if (v.json) process.stdout.write(JSON.stringify({ running: false, services: [] }) + "\n");
    else process.stdout.write(`no virtmesh stack is running (state dir ${dir})\n`);
    return 3;
  }
  const healthy = new Map<string, boolean>();
  await Promise.all(
    s.services.map(async (r) => {
      const ok = pidAlive(r.pid) && r.grpc !== "" && (await checkHealth(r.grpc, 1500));
      healthy.set(`${r.host}/${r.instance}`, ok);
    }),
  );
  const all = [...healthy.values()].every(Boolean);
  if (v.json) {
    const out = {
      running: true,
      supervisor: { pid: s.supervisorPid },
      nats: s.nats,
      services: s.services.map((r) => ({
        name: r.name,
        instance: r.instance,
        host: r.host,
        healthy: healthy.get(`${r.host}/${r.instance}`) ?? false,
        pid: r.pid,
        grpc: r.grpc,
        state: r.state,
        ...(r.exit ? { exit: r.exit } : {}),
        restarts: r.restarts,
      })),
    };
    process.stdout.write(JSON.stringify(out, null, 2) + "\n");
  } else {
    process.stdout.write(`${table(s, healthy)}\nNATS ${s.nats.url}\n`);
  }
  return all ? 0 : 1;
}

export async function down(v: Values, _pos: string[]): Promise<number> {
  const dir = resolve(v["state-dir"] ?? defaultStateDir());
  const s = readState(dir);
  if (!s) {
    process.stdout.write(`no virtmesh stack is running (state dir ${dir})\n`);
    return 0;
  }
  if (pidAlive(s.supervisorPid)) {
    process.kill(s.supervisorPid, "SIGTERM");
    const deadline = Date.now() + 60_000;
    while (pidAlive(s.supervisorPid) && Date.now() < deadline) await sleep(100);
  }
  // Whatever the supervisor could not stop (it was killed, or timed out) is stopped here.
  let forced = 0;
  for (const pid of [...s.services.map((r) => r.pid), s.nats.managed ? s.nats.pid : 0, s.supervisorPid]) {
    if (pid && pidAlive(pid)) {
      try {
        process.kill(pid, "SIGKILL");
        forced++;
      } catch {
        /* gone */
      }
    }
  }
  for (const d of s.shmDirs) if (existsSync(d)) rmSync(d, { recursive: true, force: true });
  rmSync(statePath(dir), { force: true });
  rmSync(join(dir, "nats"), { recursive: true, force: true });
  appendFileSync(join(dir, "launcher.log"), `${new Date().toISOString()} launcher: down${forced ? ` (forced ${forced} processes)` : ""}\n`);
  process.stdout.write(`virtmesh stack stopped${forced ? ` (${forced} processes had to be killed)` : ""}\n`);
  return 0;
}
