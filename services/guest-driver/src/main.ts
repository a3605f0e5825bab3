// guest-driver: one VM (its vCPUs, virtio drivers, page allocator, workloads); see README.md.
import { status as Status } from "@grpc/grpc-js";
import { checkName, str } from "@virtmesh/config";
import { guest } from "@virtmesh/proto";
import { runService, unary, GrpcError } from "@virtmesh/runtime";

void runService({
  name: "guest-driver",
  hostScoped: true,
  instance: (env) => `guest-driver-${checkName("VIRTMESH_VM", str(env, "VIRTMESH_VM", "vm1"))}`,
  async setup(ctx) {
    const vm = checkName("VIRTMESH_VM", str(process.env, "VIRTMESH_VM", "vm1"));
    ctx.meta.vm = vm;
    let state = guest.RunState.RUN_STATE_RUNNING;
    const describe = (): guest.GuestState => ({
      vm,
      host: ctx.config.host,
      state,
      memoryBytes: 0,
      vcpus: 0,
      devices: [],
    });
    const setState = async (s: guest.RunState) => {
      state = s;
      await ctx.registry.putVm({ vm, host: ctx.config.host, state: guest.runStateToJSON(s) });
      ctx.publish("lifecycle", { event: "state", vm, state: guest.runStateToJSON(s) });
      return describe();
    };
    ctx.addService("virtmesh.guest.v1.GuestService", guest.GuestServiceService, {
      getState: unary(() => describe()),
      pause: unary(() => {
        if (state !== guest.RunState.RUN_STATE_RUNNING) throw new GrpcError(Status.FAILED_PRECONDITION, `vm ${vm} is not running`);
        return setState(guest.RunState.RUN_STATE_PAUSED);
      }),
      resume: unary(() => {
        if (state !== guest.RunState.RUN_STATE_PAUSED) throw new GrpcError(Status.FAILED_PRECONDITION, `vm ${vm} is not paused`);
        return setState(guest.RunState.RUN_STATE_RUNNING);
      }),
    });
    await ctx.registry.putVm({ vm, host: ctx.config.host, state: "RUN_STATE_RUNNING" });
    return {
      async stop() {
        state = guest.RunState.RUN_STATE_STOPPED;
        await ctx.registry.putVm({ vm, host: ctx.config.host, state: "RUN_STATE_STOPPED" }).catch(() => undefined);
      },
    };
  },
});
