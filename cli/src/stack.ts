// The stack: NATS (unless NATS_URL is given), then per host an shm-sidecar, vhost-worker,
// completion-thread and balloon-host, the cluster's migration-manager, and one
// guest-driver per VM, plus (with 2+ hosts) an incoming guest-driver for each VM on every
// other host: the destination side of a live migration (VIRTMESH_INCOMING=1, no VM of its
// own until a migration loads one; docs: the migration design's "The flow").
// `virtmesh demo` runs a Stack in the foreground; `virtmesh up` runs it inside a detached
// supervisor process (`virtmesh __supervise`). The Stack supervises what it started: a
// service that dies is restarted with exponential backoff, up to a limit (issue 16).
import { spawn, type ChildProcess } from "node:child_process";
import { appendFileSync, mkdirSync, openSync, closeSync, rmSync, existsSync } from "node:fs";
import { join } from "node:path";
import { credentials, Metadata } from "@grpc/grpc-js";
import type { NatsConnection } from "@nats-io/transport-node";
import { connectNats, drainNats, Registry, startNatsServer, type NatsServerHandle } from "@virtmesh/nats";
import { health } from "@virtmesh/proto";

export const HOST_SERVICES = ["shm-sidecar", "vhost-worker", "completion-thread", "balloon-host"] as const;

export interface StackOptions {
  root: string;
  stateDir: string;
  hosts: string[];
  vms: { vm: string; host: string }[];
  natsUrl?: string;
  basePort: number;
  shmBase: string;
  stackId: string;
  /** Extra environment for every service (OTEL_*, VIRTMESH_* tuning). */
  env: Record<string, string>;
  log: (line: string) => void;
  /**
   * Which services are restarted when they die unexpectedly: every one by default.
   * Return false to leave a service dead (its death is still logged).
   */
  restart?: (svc: ServiceRecord) => boolean;
  /** Backoff and restart limit; false turns supervision off. */
  supervision?: Partial<SupervisionPolicy> | false;
  /**
   * Start, for each VM, an incoming guest-driver (VIRTMESH_INCOMING=1) on every other host,
   * so a migration has a destination. Default: on when there are 2 or more hosts.
   */
  incoming?: boolean;
}

export interface SupervisionPolicy {
  /** Delay before the first restart; doubles with each restart in the window. */
  initialBackoffMs: number;
  maxBackoffMs: number;
  /** More than this many restarts within `windowMs` and the launcher gives up on the service. */
  maxRestarts: number;
  windowMs: number;
}

export const DEFAULT_SUPERVISION: SupervisionPolicy = { initialBackoffMs: 250, maxBackoffMs: 8000, maxRestarts: 5, windowMs: 60_000 };

/**
 * The delay before the next restart, or undefined when the limit is reached.
 * `recent`: times (ms) of the restarts already made; `now`: the time of this death.
 */
export function restartDelay(p: SupervisionPolicy, recent: readonly number[], now: number): number | undefined {
  const inWindow = recent.filter((t) => now - t < p.windowMs).length;
  if (inWindow >= p.maxRestarts) return undefined;
  return Math.min(p.maxBackoffMs, p.initialBackoffMs * 2 ** inWindow);
}

export interface ServiceRecord {
  name: string;
  instance: string;
  host: string;
  pid: number;
  grpc: string;
  log: string;
  /** "failed": it kept dying and the launcher gave up restarting it. */
  state: "starting" | "running" | "exited" | "stopped" | "failed";
  exit?: string;
  restarts: number;
  /** guest-driver only: the VM it drives, and whether it runs it or waits for a migration. */
  vm?: string;
  role?: "vm" | "incoming";
  /** When the launcher will restart it (ISO time); set only while a restart is pending. */
  restartAt?: string;
}

export interface StackSnapshot {
  stackId: string;
  supervisorPid: number;
  nats: { url: string; pid: number; managed: boolean };
  hosts: string[];
  shmDirs: string[];
  stateDir: string;
  services: ServiceRecord[];
}

export class StackStartError extends Error {
  override readonly name = "StackStartError";
}

interface Managed {
  rec: ServiceRecord;
  spec: Spec;
  child?: ChildProcess;
  lastStderr: string;
  exited?: Promise<void>;
  /** Times of this service's restarts (the backoff and the limit look at the last window). */
  restartTimes: number[];
  /** Became healthy once: from then on the launcher restarts it when it dies. */
  supervised: boolean;
  restartTimer?: NodeJS.Timeout;
}

export interface Spec {
  name: string;
  instance: string;
  host: string;
  env: Record<string, string>;
  port: number;
  vm?: string;
  role?: "vm" | "incoming";
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function shmDirFor(o: Pick<StackOptions, "shmBase" | "stackId">, host: string): string {
  return join(o.shmBase, `virtmesh-${o.stackId}-${host}`);
}

export class Stack {
  private nats: NatsServerHandle | undefined;
  private natsUrl = "";
  private nc: NatsConnection | undefined;
  private registry: Registry | undefined;
  private readonly managed: Managed[] = [];
  private stopping = false;
  private stopped: Promise<void> | undefined;
  private readonly policy: SupervisionPolicy | undefined;
  onChange: () => void = () => undefined;

  constructor(readonly o: StackOptions) {
    this.policy = o.supervision === false ? undefined : { ...DEFAULT_SUPERVISION, ...(o.supervision ?? {}) };
  }

  /** Whether incoming guest-drivers are started (the `incoming` option, default 2+ hosts). */
  get incoming(): boolean {
    return this.o.incoming ?? this.o.hosts.length >= 2;
  }

  snapshot(): StackSnapshot {
    return {
      stackId: this.o.stackId,
      supervisorPid: process.pid,
      nats: { url: this.natsUrl, pid: this.nats?.pid ?? 0, managed: this.nats !== undefined },
      hosts: this.o.hosts,
      shmDirs: this.o.hosts.map((h) => shmDirFor(this.o, h)),
      stateDir: this.o.stateDir,
      services: this.managed.map((m) => ({ ...m.rec })),
    };
  }

  /** What the stack starts: every service's name, instance, host and extra environment. */
  plan(): readonly Readonly<Spec>[] {
    return this.specs();
  }

  private specs(): Spec[] {
    let port = this.o.basePort;
    const next = () => (this.o.basePort === 0 ? 0 : port++);
    const out: Spec[] = [];
    for (const host of this.o.hosts) {
      for (const name of HOST_SERVICES) {
        out.push({ name, instance: name, host, port: next(), env: { VIRTMESH_SHM_DIR: shmDirFor(this.o, host) } });
      }
    }
    out.push({ name: "migration-manager", instance: "migration-manager", host: "cluster", port: next(), env: {} });
    for (const { vm, host } of this.o.vms) {
      // Both sides of a migration open the same image: shared storage, as QEMU's
      // migration expects (the disk is not copied). Resolved as the guest-driver would.
      const disk = this.o.env.VIRTMESH_DISK ?? process.env.VIRTMESH_DISK ?? join(this.o.stateDir, "disks", `${vm}.img`);
      const gd = (h: string, role: "vm" | "incoming"): Spec => ({
        name: "guest-driver",
        instance: `guest-driver-${vm}`,
        host: h,
        port: next(),
        vm,
        role,
        env: { VIRTMESH_VM: vm, VIRTMESH_SHM_DIR: shmDirFor(this.o, h), VIRTMESH_DISK: disk, VIRTMESH_INCOMING: role === "incoming" ? "1" : "0" },
      });
      out.push(gd(host, "vm"));
      if (this.incoming) for (const h of this.o.hosts) if (h !== host) out.push(gd(h, "incoming"));
    }
    return out;
  }

  async start(): Promise<void> {
    mkdirSync(join(this.o.stateDir, "logs"), { recursive: true });
    if (this.o.natsUrl) {
      this.natsUrl = this.o.natsUrl;
      this.o.log(`using NATS at ${this.natsUrl}`);
    } else {
      this.nats = await startNatsServer({ storeDir: join(this.o.stateDir, "nats"), logFile: join(this.o.stateDir, "logs", "nats-server.log") });
      this.natsUrl = this.nats.url;
      this.o.log(`nats-server (pid ${this.nats.pid}) listening at ${this.natsUrl}, JetStream store ${join(this.o.stateDir, "nats")}`);
    }
    this.nc = await connectNats(this.natsUrl, `virtmesh-launcher-${this.o.stackId}`, 10_000);
    this.registry = await Registry.open(this.nc);

    const specs = this.specs();
    // Sidecars own each host's memory: they start first, the rest of the host after;
    // incoming guest-drivers last, once every VM runs where it was placed.
    const waves = [
      specs.filter((s) => s.name === "shm-sidecar"),
      specs.filter((s) => s.name !== "shm-sidecar" && s.role !== "incoming"),
      specs.filter((s) => s.role === "incoming"),
    ].filter((w) => w.length > 0);
    if (this.nats) {
      const nats = this.nats;
      nats.process.once("exit", (code, signal) => {
        // Not restarted: JetStream state and every connection would have to be recovered.
        if (!this.stopping) this.o.log(`nats-server (pid ${nats.pid}) died: ${signal ? `killed by ${signal}` : `exit code ${code}`} — not restarted; run 'virtmesh down' then 'up'`);
      });
    }
    for (const wave of waves) {
      const ms = wave.map((s) => this.spawn(s));
      this.onChange();
      await Promise.all(ms.map((m) => this.waitReady(m)));
      this.onChange();
    }
  }

  private spawn(spec: Spec, prev?: Managed): Managed {
    const logPath = join(this.o.stateDir, "logs", `${spec.host}-${spec.instance}.log`);
    const fd = openSync(logPath, "a");
    const tsxCjs = require.resolve("tsx/cjs", { paths: [this.o.root] });
    const register = require.resolve("@virtmesh/telemetry/register", { paths: [this.o.root] });
    const main = join(this.o.root, "services", spec.name, "src", "main.ts");
    const child = spawn(process.execPath, ["--require", tsxCjs, "--require", register, main], {
      cwd: this.o.root,
      stdio: ["ignore", fd, "pipe"],
      env: {
        ...process.env,
        ...this.o.env,
        ...spec.env,
        NATS_URL: this.natsUrl,
        VIRTMESH_HOST: spec.host,
        VIRTMESH_GRPC_PORT: String(spec.port),
        OTEL_SERVICE_NAME: spec.name,
        VIRTMESH_PARENT_PID: String(process.pid),
        VIRTMESH_STATE_DIR: this.o.stateDir,
      },
    });
    closeSync(fd);
    const m: Managed = prev ?? {
      rec: {
        name: spec.name,
        instance: spec.instance,
        host: spec.host,
        pid: 0,
        grpc: "",
        log: logPath,
        state: "starting",
        restarts: 0,
        ...(spec.vm ? { vm: spec.vm } : {}),
        ...(spec.role ? { role: spec.role } : {}),
      },
      spec,
      lastStderr: "",
      restartTimes: [],
      supervised: false,
    };
    m.child = child;
    m.rec.pid = child.pid ?? 0;
    m.rec.state = "starting";
    m.rec.grpc = "";
    delete m.rec.restartAt;
    m.lastStderr = "";
    if (!prev) this.managed.push(m);
    child.stderr?.on("data", (d: Buffer) => {
      const s = d.toString();
      appendFileSync(logPath, s);
      const lines = s.split("\n").filter((l) => l.trim() !== "");
      if (lines.length) m.lastStderr = lines[lines.length - 1]!;
    });
    m.exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        const how = signal ? `killed by ${signal}` : `exit code ${code}`;
        const wasRunning = m.rec.state === "running";
        m.rec.exit = how;
        m.rec.state = this.stopping ? "stopped" : "exited";
        if (!this.stopping) {
          this.o.log(`${spec.instance}@${spec.host} (pid ${child.pid}) ${wasRunning ? "died" : "failed to start"}: ${how}${m.lastStderr ? ` — ${m.lastStderr}` : ""}`);
          this.superviseExit(m);
        }
        this.onChange();
        resolve();
      });
    });
    return m;
  }

  /** A service died (or its restart failed to start): restart it after a backoff, or give up. */
  private superviseExit(m: Managed): void {
    const who = `${m.spec.instance}@${m.spec.host}`;
    // A service that never became healthy fails `start()` instead (StackStartError).
    if (!m.supervised || !this.policy) return;
    if (this.o.restart && !this.o.restart(m.rec)) {
      this.o.log(`${who} is not restarted (the stack's restart policy excludes it)`);
      return;
    }
    const now = Date.now();
    m.restartTimes = m.restartTimes.filter((t) => now - t < this.policy!.windowMs);
    const delay = restartDelay(this.policy, m.restartTimes, now);
    if (delay === undefined) {
      m.rec.state = "failed";
      this.o.log(
        `giving up on ${who}: it died after ${m.restartTimes.length} restarts within ${this.policy.windowMs / 1000} s (last: ${m.rec.exit}); restart the stack ('virtmesh down', 'virtmesh up')`,
      );
      return;
    }
    m.restartTimes.push(now);
    m.rec.restarts++;
    m.rec.restartAt = new Date(now + delay).toISOString();
    const note = m.spec.name === "guest-driver" ? (m.spec.role === "incoming" ? " (incoming: waits for a migration again)" : " (boots its VM afresh)") : "";
    this.o.log(`restarting ${who} in ${delay} ms (restart ${m.rec.restarts}, ${m.restartTimes.length} in the last ${this.policy.windowMs / 1000} s)${note}`);
    m.restartTimer = setTimeout(() => {
      m.restartTimer = undefined;
      if (this.stopping) return;
      void this.respawn(m);
    }, delay);
  }

  private async respawn(m: Managed): Promise<void> {
    if (m.spec.name === "guest-driver" && m.spec.vm) await this.followVm(m);
    if (this.stopping) return;
    try {
      this.spawn(m.spec, m);
    } catch (e) {
      this.o.log(`could not restart ${m.spec.instance}@${m.spec.host}: ${(e as Error).message}`);
      return;
    }
    this.onChange();
    try {
      await this.waitReady(m);
      this.onChange();
    } catch (e) {
      const c = m.child;
      if (c && c.exitCode === null && c.signalCode === null) {
        // Hung on start: kill it, and its exit goes through the backoff like any death.
        this.o.log(`${(e as Error).message}; killing it`);
        c.kill("SIGKILL");
      }
    }
  }

  /**
   * After a migration the VM runs where the registry says, not where the stack put it:
   * a guest-driver restarts as the VM's runner on the VM's host and as incoming elsewhere.
   */
  private async followVm(m: Managed): Promise<void> {
    const placed = await this.registry?.getVm(m.spec.vm!).catch(() => undefined);
    // Only a host that runs (or paused) the VM owns it; an INCOMING or STOPPED entry does not.
    if (!placed || !this.incoming || (placed.state !== "RUN_STATE_RUNNING" && placed.state !== "RUN_STATE_PAUSED")) return;
    const role = placed.host === m.spec.host ? "vm" : "incoming";
    if (role === m.spec.role) return;
    this.o.log(`${m.spec.instance}@${m.spec.host} restarts as ${role === "vm" ? "the VM's runner" : "incoming"}: the registry places ${m.spec.vm} on ${placed.host}`);
    m.spec.role = role;
    m.spec.env = { ...m.spec.env, VIRTMESH_INCOMING: role === "incoming" ? "1" : "0" };
    m.rec.role = role;
  }

  private async waitReady(m: Managed, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const child = m.child!;
    while (Date.now() < deadline) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new StackStartError(
          `${m.spec.instance}@${m.spec.host} failed to start: ${m.lastStderr || (child.signalCode ? `killed by ${child.signalCode}` : `exit code ${child.exitCode}`)}`,
        );
      }
      const e = await this.registry!.getService(m.spec.host, m.spec.instance).catch(() => undefined);
      if (e && e.pid === child.pid && (await checkHealth(e.grpc, 1000))) {
        m.rec.grpc = e.grpc;
        m.rec.state = "running";
        m.supervised = true;
        this.o.log(`${m.spec.instance}@${m.spec.host} (pid ${child.pid}) healthy on ${e.grpc}`);
        return;
      }
      await sleep(100);
    }
    throw new StackStartError(`${m.spec.instance}@${m.spec.host} did not become healthy within ${timeoutMs / 1000} s (log: ${m.rec.log})`);
  }

  /** Stops every service (reverse start order), then NATS; removes shared memory. */
  async stop(): Promise<void> {
    // Idempotent: a second call (a signal during shutdown, a test's cleanup) waits for the first.
    this.stopped ??= this.stopAll();
    return this.stopped;
  }

  private async stopAll(): Promise<void> {
    this.stopping = true;
    for (const m of this.managed) if (m.restartTimer) clearTimeout(m.restartTimer);
    const order = [
      (m: Managed) => m.spec.name === "guest-driver",
      (m: Managed) => m.spec.name === "migration-manager",
      (m: Managed) => m.spec.name !== "shm-sidecar",
      () => true,
    ];
    const done = new Set<Managed>();
    for (const pick of order) {
      const wave = this.managed.filter((m) => !done.has(m) && pick(m));
      await Promise.all(wave.map((m) => terminate(m)));
      wave.forEach((m) => done.add(m));
    }
    await drainNats(this.nc);
    if (this.nats) await this.nats.stop();
    for (const h of this.o.hosts) {
      const d = shmDirFor(this.o, h);
      if (existsSync(d)) {
        this.o.log(`removing leftover shared memory ${d}`);
        rmSync(d, { recursive: true, force: true });
      }
    }
    this.onChange();
  }
}

async function terminate(m: Managed): Promise<void> {
  const c = m.child;
  if (!c || c.exitCode !== null || c.signalCode !== null) return;
  c.kill("SIGTERM");
  const t = setTimeout(() => c.kill("SIGKILL"), 20_000);
  await m.exited;
  clearTimeout(t);
}

export async function checkHealth(address: string, timeoutMs: number): Promise<boolean> {
  const client = new health.HealthClient(address, credentials.createInsecure());
  try {
    return await new Promise<boolean>((resolve) => {
      client.check({ service: "" }, new Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) =>
        resolve(!err && res?.status === health.HealthCheckResponse_ServingStatus.SERVING),
      );
    });
  } finally {
    client.close();
  }
}
