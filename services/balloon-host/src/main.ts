// balloon-host: the virtio-balloon device of every VM on this host (see README.md beside this folder).
import type { Msg } from "@nats-io/transport-node";
import { serviceSubject, vmSubject } from "@virtmesh/nats";
import { balloon, callUnary, sidecar } from "@virtmesh/proto";
import { runService } from "@virtmesh/runtime";
import { tracedPublish } from "@virtmesh/telemetry";
import { statSync } from "node:fs";
import { BalloonVm, type BalloonVmEvents } from "./balloon-vm";
import { balloonService } from "./handlers";
import { listStateFiles, readStateFile, removeStateFile, writeStateFile } from "./store";

/** The ballooned bitmap is published at most this often per VM (the last change always goes out). */
const PUBLISH_EVERY_MS = 50;

void runService({
  name: "balloon-host",
  hostScoped: true,
  setup(ctx) {
    const host = ctx.config.host;
    ctx.meta.shmDir = ctx.config.shmDir;
    const shmDir = ctx.config.shmDir;
    const vms = new Map<string, BalloonVm>();
    const timers = new Map<string, NodeJS.Timeout>();

    // Every change is persisted before the guest hears of it (issue 16: a restarted
    // balloon-host knows the ballooned pages and the target).
    const persist = (v: BalloonVm) => {
      if (vms.get(v.vm) !== v) return;
      try {
        writeStateFile(shmDir, v.snapshot());
      } catch (e) {
        ctx.logger.error({ vm: v.vm, err: (e as Error).message }, "could not persist the balloon state");
      }
    };

    // virtmesh.vm.<vm>.balloon: the ballooned-pages bitmap for the migration-manager
    // (ballooned pages are never migrated) and anyone watching the target.
    const publishState = (v: BalloonVm, event: string) => {
      const b = v.device.ballooned;
      tracedPublish(
        ctx.nc,
        vmSubject(v.vm, "balloon"),
        JSON.stringify({
          event,
          vm: v.vm,
          host,
          targetPages: v.config.numPages,
          actualPages: v.config.actual,
          pages: b.pages,
          ballooned: b.count,
          // one bit per guest page, LSB of byte 0 = PFN 0 (BalloonedPages.toBytes)
          bitmap: Buffer.from(b.toBytes()).toString("base64"),
        }),
      );
    };

    const events: BalloonVmEvents = {
      ballooned(v) {
        if (timers.has(v.vm)) return;
        timers.set(
          v.vm,
          setTimeout(() => {
            timers.delete(v.vm);
            if (vms.get(v.vm) === v) publishState(v, "ballooned");
          }, PUBLISH_EVERY_MS),
        );
      },
      refused(v, r) {
        ctx.logger.warn({ vm: v.vm, queue: r.queue, kind: r.kind, needsReset: r.needsReset }, `balloon request refused: ${r.message}`);
        tracedPublish(
          ctx.nc,
          vmSubject(v.vm, "balloon-refused"),
          JSON.stringify({ vm: v.vm, host, queue: r.queue, kind: r.kind, message: r.message, needsReset: r.needsReset, refusedRequests: v.refusedRequests }),
        );
      },
      failed(v, queue, err) {
        ctx.logger.error({ vm: v.vm, queue, err: err.message, stack: err.stack }, "balloon queue loop failed");
      },
      changed: persist,
    };

    const detach = async (vm: string, why: string, keepState = false) => {
      const v = vms.get(vm);
      if (!v) return;
      vms.delete(vm);
      // A dropped VM's state must not come back at the next start (shutdown keeps it).
      if (!keepState) removeStateFile(shmDir, vm);
      const t = timers.get(vm);
      if (t) clearTimeout(t);
      timers.delete(vm);
      await v.stop();
      ctx.logger.info({ vm, why }, "balloon detached");
    };

    // The sidecar destroyed a VM: stop serving its queues and unmap its memory.
    const destroyed = ctx.nc.subscribe(serviceSubject(host, "shm-sidecar", "vm-destroyed"), {
      callback: (err: Error | null, msg: Msg) => {
        if (err) return;
        let vm: unknown;
        try {
          vm = (JSON.parse(msg.string()) as { vm?: unknown }).vm;
        } catch {
          return;
        }
        if (typeof vm !== "string") return;
        // The guest-driver destroys and re-creates its VM at boot: a late event
        // for the old VM must not detach the new one.
        const v = vms.get(vm);
        if (v && v.memoryReplaced()) void detach(vm, "vm-destroyed");
      },
    });

    ctx.addService(
      "virtmesh.balloon.v1.BalloonService",
      balloon.BalloonServiceService,
      balloonService({
        host,
        vms,
        events,
        async describeVm(vm) {
          const c = await ctx.client(host, "shm-sidecar", sidecar.SharedMemoryServiceClient);
          return callUnary(c, c.describeVm, { vm });
        },
        publishTarget: (v) => publishState(v, "target"),
        info: (msg, fields) => ctx.logger.info(fields ?? {}, msg),
        warn: (msg, fields) => ctx.logger.warn(fields ?? {}, msg),
        persist,
        detach,
      }),
    );

    // A restarted balloon-host resumes the VMs an earlier one served (their guests
    // keep running and do not attach again): from the state file it persisted
    // (ballooned pages, target, features) if the VM's memory is still the one it
    // served, else from the config page's marker with an empty bitmap.
    // The channel to this host's sidecar is up before a migrated VM's LoadState needs it.
    void ctx.client(host, "shm-sidecar", sidecar.SharedMemoryServiceClient).then((c) => c.getChannel().getConnectivityState(true), () => undefined);
    const describeAll = async () => {
      const c = await ctx.client(host, "shm-sidecar", sidecar.SharedMemoryServiceClient);
      return (await callUnary(c, c.listVms, {})).vms;
    };
    void (async () => {
      let layouts: sidecar.VmLayout[];
      try {
        layouts = await describeAll();
      } catch (e) {
        ctx.logger.warn({ err: (e as Error).message }, "could not list VMs to resume");
        return;
      }
      const saved = new Set(listStateFiles(shmDir));
      for (const vm of saved) {
        if (!layouts.some((l) => l.vm === vm)) {
          ctx.logger.info({ vm }, "dropping the balloon state of a VM that is gone");
          removeStateFile(shmDir, vm);
        }
      }
      for (const layout of layouts) {
        if (vms.has(layout.vm)) continue;
        if (saved.has(layout.vm)) {
          try {
            const st = readStateFile(shmDir, layout.vm);
            if (st.memoryIno !== statSync(layout.memoryPath).ino) throw new Error("the VM's memory file is not the one the state was saved for");
            const v = new BalloonVm(layout, st.features, events, { restore: { state: st, mode: "restart" } });
            if (vms.has(layout.vm)) {
              await v.stop();
              continue;
            }
            vms.set(layout.vm, v);
            persist(v);
            ctx.logger.info({ vm: layout.vm, features: v.features, mode: v.mode, targetPages: st.targetPages, ballooned: v.device.ballooned.count }, "balloon resumed from its state file");
            continue;
          } catch (e) {
            ctx.logger.warn({ vm: layout.vm, err: (e as Error).message }, "cannot resume the balloon from its state file; dropping it");
            removeStateFile(shmDir, layout.vm);
          }
        }
        try {
          const features = BalloonVm.storedFeatures(layout);
          if (features === null) continue;
          const v = new BalloonVm(layout, features, events, { resume: true });
          if (vms.has(layout.vm)) {
            // The guest attached meanwhile: its attachment wins.
            await v.stop();
            continue;
          }
          vms.set(layout.vm, v);
          persist(v);
          ctx.logger.info({ vm: layout.vm, features: v.features, mode: v.mode }, "balloon resumed");
        } catch (e) {
          ctx.logger.warn({ vm: layout.vm, err: (e as Error).message }, "could not resume the balloon");
        }
      }
    })();

    return {
      async stop() {
        destroyed.unsubscribe();
        // The state files stay: a balloon-host started again resumes from them.
        for (const vm of [...vms.keys()]) await detach(vm, "shutdown", true);
      },
    };
  },
});
