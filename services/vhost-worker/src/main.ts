// vhost-worker: the host's vhost-blk devices (seed 000); see README.md beside this folder.
import { status as Status } from "@grpc/grpc-js";
import { vhost, sidecar } from "@virtmesh/proto";
import { GrpcError, runService } from "@virtmesh/runtime";
import { DeviceTable, vhostBlkService } from "./handlers";
import { callUnary } from "./rpc";

void runService({
  name: "vhost-worker",
  hostScoped: true,
  setup(ctx) {
    ctx.meta.shmDir = ctx.config.shmDir;
    const table = new DeviceTable({
      shmDir: ctx.config.shmDir,
      async describeVm(vm) {
        const c = await ctx.client(ctx.config.host, "shm-sidecar", sidecar.SharedMemoryServiceClient);
        const layout = await callUnary(c, c.describeVm, { vm }).catch((e: { code?: number; details?: string }) => {
          throw new GrpcError(e.code === Status.NOT_FOUND ? Status.NOT_FOUND : Status.UNAVAILABLE, `DescribeVm(${vm}): ${e.details ?? String(e)}`);
        });
        return { memoryPath: layout.memoryPath, memoryBytes: layout.memoryBytes };
      },
      warn: (msg) => ctx.logger.warn(msg),
    });
    (require("./ioband") as typeof import("./ioband")).registerIoband(ctx); // issue 5: IobandService (temporary line from the ioband engineer; keep the returned IobandHost for the data path)
    table.restoreAll((msg, fields) => ctx.logger.info(fields, msg));
    ctx.addService("virtmesh.vhost.v1.VhostBlkService", vhost.VhostBlkServiceService, vhostBlkService(table));
    return {
      async stop() {
        await table.closeAll();
      },
    };
  },
});
