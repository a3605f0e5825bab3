// vhost-worker: the host's vhost-blk devices (seed 000); see README.md beside this folder.
import { status as Status } from "@grpc/grpc-js";
import { callUnary, vhost, sidecar } from "@virtmesh/proto";
import { GrpcError, runService } from "@virtmesh/runtime";
import { blkCacheMode, imageDirs } from "./backend";
import { DeviceTable, vhostBlkService } from "./handlers";
import { registerIoband } from "./ioband";
import { iobandBinder } from "./iobandpath";

void runService({
  name: "vhost-worker",
  hostScoped: true,
  setup(ctx) {
    ctx.meta.shmDir = ctx.config.shmDir;
    blkCacheMode(); // a bad VIRTMESH_BLK_CACHE stops the worker with one line
    // issue 5: IobandService, and the IobandHost the data path schedules requests on.
    const iobandHost = registerIoband(ctx);
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
      ioband: iobandBinder(iobandHost),
      imageDirs: imageDirs(),
    });
    table.restoreAll((msg, fields) => ctx.logger.info(fields, msg));
    // The channel to this host's sidecar is up before the first SET_OWNER needs it (a
    // migrated VM's arrives within its downtime).
    void ctx.client(ctx.config.host, "shm-sidecar", sidecar.SharedMemoryServiceClient).then((c) => c.getChannel().getConnectivityState(true), () => undefined);
    ctx.addService("virtmesh.vhost.v1.VhostBlkService", vhost.VhostBlkServiceService, vhostBlkService(table));
    return {
      async stop() {
        await table.closeAll();
      },
    };
  },
});
