// The launcher's state directory: state.json (what runs where), launcher.log, logs/.
import { readFileSync, renameSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";
import type { StackSnapshot } from "./stack";

export interface StackState extends StackSnapshot {
  ready: boolean;
  error?: string;
  startedAt: string;
}

export function defaultStateDir(): string {
  return process.env.VIRTMESH_STATE_DIR || join(tmpdir(), `virtmesh-${userInfo().uid}`);
}

export function statePath(dir: string): string {
  return join(dir, "state.json");
}

export function readState(dir: string): StackState | undefined {
  try {
    return JSON.parse(readFileSync(statePath(dir), "utf8")) as StackState;
  } catch {
    return undefined;
  }
}

export function writeState(dir: string, s: StackState): void {
  mkdirSync(dir, { recursive: true });
  const tmp = `${statePath(dir)}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(s, null, 2));
  renameSync(tmp, statePath(dir));
}

export function pidAlive(pid: number): boolean {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}
