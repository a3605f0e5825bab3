// Starts a private nats-server (from PATH) with JetStream in a temporary store on a
// free loopback port. Used by the launcher and by tests, which always run a real server.
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export class NatsServerMissingError extends Error {
  override readonly name = "NatsServerMissingError";
}

export interface NatsServerHandle {
  url: string;
  port: number;
  pid: number;
  storeDir: string;
  process: ChildProcess;
  stop(): Promise<void>;
}

export function findNatsServer(): string {
  const bin = process.env.NATS_SERVER_BIN ?? "nats-server";
  try {
    execFileSync(bin, ["--version"], { stdio: "ignore" });
    return bin;
  } catch {
    throw new NatsServerMissingError(
      `nats-server not found on PATH: install it with 'sudo apt-get install nats-server' (Debian/Ubuntu) or set NATS_URL to a running server`,
    );
  }
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      const p = typeof a === "object" && a ? a.port : 0;
      s.close(() => resolve(p));
    });
  });
}

async function waitForPort(port: number, deadline: number, child: ChildProcess): Promise<void> {
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`nats-server exited with code ${child.exitCode}`);
    const ok = await new Promise<boolean>((resolve) => {
      const c = tcpConnect(port, "127.0.0.1");
      c.once("connect", () => {
        c.destroy();
        resolve(true);
      });
      c.once("error", () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`nats-server did not listen on port ${port} in time`);
}

export async function startNatsServer(opts: { storeDir?: string; logFile?: string; timeoutMs?: number } = {}): Promise<NatsServerHandle> {
  const bin = findNatsServer();
  const storeDir = opts.storeDir ?? mkdtempSync(join(tmpdir(), "virtmesh-nats-"));
  const ownsStore = opts.storeDir === undefined;
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const args = ["-a", "127.0.0.1", "-p", String(port), "-js", "-sd", storeDir];
    if (opts.logFile) args.push("-l", opts.logFile);
    const child = spawn(bin, args, { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr?.on("data", (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-4000);
    });
    try {
      await waitForPort(port, Date.now() + (opts.timeoutMs ?? 10_000), child);
    } catch (e) {
      child.kill("SIGKILL");
      if (attempt < 3 && /address already in use/.test(stderr)) continue;
      throw new Error(`${(e as Error).message}${stderr ? `: ${stderr.trim().split("\n").pop()}` : ""}`);
    }
    const stop = async () => {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((r) => child.once("exit", r));
        child.kill("SIGTERM");
        const t = setTimeout(() => child.kill("SIGKILL"), 5000);
        await exited;
        clearTimeout(t);
      }
      if (ownsStore) rmSync(storeDir, { recursive: true, force: true });
    };
    return { url: `nats://127.0.0.1:${port}`, port, pid: child.pid ?? -1, storeDir, process: child, stop };
  }
}
