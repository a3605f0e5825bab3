// shm-sidecar: owns the host's shared memory (see README.md beside this folder).
import { status as Status } from "@grpc/grpc-js";
import { GrpcError, runService } from "@virtmesh/runtime";
import { sidecarConfig } from "./config";
import { sharedMemoryService } from "./handlers";
import { openPageStream, SidecarClients } from "./page-stream";
import { ShmDir } from "./shm-dir";
import { VmRegistry } from "./vm-registry";
import { sidecarServiceDefinition } from "./wire";

void runService({
  name: "shm-sidecar",
  hostScoped: true,
  setup(ctx) {
    const { maxVmBytes } = sidecarConfig();
    const shmDir = ShmDir.open(ctx.config.shmDir);
    const registry = new VmRegistry(shmDir.path, ctx.config.host, maxVmBytes);
    ctx.meta.shmDir = shmDir.path;

    let cleaned = false;
    const cleanup = (): string[] => {
      if (cleaned) return [];
      cleaned = true;
      return [...registry.destroyAll(), ...shmDir.removeCreated()];
    };
    // A start that fails after this point (say, the gRPC port is taken) exits
    // without the stop hook: still leave nothing in the shm directory.
    process.on("exit", () => void cleanup());
    // Migration page streams to other hosts' sidecars (SendDirty).
    const peers = new SidecarClients();

    ctx.addService(
      "virtmesh.sidecar.v1.SharedMemoryService",
      sidecarServiceDefinition(),
      sharedMemoryService({
        registry,
        publish: (topic, body) => ctx.publish(topic, body),
        warn: (msg, fields) => ctx.logger.warn(fields ?? {}, msg),
        async openPageStream(host) {
          const e = await ctx.registry.getService(host, "shm-sidecar");
          if (!e) throw new GrpcError(Status.UNAVAILABLE, `destination host '${host}' has no shm-sidecar in the registry`);
          const who = `shm-sidecar@${host} (${e.grpc})`;
          return { sink: openPageStream(peers.get(e.grpc), who), who };
        },
      }),
    );
    ctx.logger.info({ shmDir: shmDir.path, created: shmDir.createdByUs, maxVmBytes }, "shm directory ready");

    return {
      async stop() {
        peers.closeAll();
        const vms = registry.list().map((vm) => vm.name);
        const left = cleanup();
        for (const vm of vms) ctx.publish("vm-destroyed", { vm, host: ctx.config.host, reason: "shutdown" });
        if (left.length) ctx.logger.warn({ left }, "could not remove everything from the shm directory");
        else ctx.logger.info({ vms: vms.length, shmDir: shmDir.path }, "unmapped and removed every VM's shared memory");
      },
    };
  },
});
