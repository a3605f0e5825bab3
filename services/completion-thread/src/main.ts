// completion-thread: fills the guest's used rings from vhost-worker's completion
// rings (seed 000's parallel completion); see README.md beside this folder.
import { status as Status } from "@grpc/grpc-js";
import { checkName } from "@virtmesh/config";
import { completion } from "@virtmesh/proto";
import { GrpcError, runService, unary } from "@virtmesh/runtime";
import { readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { QueueCompleter, type AttachSpec } from "./completer";

/** `<shmDir>/vhost-blk.<vm>.<device>.<index>.ct.json`: the attachment a restarted completion-thread resumes. */
const attachFile = (shmDir: string, vm: string, device: string, index: number) => join(shmDir, `vhost-blk.${vm}.${device}.${index}.ct.json`);

function under(shmDir: string, what: string, path: string, optional = false): string {
  if (optional && path === "") return path;
  if (!path.startsWith(shmDir + "/") || path.includes("/../") || path.includes("\0")) {
    throw new GrpcError(Status.INVALID_ARGUMENT, `${what} ${JSON.stringify(path)} is not under the host's shm directory ${shmDir}`);
  }
  return path;
}

void runService({
  name: "completion-thread",
  hostScoped: true,
  setup(ctx) {
    const shmDir = ctx.config.shmDir;
    ctx.meta.shmDir = shmDir;
    const queues = new Map<string, QueueCompleter>();
    const onError = (msg: string) => ctx.logger.error(msg);
    // A restarted completion-thread (e.g. after SIGKILL) resumes every attached queue.
    for (const f of readdirSync(shmDir, { withFileTypes: true })) {
      if (!f.isFile() || !/^vhost-blk\..+\.ct\.json$/.test(f.name)) continue;
      const path = join(shmDir, f.name);
      try {
        const spec = JSON.parse(readFileSync(path, "utf8")) as AttachSpec;
        const q = new QueueCompleter(spec, onError);
        queues.set(`${spec.vm}/${spec.device}/${spec.index}`, q);
        ctx.logger.info({ queue: `${spec.vm}/${spec.device}/${spec.index}` }, "completion queue resumed after a restart");
      } catch (e) {
        ctx.logger.warn(`cannot resume ${path}: ${(e as Error).message}; dropping it`);
        rmSync(path, { force: true });
      }
    }
    const key = (vm: string, device: string, index: number) => {
      try {
        checkName("vm", vm);
        checkName("device", device);
      } catch (e) {
        throw new GrpcError(Status.INVALID_ARGUMENT, (e as Error).message);
      }
      return `${vm}/${device}/${index}`;
    };
    ctx.addService("virtmesh.completion.v1.CompletionService", completion.CompletionServiceService, {
      attachQueue: unary(async (req: completion.AttachQueueRequest): Promise<completion.AttachQueueResponse> => {
        const k = key(req.vm, req.device, req.index);
        const old = queues.get(k);
        if (old) {
          // Re-attach (a new ring after BLK_SET_BACKEND): the old one is finished.
          queues.delete(k);
          await old.detach();
        }
        try {
          const spec: AttachSpec = {
            vm: req.vm,
            device: req.device,
            index: req.index,
            cringPath: under(shmDir, "completion_ring_path", req.completionRingPath),
            callPath: under(shmDir, "call_path", req.callPath),
            memoryPath: under(shmDir, "memory_path", req.memoryPath),
            deviceDirtyLogPath: under(shmDir, "device_dirty_log_path", req.deviceDirtyLogPath, true),
            eventIdx: req.eventIdx,
          };
          const q = new QueueCompleter(spec, onError);
          queues.set(k, q);
          const file = attachFile(shmDir, req.vm, req.device, req.index);
          writeFileSync(`${file}.tmp`, JSON.stringify(spec), { mode: 0o600 });
          renameSync(`${file}.tmp`, file);
        } catch (e) {
          if (e instanceof GrpcError) throw e;
          const err = e as NodeJS.ErrnoException;
          throw new GrpcError(err.code === "ENOENT" ? Status.NOT_FOUND : Status.INVALID_ARGUMENT, `AttachQueue ${k}: ${err.message}`);
        }
        ctx.logger.info({ queue: k }, "completion queue attached");
        return {};
      }),
      detachQueue: unary(async (req: completion.DetachQueueRequest): Promise<completion.DetachQueueResponse> => {
        const k = key(req.vm, req.device, req.index);
        const q = queues.get(k);
        if (!q) throw new GrpcError(Status.NOT_FOUND, `queue ${k} is not attached`);
        queues.delete(k);
        rmSync(attachFile(shmDir, req.vm, req.device, req.index), { force: true });
        return { completed: await q.detach() };
      }),
      listQueues: unary((): completion.ListQueuesResponse => ({
        queues: [...queues.values()].map((q) => ({
          vm: q.spec.vm,
          device: q.spec.device,
          index: q.spec.index,
          completed: q.completed,
          interrupts: q.interrupts,
          suppressed: q.suppressed,
        })),
      })),
    });
    return {
      async stop() {
        const all = [...queues.values()];
        queues.clear();
        await Promise.all(all.map((q) => q.detach()));
        for (const q of all) rmSync(attachFile(shmDir, q.spec.vm, q.spec.device, q.spec.index), { force: true });
      },
    };
  },
});
