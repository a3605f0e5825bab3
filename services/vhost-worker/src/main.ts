// vhost-worker: see README.md beside this folder.
import { runService } from "@virtmesh/runtime";

void runService({
  name: "vhost-worker",
  hostScoped: true,
  setup(ctx) {
    ctx.meta.shmDir = ctx.config.shmDir;
  },
});
