// SharedMemoryService: thin handlers over VmRegistry / VmMemory / IommuContainer.
import { status as Status, type sendUnaryData, type ServerReadableStream, type ServiceError } from "@grpc/grpc-js";
import { sidecar } from "@virtmesh/proto";
import { GrpcError, unary } from "@virtmesh/runtime";
import { grpcStatusCode, type DirtyReport, type IommuError } from "@virtmesh/vfio";
import { GUEST_PAGE_SIZE } from "./config";
import type { VmRegistry } from "./vm-registry";
import { UndecodableRequest, type DirtyPagesRequest, type DmaMapRequest, type DmaUnmapRequest, type PinRequest } from "./wire";

export interface HandlerDeps {
  registry: VmRegistry;
  publish(topic: string, body: unknown): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
}

function decoded<Req>(method: string, req: Req | UndecodableRequest): Req {
  if (req instanceof UndecodableRequest) {
    const hint = /MAX_SAFE_INTEGER/.test(req.message) ? " (uint64 fields here must be at most 2^53-1)" : "";
    throw new GrpcError(Status.INVALID_ARGUMENT, `${method}: the request cannot be decoded: ${req.message}${hint}`);
  }
  return req;
}

function rpc<Req, Res>(method: string, fn: (req: Req) => Res) {
  return unary<Req | UndecodableRequest, Res>((req) => fn(decoded(method, req)));
}

function iommuFailed(r: IommuError): GrpcError {
  return new GrpcError(grpcStatusCode(r), r.message);
}

const REPORTS: Record<number, DirtyReport | undefined> = {
  [sidecar.DirtyReport.DIRTY_REPORT_UNSPECIFIED]: undefined,
  [sidecar.DirtyReport.DIRTY_REPORT_ALL]: "all",
  [sidecar.DirtyReport.DIRTY_REPORT_PINNED]: "pinned",
  [sidecar.DirtyReport.DIRTY_REPORT_UNPINNED]: "unpinned",
};

export function sharedMemoryService(d: HandlerDeps) {
  const { registry } = d;
  const host = registry.host;

  return {
    createVm: rpc("CreateVm", (req: sidecar.CreateVmRequest): sidecar.VmLayout => {
      const vm = registry.create(req);
      const layout = vm.layout(host, registry.shmDir);
      d.publish("vm-created", {
        vm: vm.name,
        host,
        memoryPath: vm.memoryPath,
        memoryBytes: vm.memoryBytes,
        reservedAddr: layout.reservedAddr,
        reservedBytes: layout.reservedBytes,
        queues: layout.queues.length,
      });
      return layout;
    }),

    describeVm: rpc("DescribeVm", (req: sidecar.VmRef): sidecar.VmLayout => registry.get(req.vm).layout(host, registry.shmDir)),

    listVms: rpc("ListVms", (_req: sidecar.ListVmsRequest): sidecar.ListVmsResponse => ({
      vms: registry.list().map((vm) => vm.layout(host, registry.shmDir)),
    })),

    destroyVm: rpc("DestroyVm", (req: sidecar.VmRef): sidecar.DestroyVmResponse => {
      const { existed, problems } = registry.destroy(req.vm);
      if (problems.length) d.warn("DestroyVm left files behind", { vm: req.vm, problems });
      if (existed) d.publish("vm-destroyed", { vm: req.vm, host });
      return { existed };
    }),

    setDirtyLogging: rpc("SetDirtyLogging", (req: sidecar.SetDirtyLoggingRequest): sidecar.SetDirtyLoggingResponse => {
      const vm = registry.get(req.vm);
      // Writers in other processes keep their own DirtyLog.enabled: they learn the switch from this event.
      if (vm.setDirtyLogging(req.enabled)) d.publish("dirty-logging", { vm: vm.name, host, enabled: req.enabled });
      return { enabled: vm.dirtyLoggingEnabled };
    }),

    fetchDirtyLog: rpc("FetchDirtyLog", (req: sidecar.FetchDirtyLogRequest): sidecar.FetchDirtyLogResponse => {
      const s = registry.get(req.vm).fetchDirtyLog(req.kind, req.clear);
      return { pages: s.pages, dirty: s.dirty, bitmap: Buffer.from(s.bitmap.buffer, s.bitmap.byteOffset, s.bitmap.byteLength) };
    }),

    releasePages: rpc("ReleasePages", (req: sidecar.ReleasePagesRequest): sidecar.ReleasePagesResponse => ({
      allocatedBytes: registry.get(req.vm).releasePages(req.guestAddr, req.length),
    })),

    memoryUsage: rpc("MemoryUsage", (req: sidecar.VmRef): sidecar.MemoryUsageResponse => {
      const vm = registry.get(req.vm);
      return { memoryBytes: vm.memoryBytes, allocatedBytes: vm.allocatedBytes() };
    }),

    dmaMap: rpc("DmaMap", (req: DmaMapRequest): sidecar.DmaMapResponse => {
      const r = registry.get(req.vm).iommu.mapDma(req);
      if (!r.ok) throw iommuFailed(r);
      return {};
    }),

    dmaUnmap: rpc("DmaUnmap", (req: DmaUnmapRequest): sidecar.DmaUnmapResponse => {
      const vm = registry.get(req.vm);
      const r = vm.iommu.unmapDma(req);
      if (!r.ok) throw iommuFailed(r);
      vm.recordDeviceDirty(r.dirtyRanges);
      return { unmappedBytes: r.unmappedBytes };
    }),

    pinPages: rpc("PinPages", (req: PinRequest): sidecar.PinPagesResponse => {
      const r = registry.get(req.vm).iommu.pinPages(req.iovas);
      if (!r.ok) throw iommuFailed(r);
      return { guestPfns: r.guestPfns };
    }),

    unpinPages: rpc("UnpinPages", (req: PinRequest): sidecar.UnpinPagesResponse => {
      const r = registry.get(req.vm).iommu.unpinPages(req.iovas);
      if (!r.ok) throw iommuFailed(r);
      return { unpinned: r.unpinned };
    }),

    dirtyPages: rpc("DirtyPages", (req: DirtyPagesRequest): sidecar.DirtyPagesResponse => {
      const vm = registry.get(req.vm);
      if (!(req.reportMode in REPORTS)) {
        throw new GrpcError(
          Status.INVALID_ARGUMENT,
          `report_mode ${req.reportMode} must be DIRTY_REPORT_UNSPECIFIED (0), _ALL (1), _PINNED (2) or _UNPINNED (3)`,
        );
      }
      const r = vm.iommu.dirtyPages({
        argsz: req.argsz,
        flags: req.flags,
        iova: req.iova,
        size: req.size,
        pgsize: req.pgsize,
        bitmapSize: req.bitmapSize,
        report: REPORTS[req.reportMode],
      });
      if (!r.ok) throw iommuFailed(r);
      const bm = r.bitmap ?? new Uint8Array(0);
      return { bitmap: Buffer.from(bm.buffer, bm.byteOffset, bm.byteLength), dirty: r.dirty };
    }),

    iommuInfo: rpc("IommuInfo", (req: sidecar.VmRef): sidecar.IommuInfoResponse => {
      const i = registry.get(req.vm).iommu.info();
      return { iovaPgsizes: i.iovaPgsizes, dirtyTracking: i.dirtyTracking, pinnedPages: i.pinnedPages, mappings: i.mappings };
    }),

    // The destination side of the migration page stream: pages land in the VM's memory file.
    receivePages: (
      call: ServerReadableStream<sidecar.PageBatch | UndecodableRequest, sidecar.ReceivePagesResponse>,
      cb: sendUnaryData<sidecar.ReceivePagesResponse>,
    ): void => {
      let pages = 0;
      let bytes = 0;
      let vmName: string | null = null;
      let done = false;
      const fail = (e: unknown) => {
        if (done) return;
        done = true;
        const err: Partial<ServiceError> =
          e instanceof GrpcError ? { code: e.code, details: e.message } : { code: Status.INTERNAL, details: (e as Error).message };
        cb(err);
      };
      call.on("data", (raw: sidecar.PageBatch | UndecodableRequest) => {
        if (done) return;
        try {
          const b = decoded("ReceivePages", raw);
          if (vmName !== null && b.vm !== vmName) {
            throw new GrpcError(Status.INVALID_ARGUMENT, `batch for vm '${b.vm}' in a stream for vm '${vmName}': one stream carries one VM`);
          }
          const vm = registry.get(b.vm);
          vmName = vm.name;
          b.pfns.forEach((pfn, i) => {
            if (!Number.isSafeInteger(pfn) || pfn < 0 || pfn >= vm.pages) {
              throw new GrpcError(Status.OUT_OF_RANGE, `round ${b.round}: pfns[${i}] ${pfn} is past guest memory of ${vm.pages} pages`);
            }
          });
          const want = b.zero ? 0 : b.pfns.length * GUEST_PAGE_SIZE;
          if (b.data.length !== want) {
            throw new GrpcError(
              Status.INVALID_ARGUMENT,
              `round ${b.round}: data has ${b.data.length} bytes; ${b.zero ? "a zero batch carries none" : `${b.pfns.length} pfns need ${want}`}`,
            );
          }
          vm.writePages(b.pfns, b.data, b.zero);
          pages += b.pfns.length;
          bytes += b.data.length;
        } catch (e) {
          fail(e);
        }
      });
      call.on("end", () => {
        if (done) return;
        done = true;
        cb(null, { pages, bytes });
      });
      call.on("error", () => {
        done = true;
      });
    },
  };
}
