// vhost-worker: see README.md beside this folder.
import { runService } from "@virtmesh/runtime";
import { registerIoband } from "./ioband";

void runService({
  name: "vhost-worker",
  hostScoped: true,
  setup(ctx) {
    ctx.meta.shmDir = ctx.config.shmDir;
    // blkio-cgroup / dm-ioband control plane (issue 5): IobandService + NATS change events.
    registerIoband(ctx);
  },
});
