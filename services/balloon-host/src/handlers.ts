// BalloonService: AttachVm (the guest driver's handshake), SetTarget, GetStats,
// GetBalloonedPages. Thin: the work is in BalloonVm.
import { status as Status, type ServiceError } from "@grpc/grpc-js";
import { PAGE_SIZE, type BalloonMode } from "@virtmesh/balloon";
import { NAME_RE } from "@virtmesh/config";
import { balloon, type sidecar } from "@virtmesh/proto";
import { GrpcError, unary } from "@virtmesh/runtime";
import { AttachError, BalloonVm, type BalloonVmEvents } from "./balloon-vm";

/** How long GetStats waits for the guest to refill the stats buffer. */
export const STATS_REFRESH_MS = 500;

export interface HandlerDeps {
  host: string;
  vms: Map<string, BalloonVm>;
  describeVm(vm: string): Promise<sidecar.VmLayout>;
  events: BalloonVmEvents;
  publishTarget(vm: BalloonVm): void;
  info(msg: string, fields?: Record<string, unknown>): void;
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

  return {
    attachVm: unary(async (req: balloon.AttachVmRequest): Promise<balloon.AttachVmResponse> => {
      const name = checkVm(req.vm);
      if (!Number.isSafeInteger(req.driverFeatures) || req.driverFeatures < 0) {
        throw new GrpcError(Status.INVALID_ARGUMENT, `driver_features ${req.driverFeatures} must be a feature bit set below 2^53`);
      }
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
        if (old) {
          d.vms.delete(name);
          await old.stop();
        }
        let v: BalloonVm;
        try {
          v = new BalloonVm(layout, req.driverFeatures, d.events);
        } catch (e) {
          if (e instanceof AttachError) {
            throw new GrpcError(e.reason === "too-large" ? Status.RESOURCE_EXHAUSTED : Status.FAILED_PRECONDITION, e.message);
          }
          throw e;
        }
        d.vms.set(name, v);
        d.info("balloon attached", { vm: name, features: v.features, mode: v.mode, guestPages: v.guestPages, queues: v.queues });
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
      v.setTarget(pages);
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

