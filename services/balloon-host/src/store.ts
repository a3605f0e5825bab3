// balloon-host's per-VM state files: `<shmDir>/balloon.<vm>.state`, the
// state envelope of state.ts, replaced atomically (write a temporary file, then
// rename over the old one) on every change, so a restarted balloon-host finds
// either the old or the new state, never half of one.
import { readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { NAME_RE } from "@virtmesh/config";
import { decodeBalloonState, encodeBalloonState, type BalloonVmState } from "./state";

const FILE_RE = /^balloon\.([a-z0-9][a-z0-9-]*)\.state$/;

export function stateFilePath(shmDir: string, vm: string): string {
  return join(shmDir, `balloon.${vm}.state`);
}

export function writeStateFile(shmDir: string, state: BalloonVmState): void {
  const file = stateFilePath(shmDir, state.vm);
  const tmp = `${file}.tmp`;
  writeFileSync(tmp, encodeBalloonState(state), { mode: 0o600 });
  renameSync(tmp, file);
}

/** The VM's saved state; throws StateError if the file is damaged, ENOENT if there is none. */
export function readStateFile(shmDir: string, vm: string): BalloonVmState {
  const s = decodeBalloonState(readFileSync(stateFilePath(shmDir, vm)));
  if (s.vm !== vm) throw new Error(`${stateFilePath(shmDir, vm)} holds vm ${s.vm}'s state`);
  return s;
}

export function removeStateFile(shmDir: string, vm: string): void {
  rmSync(stateFilePath(shmDir, vm), { force: true });
  rmSync(`${stateFilePath(shmDir, vm)}.tmp`, { force: true });
}

/** VMs with a state file in shmDir. */
export function listStateFiles(shmDir: string): string[] {
  const out: string[] = [];
  for (const f of readdirSync(shmDir, { withFileTypes: true })) {
    const m = FILE_RE.exec(f.name);
    if (f.isFile() && m && NAME_RE.test(m[1]!)) out.push(m[1]!);
  }
  return out;
}
