// balloon-host: see README.md beside this folder.
import { runService } from "@virtmesh/runtime";

void runService({
  name: "balloon-host",
  hostScoped: true,
  setup(ctx) {
    ctx.meta.shmDir = ctx.config.shmDir;
  },
});
