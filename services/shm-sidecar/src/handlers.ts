// SharedMemoryService: thin handlers over VmRegistry / VmMemory / IommuContainer.
import { status as Status, type sendUnaryData, type ServerReadableStream, type ServerUnaryCall, type ServiceError } from "@grpc/grpc-js";
import { trace } from "@opentelemetry/api";
import { NAME_RE } from "@virtmesh/config";
import { sidecar } from "@virtmesh/proto";
import { GrpcError, unary } from "@virtmesh/runtime";
import { grpcStatusCode, type DirtyReport, type IommuError } from "@virtmesh/vfio";
import { GUEST_PAGE_SIZE } from "./config";
import {
  checkPageBitmap,
  checksumPages,
  DEFAULT_BATCH_PAGES,
  MAX_BATCH_PAGES,
  MigrationBitmap,
  MIN_BANDWIDTH_BYTES_PER_S,
  SendFailed,
  sendDirtyPages,
  TokenBucket,
  type PageSink,
} from "./migration";
import type { VmMemory } from "./vm-memory";
import type { VmRegistry } from "./vm-registry";
import { UndecodableRequest, type DirtyPagesRequest, type DmaMapRequest, type DmaUnmapRequest, type PinRequest } from "./wire";

export interface HandlerDeps {
  registry: VmRegistry;
  publish(topic: string, body: unknown): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  /**
   * Opens a ReceivePages stream to `host`'s shm-sidecar, found in the registry;
   * `who` names it in errors. Throws GrpcError UNAVAILABLE when it is not registered.
   */
  openPageStream?(host: string): Promise<{ sink: PageSink; who: string }>;
  /** Milliseconds, monotonic (performance.now by default). */
  now?(): number;
  sleep?(ms: number): Promise<void>;
}

function decoded<Req>(method: string, req: Req | UndecodableRequest): Req {
  if (req instanceof UndecodableRequest) {
    const hint = /MAX_SAFE_INTEGER/.test(req.message) ? " (uint64 fields here must be at most 2^53-1)" : "";
    throw new GrpcError(Status.INVALID_ARGUMENT, `${method}: the request cannot be decoded: ${req.message}${hint}`);
  }
  return req;
}

function rpc<Req, Res>(method: string, fn: (req: Req, call: ServerUnaryCall<Req | UndecodableRequest, Res>) => Res | Promise<Res>) {
  return unary<Req | UndecodableRequest, Res>((req, call) => fn(decoded(method, req), call));
}

const invalid = (msg: string): GrpcError => new GrpcError(Status.INVALID_ARGUMENT, msg);

/** The VM's migration bitmap; FAILED_PRECONDITION without one. */
function migrationOf(vm: VmMemory, method: string): MigrationBitmap {
  if (!vm.migration) {
    throw new GrpcError(Status.FAILED_PRECONDITION, `${method}: vm '${vm.name}' has no migration bitmap; call StartMigrationBitmap first`);
  }
  return vm.migration;
}

const defaultNow = (): number => performance.now();
const defaultSleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

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
        incoming: vm.incoming,
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

    // DestroyVm drops the migration bitmap with the VM (VmMemory.destroy): StopMigrationBitmap is implied.
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

    // --- Source side of the migration page stream (QEMU migration/ram.c) ---

    startMigrationBitmap: rpc("StartMigrationBitmap", (req: sidecar.StartMigrationBitmapRequest): sidecar.StartMigrationBitmapResponse => {
      const vm = registry.get(req.vm);
      checkPageBitmap("skip_bitmap", req.skipBitmap, vm.pages);
      // One migration at a time: a second Start would silently resurrect pages the
      // first already sent. The manager stops the old one (cancel path) first.
      if (vm.migration) {
        throw new GrpcError(
          Status.FAILED_PRECONDITION,
          `vm '${vm.name}' already has a migration bitmap (${vm.migration.dirty} pages to send); call StopMigrationBitmap first`,
        );
      }
      const bm = new MigrationBitmap(vm.pages, req.skipBitmap);
      vm.migration = bm;
      return { pages: vm.pages, dirty: bm.dirty, skipped: bm.skipped };
    }),

    syncDirty: rpc("SyncDirty", (req: sidecar.SyncDirtyRequest): sidecar.SyncDirtyResponse => {
      const vm = registry.get(req.vm);
      const bm = migrationOf(vm, "SyncDirty");
      if (!(req.vfioReport in REPORTS)) {
        throw invalid(`vfio_report ${req.vfioReport} must be DIRTY_REPORT_UNSPECIFIED (0, skip), _ALL (1), _PINNED (2) or _UNPINNED (3)`);
      }
      if ((req.vcpuLog || req.deviceLog) && !vm.dirtyLoggingEnabled) {
        throw new GrpcError(
          Status.FAILED_PRECONDITION,
          `SyncDirty: dirty logging is off for vm '${vm.name}': call SetDirtyLogging(enabled=true) before syncing the ${req.vcpuLog ? "vCPU" : "device"} log`,
        );
      }
      const K = sidecar.DirtyLogKind;
      const out: sidecar.SyncDirtyResponse = { dirtyVcpu: 0, dirtyDevice: 0, dirtyVfio: 0, newDirty: 0, remaining: 0 };
      // migration_bitmap_sync: KVM_GET_DIRTY_LOG (fetch-and-clear, FetchDirtyLog's code), then each log folded in.
      if (req.vcpuLog) {
        const s = vm.fetchDirtyLog(K.DIRTY_LOG_KIND_VCPU, true);
        out.dirtyVcpu = s.dirty;
        out.newDirty += bm.mergeLog(s.bitmap);
      }
      if (req.deviceLog) {
        const s = vm.fetchDirtyLog(K.DIRTY_LOG_KIND_DEVICE, true);
        out.dirtyDevice = s.dirty;
        out.newDirty += bm.mergeLog(s.bitmap);
      }
      const report = REPORTS[req.vfioReport];
      if (report !== undefined && vm.iommu.dirtyTracking) {
        // vfio_iommu_type1_dirty_pages GET_BITMAP over each DMA mapping (QEMU's
        // vfio_sync_dirty_bitmap per section); bits by iova, placed at the mapping's gpa.
        for (const m of vm.iommu.mappings()) {
          const r = vm.iommu.getBitmap({ iova: m.iova, size: m.size, report });
          if (!r.ok) {
            out.remaining = bm.dirty;
            // What the logs gave is already in the bitmap: nothing harvested is lost.
            throw new GrpcError(grpcStatusCode(r), `SyncDirty: VFIO GET_BITMAP of iova 0x${m.iova.toString(16)}: ${r.message}`);
          }
          out.dirtyVfio += r.dirty;
          if (r.dirty > 0) out.newDirty += bm.mergeRange(r.bitmap!, m.vaddr / GUEST_PAGE_SIZE, m.size / GUEST_PAGE_SIZE);
        }
      }
      out.remaining = bm.dirty;
      return out;
    }),

    sendDirty: rpc("SendDirty", async (req: sidecar.SendDirtyRequest, call): Promise<sidecar.SendDirtyResponse> => {
      const vm = registry.get(req.vm);
      const bm = migrationOf(vm, "SendDirty");
      if (!NAME_RE.test(req.destinationHost)) {
        throw invalid(`destination_host '${req.destinationHost}' is not a valid host name: use 1-63 lowercase letters, digits or '-', starting with a letter or digit`);
      }
      if (req.destinationHost === host) {
        throw invalid(`destination_host '${req.destinationHost}' is this host: a VM migrates to another host's shm-sidecar`);
      }
      if (!Number.isInteger(req.round) || req.round < 0) throw invalid(`round ${req.round} must be a non-negative integer`);
      if (req.round < bm.lastRound) {
        throw new GrpcError(Status.FAILED_PRECONDITION, `round ${req.round} is before round ${bm.lastRound}, already sent for vm '${vm.name}': rounds never go back`);
      }
      const bw = req.bandwidthBytesPerS;
      if (!Number.isSafeInteger(bw) || bw < 0 || (bw > 0 && bw < MIN_BANDWIDTH_BYTES_PER_S)) {
        throw invalid(`bandwidth_bytes_per_s ${bw} must be 0 (unlimited) or at least ${MIN_BANDWIDTH_BYTES_PER_S} (one page per second)`);
      }
      if (!Number.isInteger(req.batchPages) || req.batchPages < 0 || req.batchPages > MAX_BATCH_PAGES) {
        throw invalid(`batch_pages ${req.batchPages} must be 0 (${DEFAULT_BATCH_PAGES}) to ${MAX_BATCH_PAGES}`);
      }
      if (bm.sending) throw new GrpcError(Status.FAILED_PRECONDITION, `a SendDirty for vm '${vm.name}' is already streaming pages`);
      if (!d.openPageStream) throw new GrpcError(Status.UNIMPLEMENTED, "this sidecar has no way to reach other hosts");
      const batchPages = req.batchPages || DEFAULT_BATCH_PAGES;
      const now = d.now ?? defaultNow;
      // Taken before the first await, so a second SendDirty cannot start meanwhile.
      bm.sending = true;
      let cancelled = false;
      const onCancel = () => (cancelled = true);
      call.on("cancelled", onCancel);
      try {
        const { sink, who } = await d.openPageStream(req.destinationHost).catch((e: unknown) => {
          if (e instanceof GrpcError) throw e;
          throw new GrpcError(Status.UNAVAILABLE, `cannot reach the shm-sidecar of destination host '${req.destinationHost}': ${(e as Error).message}`);
        });
        const abortReason = (): string | null => {
          if (!vm.alive) return `vm '${vm.name}' was destroyed during SendDirty round ${req.round}`;
          if (vm.migration !== bm) return `the migration bitmap of vm '${vm.name}' was stopped during SendDirty round ${req.round}`;
          if (cancelled) return `the caller cancelled SendDirty round ${req.round} of vm '${vm.name}'`;
          return null;
        };
        const span = trace.getActiveSpan();
        try {
          const r = await sendDirtyPages(bm, vm.guestPages(), sink, {
            vm: vm.name,
            round: req.round,
            batchPages,
            bucket: bw > 0 ? new TokenBucket(bw, now(), Math.max(batchPages * GUEST_PAGE_SIZE, Math.floor(bw / 10))) : null,
            now,
            sleep: d.sleep ?? defaultSleep,
            abortReason,
          });
          bm.lastRound = req.round;
          const res = { pages: r.pages, zeroPages: r.zeroPages, bytes: r.bytes, elapsedUs: Math.round(r.elapsedMs * 1000) };
          span?.setAttributes({
            "virtmesh.migration.round": req.round,
            "virtmesh.migration.destination": req.destinationHost,
            "virtmesh.migration.pages": r.pages,
            "virtmesh.migration.zero_pages": r.zeroPages,
            "virtmesh.migration.bytes": r.bytes,
            "virtmesh.migration.batches": r.batches,
            "virtmesh.migration.remaining": bm.dirty,
          });
          return res;
        } catch (e) {
          if (!(e instanceof SendFailed)) throw e;
          span?.addEvent("send-failed", { "virtmesh.migration.round": req.round, "virtmesh.migration.pages_taken": e.pagesTaken, reason: e.message });
          if (e.kind === "aborted") throw new GrpcError(cancelled ? Status.CANCELLED : Status.ABORTED, e.message);
          throw new GrpcError(
            Status.UNAVAILABLE,
            `SendDirty round ${req.round} of vm '${vm.name}' to ${who} failed: ${e.message}; its ${e.pagesTaken} pages are back in the migration bitmap (${bm.dirty} to send)`,
          );
        }
      } finally {
        bm.sending = false;
        call.removeListener("cancelled", onCancel);
      }
    }),

    stopMigrationBitmap: rpc("StopMigrationBitmap", (req: sidecar.VmRef): sidecar.StopMigrationBitmapResponse => {
      const vm = registry.get(req.vm);
      const existed = vm.migration !== null;
      // A SendDirty in flight sees the bitmap gone before its next batch and stops (ABORTED).
      vm.migration = null;
      return { existed };
    }),

    checksumMemory: rpc("ChecksumMemory", async (req: sidecar.ChecksumMemoryRequest): Promise<sidecar.MemoryChecksum> => {
      const vm = registry.get(req.vm);
      checkPageBitmap("exclude_bitmap", req.excludeBitmap, vm.pages);
      return checksumPages(vm.guestPages(), req.excludeBitmap, {
        alive: () => (vm.alive ? null : `vm '${vm.name}' was destroyed during ChecksumMemory`),
      });
    }),
  };
}
