// completion-thread: see README.md beside this folder.
import { runService } from "@virtmesh/runtime";

void runService({
  name: "completion-thread",
  hostScoped: true,
  setup(ctx) {
    ctx.meta.shmDir = ctx.config.shmDir;
  },
});
