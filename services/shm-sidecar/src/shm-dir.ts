// The host's shm directory. The sidecar creates it (0700) when missing and, on
// shutdown, removes exactly the directories it created, never someone else's.
import { accessSync, constants, existsSync, mkdirSync, rmdirSync, statSync } from "node:fs";
import { dirname } from "node:path";
import { ConfigError } from "@virtmesh/config";

export class ShmDir {
  private constructor(
    readonly path: string,
    /** Directories this process created, deepest first (removed in that order). */
    private readonly created: string[],
  ) {}

  static open(path: string): ShmDir {
    let created: string[];
    try {
      created = mkdirParents(path);
    } catch (e) {
      throw new ConfigError(`VIRTMESH_SHM_DIR=${path} cannot be created: ${(e as Error).message}`);
    }
    const st = statSync(path);
    if (!st.isDirectory()) throw new ConfigError(`VIRTMESH_SHM_DIR=${path} is not a directory`);
    try {
      accessSync(path, constants.W_OK | constants.X_OK);
    } catch {
      throw new ConfigError(`VIRTMESH_SHM_DIR=${path} is not writable by this process`);
    }
    return new ShmDir(path, created);
  }

  get createdByUs(): boolean {
    return this.created.length > 0;
  }

  /** Removes the directories this process created if they are empty; returns those left behind, with why. */
  removeCreated(): string[] {
    const left: string[] = [];
    while (this.created.length > 0) {
      const d = this.created[0]!;
      try {
        rmdirSync(d);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code !== "ENOENT") {
          left.push(`${d}: ${(e as Error).message}`);
          break;
        }
      }
      this.created.shift();
    }
    return left;
  }
}

/**
 * mkdir -p with mode 0700, one component at a time; returns the directories
 * it created, deepest first. Not mkdirSync({ recursive: true }): on a
 * directory that refuses new entries with ENOENT (e.g. under /proc) Node 20's
 * recursive mkdir retries forever instead of failing.
 */
function mkdirParents(path: string): string[] {
  const missing: string[] = [];
  for (let d = path; !existsSync(d); d = dirname(d)) {
    missing.push(d);
    if (d === dirname(d)) break;
  }
  const created: string[] = [];
  try {
    for (const d of missing.reverse()) {
      mkdirSync(d, { mode: 0o700 });
      created.unshift(d);
    }
  } catch (e) {
    for (const d of created) {
      try {
        rmdirSync(d);
      } catch {
        // best effort; the error below is the one to report
      }
    }
    throw e;
  }
  return created;
}
