// An assigned device with pinned pages (seed 004, "vfio iommu: Implementation of ioctl
// for dirty pages tracking"): the guest gives a small emulated device a DMA region,
// pages from its own allocator mapped through the host sidecar's VFIO type1 container
// (VFIO_IOMMU_MAP_DMA, READ|WRITE) and pinned page by page as a mediated device's vendor
// driver does with vfio_pin_pages(). The device then writes a counter into those pages
// at a set rate.
//
// The device model runs on the guest-driver's main thread (it is the VMM's device, not a
// vCPU) and writes through the raw guest mapping: a device's DMA never reaches KVM's
// dirty bitmap, so no dirty log sees these writes. That is the whole point of the seed:
// the container has no hardware dirty tracking, so vfio_iova_dirty_bitmap() reports every
// pinned page dirty on each GET_BITMAP, and only that report lets a migration send the
// pages the device keeps changing.
//
// Write k (1-based) goes to page (k - 1) mod pages of the region and stores k as a
// little-endian u64 at the start of the page, so the region's contents follow from the
// write count alone (verify()), on the source and on a migration's destination.
import { status as Status } from "@grpc/grpc-js";
import { PAGE_SIZE, type BuddyAllocator } from "@virtmesh/balloon";
import { callUnary, type guest, type sidecar } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { EnvelopeError } from "./migrate";
import { allocWorkingSet, freeWorkingSet, type WorkingSet } from "./working-set";

/** The device's section in the VM state envelope (migrate.ts): JSON DmaDeviceState. */
export const S_DMA_DEVICE = "vfio.dma0";
/** Where the device's region starts in IOVA space: above any guest-physical address here (guests are at most 4 GiB). */
export const DMA_IOVA_BASE = 0x1_0000_0000;
/** VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE */
export const DMA_MAP_READ_WRITE = 0x3;
/** VFIO_PIN_PAGES_MAX_ENTRIES: vfio_pin_pages() takes at most this many pages per call. */
export const PIN_BATCH = 512;
/** DmaDeviceRequest.write_rate_bytes_per_s 0. */
export const DEFAULT_WRITE_RATE = 1 << 20;
/** The most a device model on the main thread is asked to write (page writes of 8 bytes each). */
export const MAX_WRITE_RATE = 1 << 30;
/** The device's timer period. */
const TICK_MS = 10;
const STATE_VERSION = 1;

/** The container calls the device needs: the shm-sidecar's VFIO IOMMU requests. */
export interface DmaIommu {
  dmaMap(req: sidecar.DmaMapRequest): Promise<unknown>;
  dmaUnmap(req: sidecar.DmaUnmapRequest): Promise<{ unmappedBytes: number }>;
  pinPages(req: sidecar.PinPagesRequest): Promise<{ guestPfns: number[] }>;
  unpinPages(req: sidecar.UnpinPagesRequest): Promise<{ unpinned: number }>;
}

/** DmaIommu over a shm-sidecar client (this host's container). */
export function sidecarIommu(sc: sidecar.SharedMemoryServiceClient): DmaIommu {
  return {
    dmaMap: (r) => callUnary(sc, sc.dmaMap, r),
    dmaUnmap: (r) => callUnary(sc, sc.dmaUnmap, r),
    pinPages: (r) => callUnary(sc, sc.pinPages, r),
    unpinPages: (r) => callUnary(sc, sc.unpinPages, r),
  };
}

/** What a migration carries of the device (the VFIO mappings of the device state). */
export interface DmaDeviceState {
  version: number;
  iova: number;
  guestAddr: number;
  regionBytes: number;
  writeRateBytesPerS: number;
  /** Pages pinned when saved (every page of the region). */
  pinnedPages: number;
  /** Page writes the device made; the next one stores dmaWrites + 1. */
  dmaWrites: number;
  /** The region's pages as the guest allocator holds them (freed at detach). */
  region: WorkingSet;
}

export interface DmaVerifyResult {
  pagesChecked: number;
  mismatches: number;
  firstMismatch: string;
}

type GrpcLike = { code?: number; details?: string; message?: string };

/** A failed container call as a status the caller can read: the sidecar's code, what was asked. */
function failed(what: string, e: unknown): GrpcError {
  if (e instanceof GrpcError) return new GrpcError(e.code, `${what}: ${e.message}`);
  const g = e as GrpcLike;
  return new GrpcError(typeof g.code === "number" ? g.code : Status.INTERNAL, `${what}: ${g.details ?? g.message ?? String(e)}`);
}

/** Checks SetDmaDevice's arguments for an attach; returns the effective write rate. */
export function checkDmaRequest(req: guest.DmaDeviceRequest, guestRamBytes: number): number {
  const bytes = req.regionBytes;
  if (!(Number.isSafeInteger(bytes) && bytes > 0 && bytes % PAGE_SIZE === 0)) {
    throw new GrpcError(Status.INVALID_ARGUMENT, `region_bytes ${bytes} must be a positive multiple of ${PAGE_SIZE} (0 detaches the device)`);
  }
  if (bytes > guestRamBytes) throw new GrpcError(Status.OUT_OF_RANGE, `region_bytes ${bytes} is more than the guest's ${guestRamBytes} bytes of RAM`);
  const rate = req.writeRateBytesPerS || DEFAULT_WRITE_RATE;
  if (!(Number.isSafeInteger(rate) && rate > 0 && rate <= MAX_WRITE_RATE)) {
    throw new GrpcError(Status.INVALID_ARGUMENT, `write_rate_bytes_per_s ${req.writeRateBytesPerS} must be 0 (1 MiB/s) or at most ${MAX_WRITE_RATE}`);
  }
  return rate;
}

export interface DmaAttachOptions {
  vm: string;
  iommu: DmaIommu;
  /** Guest memory, guest-physical address 0 at index 0. */
  mem: Uint8Array;
  allocator: BuddyAllocator;
  regionBytes: number;
  writeRateBytesPerS: number;
  iova?: number;
}

export class DmaDevice {
  private timer: NodeJS.Timeout | null = null;
  private lastTickMs = 0;
  /** Fractional page writes owed by the rate since the last tick. */
  private credit = 0;
  private pinned = 0;
  private mapped = false;
  private readonly view: DataView;
  private readonly pages: number;

  private constructor(
    private readonly vm: string,
    private readonly iommu: DmaIommu,
    private readonly mem: Uint8Array,
    readonly region: WorkingSet,
    readonly iova: number,
    readonly writeRateBytesPerS: number,
    private writes: number,
  ) {
    this.view = new DataView(mem.buffer, mem.byteOffset, mem.byteLength);
    this.pages = region.pages;
  }

  get guestAddr(): number {
    return this.region.pfn * PAGE_SIZE;
  }
  get regionBytes(): number {
    return this.region.pages * PAGE_SIZE;
  }
  get dmaWrites(): number {
    return this.writes;
  }
  get pinnedPages(): number {
    return this.pinned;
  }
  get running(): boolean {
    return this.timer !== null;
  }

  /**
   * SetDmaDevice: region_bytes of contiguous pages from the guest allocator, DMA_MAP'd
   * at `iova` and every page pinned. Not started (start()). On any failure what was
   * done is undone and the pages go back to the allocator.
   */
  static async attach(o: DmaAttachOptions): Promise<DmaDevice> {
    const pages = o.regionBytes / PAGE_SIZE;
    const region = allocWorkingSet(o.allocator, pages);
    if (!region) {
      throw new GrpcError(Status.RESOURCE_EXHAUSTED, `no ${o.regionBytes} bytes contiguous free in the guest for the DMA region (${o.allocator.freePages * PAGE_SIZE} bytes free in all)`);
    }
    const dev = new DmaDevice(o.vm, o.iommu, o.mem, region, o.iova ?? DMA_IOVA_BASE, o.writeRateBytesPerS, 0);
    try {
      await dev.mapAndPin();
    } catch (e) {
      freeWorkingSet(o.allocator, region);
      throw e;
    }
    return dev;
  }

  /**
   * LoadState on a migration's destination: the same region (its pages came with guest
   * memory, the allocator's metadata too), mapped and pinned again in this host's
   * container. Paused until start().
   */
  static async load(vm: string, iommu: DmaIommu, mem: Uint8Array, bytes: Uint8Array): Promise<DmaDevice> {
    const s = parseDmaState(bytes, mem.byteLength);
    const dev = new DmaDevice(vm, iommu, mem, s.region, s.iova, s.writeRateBytesPerS, s.dmaWrites);
    await dev.mapAndPin();
    return dev;
  }

  private async mapAndPin(): Promise<void> {
    const { vm, iova } = this;
    const size = this.regionBytes;
    try {
      await this.iommu.dmaMap({ vm, iova, vaddr: this.guestAddr, size, flags: DMA_MAP_READ_WRITE });
    } catch (e) {
      throw failed(`DmaMap(iova 0x${iova.toString(16)}, ${size} bytes at guest 0x${this.guestAddr.toString(16)})`, e);
    }
    this.mapped = true;
    try {
      for (let first = 0; first < this.pages; first += PIN_BATCH) {
        const iovas = this.iovas(first, Math.min(PIN_BATCH, this.pages - first));
        const r = await this.iommu.pinPages({ vm, iovas });
        this.pinned += iovas.length;
        // vfio_pin_pages() hands back the host pfns; here guest pfns: they must be the region's.
        for (let i = 0; i < r.guestPfns.length; i++) {
          if (r.guestPfns[i] !== this.region.pfn + first + i) throw new GrpcError(Status.INTERNAL, `PinPages: iova 0x${iovas[i]!.toString(16)} maps guest pfn ${r.guestPfns[i]}, not ${this.region.pfn + first + i}`);
        }
      }
    } catch (e) {
      await this.unpinAndUnmap().catch(() => undefined);
      throw e instanceof GrpcError ? e : failed("PinPages", e);
    }
  }

  private iovas(first: number, n: number): number[] {
    const out = new Array<number>(n);
    for (let i = 0; i < n; i++) out[i] = this.iova + (first + i) * PAGE_SIZE;
    return out;
  }

  private async unpinAndUnmap(): Promise<void> {
    const { vm } = this;
    const errors: string[] = [];
    for (let first = 0; first < this.pinned; first += PIN_BATCH) {
      const iovas = this.iovas(first, Math.min(PIN_BATCH, this.pinned - first));
      await this.iommu.unpinPages({ vm, iovas }).catch((e: unknown) => errors.push(failed("UnpinPages", e).message));
    }
    this.pinned = 0;
    if (this.mapped) {
      // DMA_UNMAP also drops any pin left (the vendor driver's answer to the unmap notifier).
      await this.iommu.dmaUnmap({ vm, iova: this.iova, size: this.regionBytes }).catch((e: unknown) => errors.push(failed("DmaUnmap", e).message));
      this.mapped = false;
    }
    if (errors.length) throw new GrpcError(Status.INTERNAL, errors.join("; "));
  }

  /** The device runs: its timer writes at the set rate. Resume of a paused VM, too. */
  start(): void {
    if (this.timer) return;
    this.lastTickMs = performance.now();
    this.credit = 0;
    this.timer = setInterval(() => this.tick(), TICK_MS);
    // The service's server keeps the process alive, not the device.
    this.timer.unref();
  }

  /** Quiesced (a paused VM's devices at stop-and-copy): no write after this returns. */
  pause(): void {
    if (!this.timer) return;
    clearInterval(this.timer);
    this.timer = null;
  }

  private tick(): void {
    const now = performance.now();
    this.credit += ((now - this.lastTickMs) * this.writeRateBytesPerS) / 1000 / PAGE_SIZE;
    this.lastTickMs = now;
    const n = Math.floor(this.credit);
    if (n <= 0) return;
    // A stalled loop does not make the device catch up with more than a pass.
    this.credit = n > this.pages ? 0 : this.credit - n;
    this.dmaWrite(Math.min(n, this.pages));
  }

  /**
   * `n` page writes by the device: raw stores into guest memory, no dirty log touched
   * (a device's DMA is invisible to KVM's dirty bitmap; seed 004's pinned-page report
   * is what covers it).
   */
  dmaWrite(n: number): void {
    const base = this.guestAddr;
    for (let i = 0; i < n; i++) {
      const k = ++this.writes;
      const at = base + ((k - 1) % this.pages) * PAGE_SIZE;
      this.view.setUint32(at, k >>> 0, true);
      this.view.setUint32(at + 4, Math.floor(k / 0x1_0000_0000), true);
    }
  }

  /** The region against the write count: page i holds the last k <= dmaWrites with (k - 1) mod pages = i, or 0. */
  verify(mem: Uint8Array = this.mem): DmaVerifyResult {
    const view = new DataView(mem.buffer, mem.byteOffset, mem.byteLength);
    return verifyRegion(view, this.guestAddr, this.pages, this.writes);
  }

  status(): guest.DmaDeviceStatus {
    return { attached: true, iova: this.iova, guestAddr: this.guestAddr, regionBytes: this.regionBytes, pinnedPages: this.pinned, dmaWrites: this.writes };
  }

  save(): DmaDeviceState {
    return {
      version: STATE_VERSION,
      iova: this.iova,
      guestAddr: this.guestAddr,
      regionBytes: this.regionBytes,
      writeRateBytesPerS: this.writeRateBytesPerS,
      pinnedPages: this.pinned,
      dmaWrites: this.writes,
      region: { pfn: this.region.pfn, pages: this.region.pages, blocks: this.region.blocks.map(([p, o]) => [p, o] as [number, number]) },
    };
  }

  /** SetDmaDevice{0}: the device stops, its pages are unpinned and unmapped and go back to the allocator. */
  async detach(allocator: BuddyAllocator): Promise<void> {
    this.pause();
    try {
      await this.unpinAndUnmap();
    } finally {
      freeWorkingSet(allocator, this.region);
    }
  }

  /**
   * The VM leaves this host (Release after a migration, AbortIncoming, shutdown): the
   * device stops, unpin and unmap; the pages stay the guest's (its memory goes with it).
   */
  async release(): Promise<void> {
    this.pause();
    await this.unpinAndUnmap();
  }
}

export const noDmaDevice = (): guest.DmaDeviceStatus => ({ attached: false, iova: 0, guestAddr: 0, regionBytes: 0, pinnedPages: 0, dmaWrites: 0 });

/** The region's pattern check (also what a test reading guest memory from outside does). */
export function verifyRegion(view: DataView, guestAddr: number, pages: number, writes: number): DmaVerifyResult {
  let mismatches = 0;
  let firstMismatch = "";
  for (let i = 0; i < pages; i++) {
    const at = guestAddr + i * PAGE_SIZE;
    const got = view.getUint32(at, true) + view.getUint32(at + 4, true) * 0x1_0000_0000;
    // The last write to page i: the largest k <= writes with k = i + 1 (mod pages).
    const want = writes > i ? writes - ((writes - 1 - i) % pages) : 0;
    if (got !== want) {
      if (!mismatches) firstMismatch = `page ${i} (guest 0x${at.toString(16)}) holds ${got}, the device's last write there was ${want}`;
      mismatches++;
    }
  }
  return { pagesChecked: pages, mismatches, firstMismatch };
}

export const encodeDmaState = (s: DmaDeviceState): Uint8Array => new Uint8Array(Buffer.from(JSON.stringify(s)));

/** A saved device state, checked against guest memory of `memoryBytes` (the destination refuses what it cannot map). */
export function parseDmaState(bytes: Uint8Array, memoryBytes: number): DmaDeviceState {
  let s: DmaDeviceState;
  try {
    s = JSON.parse(Buffer.from(bytes).toString("utf8")) as DmaDeviceState;
  } catch {
    throw new EnvelopeError(`VM state section ${S_DMA_DEVICE} is not valid JSON`);
  }
  if (s?.version !== STATE_VERSION) throw new EnvelopeError(`VM state section ${S_DMA_DEVICE} has version ${String(s?.version)}; this guest-driver knows ${STATE_VERSION}`);
  const uint = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;
  const r = s.region;
  const ok =
    uint(s.iova) &&
    uint(s.guestAddr) &&
    uint(s.regionBytes) &&
    uint(s.dmaWrites) &&
    uint(s.writeRateBytesPerS) &&
    s.writeRateBytesPerS > 0 &&
    s.writeRateBytesPerS <= MAX_WRITE_RATE &&
    r !== null &&
    typeof r === "object" &&
    uint(r.pfn) &&
    uint(r.pages) &&
    r.pages > 0 &&
    Array.isArray(r.blocks) &&
    s.guestAddr === r.pfn * PAGE_SIZE &&
    s.regionBytes === r.pages * PAGE_SIZE &&
    s.iova % PAGE_SIZE === 0 &&
    s.guestAddr + s.regionBytes <= memoryBytes;
  if (!ok) throw new EnvelopeError(`VM state section ${S_DMA_DEVICE} describes no DMA region inside ${memoryBytes} bytes of guest memory`);
  return s;
}
