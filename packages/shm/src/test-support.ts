// Helpers for the tests: temp dirs under /dev/shm and child processes
// running test-child.ts. Not part of the package API.

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { join } from "node:path";

// Shared state words used by the doorbell tests (Int32 indices, each on its own cache line).
export const ST_WORK = 0; // producer: items posted
export const ST_ACK = 16; // consumer: items consumed
export const ST_GO = 32; // parent: start signal
export const ST_STOP = 48; // parent: stop signal
export const STATE_BYTES = 4096;

export type ChildMessage = Record<string, unknown>;

export interface TestChild {
  proc: ChildProcess;
  /** Resolves with the first JSON line (seen so far or later) matching pred. */
  waitFor(pred: (m: ChildMessage) => boolean, what: string, timeoutMs?: number): Promise<ChildMessage>;
  /** Resolves with the exit code (null if killed by a signal). */
  exited: Promise<number | null>;
  kill(): Promise<void>;
}

const CHILD_FILE = join(__dirname, "test-child.ts");

export function tempShmDir(): string {
  return mkdtempSync("/dev/shm/virtmesh-test-");
}

export function startChild(args: string[], opts: { ipc?: boolean } = {}): TestChild {
  const proc = spawn(process.execPath, ["--import", "tsx", CHILD_FILE, ...args], {
    cwd: join(__dirname, ".."),
    stdio: opts.ipc ? ["ignore", "pipe", "inherit", "ipc"] : ["ignore", "pipe", "inherit"],
  });
  const seen: ChildMessage[] = [];
  const listeners = new Set<() => void>();
  let buf = "";
  proc.stdout?.setEncoding("utf8");
  proc.stdout?.on("data", (chunk: string) => {
    buf += chunk;
    let nl: number;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line.trim() === "") continue;
      seen.push(JSON.parse(line) as ChildMessage);
    }
    for (const l of listeners) l();
  });
  let exitCode: number | null | undefined;
  const exited = new Promise<number | null>((resolve) => {
    // "close", not "exit": stdout may still hold the last lines at "exit".
    proc.once("close", (code) => {
      exitCode = code;
      for (const l of listeners) l();
      resolve(code);
    });
  });
  return {
    proc,
    exited,
    waitFor(pred, what, timeoutMs = 20_000) {
      return new Promise((resolve, reject) => {
        const check = (): void => {
          const hit = seen.find(pred);
          if (hit) {
            done();
            resolve(hit);
          } else if (exitCode !== undefined) {
            done();
            reject(new Error(`child ${args[0]} exited (${exitCode}) before ${what}`));
          }
        };
        const timer = setTimeout(() => {
          done();
          reject(new Error(`child ${args[0]}: timed out waiting for ${what}`));
        }, timeoutMs);
        const done = (): void => {
          clearTimeout(timer);
          listeners.delete(check);
        };
        listeners.add(check);
        check();
      });
    },
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      await exited;
    },
  };
}
