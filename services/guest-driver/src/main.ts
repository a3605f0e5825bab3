// guest-driver: one VM (its vCPUs, virtio drivers, page allocator, workloads) and its
// VMM for live migration; see README.md. With VIRTMESH_INCOMING=1 it creates no VM
// and waits for one to migrate in.
import { checkName, str } from "@virtmesh/config";
import { runService } from "@virtmesh/runtime";
import { setupGuestDriver } from "./setup";

const vmName = (env: NodeJS.ProcessEnv): string => checkName("VIRTMESH_VM", str(env, "VIRTMESH_VM", "vm1"));

void runService({
  name: "guest-driver",
  hostScoped: true,
  instance: (env) => `guest-driver-${vmName(env)}`,
  setup(ctx) {
    const vm = vmName(process.env);
    ctx.meta.vm = vm;
    return setupGuestDriver(ctx, vm);
  },
});
