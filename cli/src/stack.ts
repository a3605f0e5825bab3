// The stack: NATS (unless NATS_URL is given), then per host an shm-sidecar, vhost-worker,
// completion-thread and balloon-host, the cluster's migration-manager, and one
// guest-driver per VM. `virtmesh demo` runs a Stack in the foreground; `virtmesh up`
// runs it inside a detached supervisor process (`virtmesh __supervise`).
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
  /** Restart a service that dies unexpectedly (none by default). */
  restart?: (svc: ServiceRecord) => boolean;
}

export interface ServiceRecord {
  name: string;
  instance: string;
  host: string;
  pid: number;
  grpc: string;
  log: string;
  state: "starting" | "running" | "exited" | "stopped";
  exit?: string;
  restarts: number;
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
}

interface Spec {
  name: string;
  instance: string;
  host: string;
  env: Record<string, string>;
  port: number;
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
  onChange: () => void = () => undefined;

  constructor(readonly o: StackOptions) {}

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
      out.push({ name: "guest-driver", instance: `guest-driver-${vm}`, host, port: next(), env: { VIRTMESH_VM: vm, VIRTMESH_SHM_DIR: shmDirFor(this.o, host) } });
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
    // Sidecars own each host's memory: they start first, the rest of the host after.
    const waves = [specs.filter((s) => s.name === "shm-sidecar"), specs.filter((s) => s.name !== "shm-sidecar")];
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
      rec: { name: spec.name, instance: spec.instance, host: spec.host, pid: 0, grpc: "", log: logPath, state: "starting", restarts: 0 },
      spec,
      lastStderr: "",
    };
    m.child = child;
    m.rec.pid = child.pid ?? 0;
    m.rec.state = "starting";
    m.rec.grpc = "";
    delete m.rec.exit;
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
          if (wasRunning && this.o.restart?.(m.rec)) {
            m.rec.restarts++;
            this.o.log(`restarting ${spec.instance}@${spec.host} (restart ${m.rec.restarts})`);
            setTimeout(() => {
              if (this.stopping) return;
              this.spawn(spec, m);
              this.onChange();
              void this.waitReady(m).then(() => this.onChange(), (e: Error) => this.o.log(e.message));
            }, 200);
          }
        }
        this.onChange();
        resolve();
      });
    });
    return m;
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
        this.o.log(`${m.spec.instance}@${m.spec.host} (pid ${child.pid}) healthy on ${e.grpc}`);
        return;
      }
      await sleep(100);
    }
    throw new StackStartError(`${m.spec.instance}@${m.spec.host} did not become healthy within ${timeoutMs / 1000} s (log: ${m.rec.log})`);
  }

  /** Stops every service (reverse start order), then NATS; removes shared memory. */
  async stop(): Promise<void> {
    this.stopping = true;
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
