// The completion-thread's attached queues and the AttachQueue / DetachQueue rules.
import { status as Status } from "@grpc/grpc-js";
import { checkName } from "@virtmesh/config";
import type { completion } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { lstatSync, readdirSync, readFileSync, realpathSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join, normalize, relative } from "node:path";
import { completionRingFileName } from "@virtmesh/virtio-blk";
import { QueueCompleter, type AttachSpec } from "./completer";

/** `<shmDir>/vhost-blk.<vm>.<device>.<index>.ct.json`: the attachment a restarted completion-thread resumes. */
export const attachFile = (shmDir: string, vm: string, device: string, index: number) => join(shmDir, `vhost-blk.${vm}.${device}.${index}.ct.json`);

/** The guest-memory file and device dirty log the shm-sidecar makes per VM: `<shmDir>/<vm>/memory`, `<shmDir>/<vm>/dirty-device` (services/shm-sidecar/src/vm-memory.ts). */
export const VM_MEMORY_FILE = "memory";
export const VM_DEVICE_DIRTY_LOG_FILE = "dirty-device";

/** A caller's string in an error message: a short prefix only (a name of megabytes must not come back). */
export function quote(s: string): string {
  return s.length > 120 ? `${JSON.stringify(s.slice(0, 120))}... (${s.length} chars)` : JSON.stringify(s);
}

const invalid = (msg: string) => new GrpcError(Status.INVALID_ARGUMENT, msg);

/**
 * The files a queue `<vm>/<device>/<index>` may use, as the sidecar and vhost-worker
 * name them. A caller names files, but only the VM's own pass: the completion ring
 * is vhost-worker's for this very queue (completionRingFileName), the doorbell is the
 * queue's call doorbell in the VM's directory, memory and log are the VM's.
 */
export function expectedPaths(shmDir: string, vm: string, device: string, index: number) {
  return {
    cringPath: join(shmDir, completionRingFileName(vm, device, index)),
    callPath: join(shmDir, vm, `${device}.${index}.call`),
    memoryPath: join(shmDir, vm, VM_MEMORY_FILE),
    deviceDirtyLogPath: join(shmDir, vm, VM_DEVICE_DIRTY_LOG_FILE),
  };
}

/**
 * Checks every path of an AttachQueue request without changing anything: under the
 * shm directory, the VM's own file by name, a regular file (no symbolic link) that
 * resolves to where its name says. ENOENT -> NOT_FOUND.
 */
export function checkAttach(shmDir: string, req: completion.AttachQueueRequest): AttachSpec {
  const want = expectedPaths(shmDir, req.vm, req.device, req.index);
  let realShm: string;
  try {
    realShm = realpathSync(shmDir);
  } catch (e) {
    throw new GrpcError(Status.UNAVAILABLE, `the host's shm directory ${shmDir} is not usable: ${(e as Error).message}`);
  }
  const check = (field: string, path: string, expected: string, what: string): string => {
    if (!path.startsWith(shmDir + "/") || path.includes("\0") || normalize(path) !== path) {
      throw invalid(`${field} ${quote(path)} is not under the host's shm directory ${shmDir}`);
    }
    if (path !== expected) throw invalid(`${field} ${quote(path)} is not ${req.vm}'s ${what} (${expected})`);
    let st;
    try {
      st = lstatSync(path);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new GrpcError(err.code === "ENOENT" ? Status.NOT_FOUND : Status.INVALID_ARGUMENT, `${field} ${path}: ${err.code ?? err.message}`);
    }
    if (st.isSymbolicLink()) throw invalid(`${field} ${path} is a symbolic link; ${req.vm}'s ${what} is a regular file`);
    if (!st.isFile()) throw invalid(`${field} ${path} is not a regular file`);
    // A symbolic link in a directory of the path (e.g. <shm>/<vm> -> another VM's directory).
    if (realpathSync(path) !== join(realShm, relative(shmDir, path))) throw invalid(`${field} ${path} resolves elsewhere (a symbolic link on its way)`);
    return path;
  };
  return {
    vm: req.vm,
    device: req.device,
    index: req.index,
    cringPath: check("completion_ring_path", req.completionRingPath, want.cringPath, `completion ring for ${req.device} queue ${req.index}`),
    callPath: check("call_path", req.callPath, want.callPath, `call doorbell of ${req.device} queue ${req.index}`),
    memoryPath: check("memory_path", req.memoryPath, want.memoryPath, "guest memory"),
    deviceDirtyLogPath: req.deviceDirtyLogPath === "" ? "" : check("device_dirty_log_path", req.deviceDirtyLogPath, want.deviceDirtyLogPath, "device dirty log"),
    eventIdx: req.eventIdx,
  };
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

export interface QueueLog {
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string): void;
}

export class CompletionQueues {
  readonly queues = new Map<string, QueueCompleter>();
  /** One AttachQueue per queue at a time. */
  private readonly busy = new Map<string, Promise<unknown>>();

  constructor(
    readonly shmDir: string,
    private readonly log: QueueLog,
  ) {}

  private readonly onError = (msg: string) => this.log.error(msg);

  /** A restarted completion-thread (e.g. after SIGKILL) resumes every attached queue. */
  resumeAll(): void {
    const shmDir = this.shmDir;
    for (const f of readdirSync(shmDir, { withFileTypes: true })) {
      if (!f.isFile() || !/^vhost-blk\..+\.ct\.json$/.test(f.name)) continue;
      const path = join(shmDir, f.name);
      try {
        const saved = JSON.parse(readFileSync(path, "utf8")) as AttachSpec;
        const k = this.key(String(saved.vm), String(saved.device), Number(saved.index));
        // The record lives in a shared directory: it gets the checks an AttachQueue gets.
        const spec = checkAttach(shmDir, {
          vm: saved.vm,
          device: saved.device,
          index: saved.index,
          completionRingPath: saved.cringPath,
          callPath: saved.callPath,
          memoryPath: saved.memoryPath,
          deviceDirtyLogPath: saved.deviceDirtyLogPath,
          eventIdx: saved.eventIdx === true,
        });
        if (path !== attachFile(shmDir, spec.vm, spec.device, spec.index)) throw new Error(`it names queue ${k}`);
        const q = new QueueCompleter(spec, this.onError);
        q.ringIno = statSync(spec.cringPath).ino;
        q.memIno = statSync(spec.memoryPath).ino;
        this.queues.set(k, q.start());
        this.log.info("completion queue resumed after a restart", { queue: k });
      } catch (e) {
        this.log.warn(`cannot resume ${path}: ${(e as Error).message}; dropping it`);
        rmSync(path, { force: true });
      }
    }
  }

  key(vm: string, device: string, index: number): string {
    try {
      checkName("vm", vm);
      checkName("device", device);
    } catch (e) {
      throw new GrpcError(Status.INVALID_ARGUMENT, (e as Error).message);
    }
    return `${vm}/${device}/${index}`;
  }

  /**
   * AttachQueue. Everything is checked and opened before the live attachment of the
   * same queue (if any) is touched: a refused request changes nothing. Re-attaching
   * (a new ring after BLK_SET_BACKEND, or the destination after a migration) replaces
   * the old attachment only once the new one is ready.
   */
  attach(req: completion.AttachQueueRequest): Promise<void> {
    const k = this.key(req.vm, req.device, req.index);
    const prev = this.busy.get(k) ?? Promise.resolve();
    const run = prev.then(() => this.attachNow(k, req));
    this.busy.set(k, run.catch(() => undefined));
    return run.catch((e: unknown) => {
      const err = e instanceof GrpcError ? e : new GrpcError(Status.INTERNAL, `AttachQueue ${k}: ${(e as Error).message}`);
      this.log.warn(`AttachQueue ${k} refused: ${err.message}`, { queue: k, code: Status[err.code] });
      throw err;
    });
  }

  private async attachNow(k: string, req: completion.AttachQueueRequest): Promise<void> {
    const shmDir = this.shmDir;
    const spec = checkAttach(shmDir, req);
    let q: QueueCompleter;
    try {
      q = new QueueCompleter(spec, this.onError);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new GrpcError(err.code === "ENOENT" ? Status.NOT_FOUND : Status.INVALID_ARGUMENT, `AttachQueue ${k}: ${err.message}`);
    }
    const file = attachFile(shmDir, req.vm, req.device, req.index);
    try {
      // One consumer per ring: not a ring (or a VM's memory) another attached queue uses
      // (a hard link passes the name checks), not a ring a live process consumes.
      const ringIno = statSync(spec.cringPath).ino;
      const memIno = statSync(spec.memoryPath).ino;
      for (const [other, o] of this.queues) {
        if (other === k) continue;
        if (o.ringIno === ringIno) throw new GrpcError(Status.FAILED_PRECONDITION, `completion_ring_path ${spec.cringPath} is the ring of queue ${other}, which is attached (one consumer per ring)`);
        if (o.spec.vm !== req.vm && o.memIno === memIno) throw new GrpcError(Status.FAILED_PRECONDITION, `memory_path ${spec.memoryPath} is the memory of vm ${o.spec.vm}`);
      }
      const pid = q.ringConsumerPid;
      if (pid !== 0 && pid !== process.pid && pidAlive(pid)) {
        throw new GrpcError(Status.FAILED_PRECONDITION, `completion ring ${spec.cringPath} already has a consumer: live pid ${pid} (one consumer per ring)`);
      }
      q.ringIno = ringIno;
      q.memIno = memIno;
      writeFileSync(`${file}.tmp`, JSON.stringify(spec), { mode: 0o600 });
    } catch (e) {
      await q.detach();
      rmSync(`${file}.tmp`, { force: true });
      if (e instanceof GrpcError) throw e;
      throw new GrpcError(Status.INTERNAL, `AttachQueue ${k}: ${(e as Error).message}`);
    }
    // All checks passed: now the swap.
    const old = this.queues.get(k);
    if (old) {
      this.queues.delete(k);
      await old.detach();
    }
    this.queues.set(k, q.start());
    renameSync(`${file}.tmp`, file);
    this.log.info("completion queue attached", { queue: k });
  }

  async detach(req: completion.DetachQueueRequest): Promise<number> {
    const k = this.key(req.vm, req.device, req.index);
    const q = this.queues.get(k);
    if (!q) throw new GrpcError(Status.NOT_FOUND, `queue ${k} is not attached`);
    this.queues.delete(k);
    rmSync(attachFile(this.shmDir, req.vm, req.device, req.index), { force: true });
    return q.detach();
  }

  list(): completion.QueueStats[] {
    return [...this.queues.values()].map((q) => ({
      vm: q.spec.vm,
      device: q.spec.device,
      index: q.spec.index,
      completed: q.completed,
      interrupts: q.interrupts,
      suppressed: q.suppressed,
    }));
  }

  /** Clean shutdown: every queue detached, its attachment file removed. */
  async stopAll(): Promise<void> {
    const all = [...this.queues.values()];
    this.queues.clear();
    await Promise.all(all.map((q) => q.detach()));
    for (const q of all) rmSync(attachFile(this.shmDir, q.spec.vm, q.spec.device, q.spec.index), { force: true });
  }
}
