// BalloonService: AttachVm (the guest driver's handshake), SetTarget, GetStats,
// GetBalloonedPages, and the migration's SaveState / LoadState / DetachVm. Thin:
// the work is in BalloonVm. A refused request changes nothing: every check runs
// before an existing attachment is touched.
import { status as Status, type ServiceError } from "@grpc/grpc-js";
import { PAGE_SIZE, type BalloonMode } from "@virtmesh/balloon";
import { NAME_RE } from "@virtmesh/config";
import { balloon, type sidecar } from "@virtmesh/proto";
import { GrpcError, unary } from "@virtmesh/runtime";
import { AttachError, BalloonVm, unknownFeatureBits, type BalloonVmEvents, type RestoreFrom } from "./balloon-vm";
import { decodeBalloonState, encodeBalloonState, StateError, type BalloonVmState } from "./state";

/** How long GetStats waits for the guest to refill the stats buffer. */
export const STATS_REFRESH_MS = 500;

export interface HandlerDeps {
  host: string;
  vms: Map<string, BalloonVm>;
  describeVm(vm: string): Promise<sidecar.VmLayout>;
  events: BalloonVmEvents;
  publishTarget(vm: BalloonVm): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  /** A refused request, logged once at warn. */
  warn?(msg: string, fields?: Record<string, unknown>): void;
  /** Persist a VM's state (attach, target change); see main.ts. */
  persist?(vm: BalloonVm): void;
  /** Drop a VM: stop serving it, forget its persisted state. */
  detach(vm: string, why: string): Promise<void>;
}

const MODES: Record<BalloonMode, balloon.BalloonMode> = {
  pfn: balloon.BalloonMode.BALLOON_MODE_PFN,
  bitmap: balloon.BalloonMode.BALLOON_MODE_BITMAP,
  reporting: balloon.BalloonMode.BALLOON_MODE_REPORTING,
};

function checkVm(vm: string): string {
  if (!NAME_RE.test(vm)) throw new GrpcError(Status.INVALID_ARGUMENT, `vm '${vm}' is not a valid name: use 1-63 lowercase letters, digits or '-', starting with a letter or digit`);
  return vm;
}

export function balloonService(d: HandlerDeps) {
  const attached = (vm: string): BalloonVm => {
    const v = d.vms.get(checkVm(vm));
    if (!v) {
      throw new GrpcError(Status.NOT_FOUND, `vm '${vm}' has no balloon attached on host ${d.host} (its guest-driver calls AttachVm at boot)`);
    }
    return v;
  };
  // One attach per VM at a time: a second AttachVm waits for the first.
  const attaching = new Map<string, Promise<unknown>>();

  /**
   * AttachVm and LoadState: the layout first, the old attachment (guest reboot, or a
   * source resuming after a failed migration) stops taking buffers, the new one is
   * built; if that fails the old one is served again, as before the request.
   */
  const attachOne = (name: string, features: number, restore: RestoreFrom | undefined): Promise<balloon.AttachVmResponse> => {
    const prev = attaching.get(name) ?? Promise.resolve();
    const run = prev.then(async () => {
      let layout: sidecar.VmLayout;
      try {
        layout = await d.describeVm(name);
      } catch (e) {
        const se = e as ServiceError;
        if (se.code === Status.NOT_FOUND) throw new GrpcError(Status.NOT_FOUND, `vm '${name}' does not exist on host ${d.host}: ${se.details}`);
        throw new GrpcError(Status.UNAVAILABLE, `shm-sidecar@${d.host} DescribeVm(${name}) failed: ${se.details ?? se.message}`);
      }
      const old = d.vms.get(name);
      const wasFrozen = old?.isFrozen ?? false;
      await old?.quiesce();
      let v: BalloonVm;
      try {
        v = new BalloonVm(layout, features, d.events, restore ? { restore } : {});
      } catch (e) {
        if (old && !wasFrozen) old.thaw();
        if (e instanceof AttachError) {
          throw new GrpcError(e.reason === "too-large" ? Status.RESOURCE_EXHAUSTED : Status.FAILED_PRECONDITION, e.message);
        }
        throw e;
      }
      if (old) {
        d.vms.delete(name);
        await old.stop();
      }
      d.vms.set(name, v);
      d.persist?.(v);
      d.info(restore ? "balloon attached from a saved state" : "balloon attached", { vm: name, features: v.features, mode: v.mode, guestPages: v.guestPages, queues: v.queues, ballooned: v.device.ballooned.count });
      return {
        vm: name,
        deviceFeatures: v.deviceFeatures,
        features: v.features,
        mode: MODES[v.mode],
        guestPages: v.guestPages,
        configAddr: v.configAddr,
      };
    });
    attaching.set(name, run.catch(() => undefined));
    return run;
  };

  return {
    attachVm: unary((req: balloon.AttachVmRequest): Promise<balloon.AttachVmResponse> => {
      const name = checkVm(req.vm);
      if (!Number.isSafeInteger(req.driverFeatures) || req.driverFeatures < 0) {
        throw new GrpcError(Status.INVALID_ARGUMENT, `driver_features ${req.driverFeatures} must be a feature bit set below 2^53`);
      }
      // virtio 1.2 §2.2.1: the driver MUST NOT accept a feature the device did not
      // offer; bits no balloon device has are a broken (or hostile) caller, not a
      // reboot, and must not replace a running VM's attachment.
      const unknown = unknownFeatureBits(req.driverFeatures);
      if (unknown.length > 0) {
        throw new GrpcError(Status.INVALID_ARGUMENT, `driver_features has unknown feature bit${unknown.length > 1 ? "s" : ""} ${unknown.join(", ")} (VIRTIO_BALLOON_F_* known here: 0, 1, 2, 3, 5)`);
      }
      return attachOne(name, req.driverFeatures, undefined);
    }),

    saveState: unary(async (req: balloon.VmRef): Promise<balloon.BalloonState> => {
      const v = attached(req.vm);
      await v.quiesce();
      const st = v.snapshot();
      d.info("balloon state saved", { vm: v.vm, targetPages: st.targetPages, actualPages: st.actualPages, queues: st.queues.map((q) => `${q.name}@${q.lastAvailIdx}`) });
      return { state: Buffer.from(encodeBalloonState(st)) };
    }),

    loadState: unary((req: balloon.LoadBalloonStateRequest): Promise<balloon.AttachVmResponse> => {
      const name = checkVm(req.vm);
      let st: BalloonVmState;
      try {
        st = decodeBalloonState(req.state);
      } catch (e) {
        if (e instanceof StateError) throw new GrpcError(Status.INVALID_ARGUMENT, `state: ${e.message}`);
        throw e;
      }
      if (st.vm !== name) throw new GrpcError(Status.INVALID_ARGUMENT, `state is vm '${st.vm}'s balloon, not '${name}'s`);
      return attachOne(name, st.features, { state: st, mode: "migrate" });
    }),

    detachVm: unary(async (req: balloon.VmRef): Promise<balloon.VmRef> => {
      const v = attached(req.vm);
      await d.detach(v.vm, "DetachVm");
      return { vm: v.vm };
    }),

    setTarget: unary((req: balloon.SetTargetRequest): balloon.SetTargetResponse => {
      const v = attached(req.vm);
      if (!Number.isSafeInteger(req.targetBytes) || req.targetBytes < 0) {
        throw new GrpcError(Status.INVALID_ARGUMENT, `target_bytes ${req.targetBytes} must be a byte count below 2^53`);
      }
      // Whole pages; a partial page counts as one (the balloon works in 4 KiB pages).
      const pages = Math.ceil(req.targetBytes / PAGE_SIZE);
      if (pages > v.guestPages) {
        throw new GrpcError(
          Status.OUT_OF_RANGE,
          `target_bytes ${req.targetBytes} (${pages} pages) exceeds vm ${v.vm}'s guest RAM of ${v.guestPages} pages (${v.guestPages * PAGE_SIZE} bytes)`,
        );
      }
      if (v.isFrozen) throw new GrpcError(Status.FAILED_PRECONDITION, `vm ${v.vm}'s balloon is saved for a migration (SaveState); LoadState or AttachVm serves it again`);
      v.setTarget(pages);
      d.persist?.(v);
      d.publishTarget(v);
      return { targetPages: pages };
    }),

    getStats: unary(async (req: balloon.VmRef): Promise<balloon.BalloonStats> => {
      const v = attached(req.vm);
      await v.refreshStats(STATS_REFRESH_MS);
      const g = v.device.guestStats;
      return {
        vm: v.vm,
        targetPages: v.config.numPages,
        actualPages: v.config.actual,
        mode: MODES[v.mode],
        swapIn: g?.swapIn ?? 0,
        swapOut: g?.swapOut ?? 0,
        majorFaults: g?.majorFaults ?? 0,
        minorFaults: g?.minorFaults ?? 0,
        freeMemory: g?.freeMemory ?? 0,
        totalMemory: g?.totalMemory ?? 0,
        availableMemory: g?.availableMemory ?? 0,
        refusedRequests: v.refusedRequests,
        allocatedBytes: v.allocatedBytes(),
      };
    }),

    getBalloonedPages: unary((req: balloon.VmRef): balloon.BalloonedPages => {
      const v = attached(req.vm);
      const b = v.device.ballooned;
      const bytes = b.toBytes();
      // A copy: the live bitmap keeps changing while gRPC serialises.
      return { vm: v.vm, pages: b.pages, ballooned: b.count, bitmap: Buffer.from(bytes) };
    }),
  };
}

