// completion-thread: fills the guest's used rings from vhost-worker's completion
// rings (seed 000's parallel completion); see README.md beside this folder.
import { completion } from "@virtmesh/proto";
import { runService, unary } from "@virtmesh/runtime";
import { CompletionQueues } from "./queues";

void runService({
  name: "completion-thread",
  hostScoped: true,
  setup(ctx) {
    const shmDir = ctx.config.shmDir;
    ctx.meta.shmDir = shmDir;
    const queues = new CompletionQueues(shmDir, {
      info: (msg, fields) => ctx.logger.info(fields ?? {}, msg),
      warn: (msg, fields) => ctx.logger.warn(fields ?? {}, msg),
      error: (msg) => ctx.logger.error(msg),
    });
    queues.resumeAll();
    ctx.addService("virtmesh.completion.v1.CompletionService", completion.CompletionServiceService, {
      attachQueue: unary(async (req: completion.AttachQueueRequest): Promise<completion.AttachQueueResponse> => {
        await queues.attach(req);
        return {};
      }),
      detachQueue: unary(async (req: completion.DetachQueueRequest): Promise<completion.DetachQueueResponse> => ({ completed: await queues.detach(req) })),
      listQueues: unary((): completion.ListQueuesResponse => ({ queues: queues.list() })),
    });
    return {
      stop: () => queues.stopAll(),
    };
  },
});
