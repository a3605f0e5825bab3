// shm-sidecar: see README.md beside this folder.
import { runService } from "@virtmesh/runtime";

void runService({
  name: "shm-sidecar",
  hostScoped: true,
  setup(ctx) {
    ctx.meta.shmDir = ctx.config.shmDir;
  },
});
