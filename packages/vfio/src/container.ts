// VFIO type1 (v2) IOMMU container for one VM, as drivers/vfio/vfio_iommu_type1.c
// behaves with seed 004 ("[PATCH v10 Kernel 4/5] vfio iommu: Implementation of
// ioctl to for dirty pages tracking", the fourth patch of the series adding
// VFIO_IOMMU_DIRTY_PAGES). "seed L<n>" in comments is a line of that patch mail.
//
// The container holds no memory: a mapping only records iova -> guest-physical
// address (the sidecar's guest memory file offset). Pages are the IOMMU's
// minimum page (lowest bit of iova_pgsizes); pins, the dirty bitmap and
// markDirty all work in those pages.
//
// Where the seed and its thread disagree with the code of v10, the thread's
// resolution (and the form it took upstream) wins; each such place says so.

import {
  type IommuError,
  type IommuResult,
  type U64,
  U64_MAX,
  hex,
  iommuError,
  isError,
  parseU32,
  parseU64,
} from "./result";

/** VFIO_DMA_MAP_FLAG_READ: the device may read through the mapping. */
export const VFIO_DMA_MAP_FLAG_READ = 1;
/** VFIO_DMA_MAP_FLAG_WRITE: the device may write through the mapping. */
export const VFIO_DMA_MAP_FLAG_WRITE = 2;
const DMA_MAP_FLAGS_MASK = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

export const VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1;
export const VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 2;
export const VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 4;
const DIRTY_PAGES_FLAGS_MASK =
  VFIO_IOMMU_DIRTY_PAGES_FLAG_START | VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP | VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;

/** sizeof(argsz) + sizeof(flags): what START and STOP need (struct vfio_iommu_type1_dirty_bitmap). */
export const VFIO_DIRTY_BITMAP_HDR_SZ = 8;
/**
 * What GET_BITMAP needs: the header plus iova, size, pgsize, bitmap_size and the
 * bitmap pointer (struct vfio_iommu_type1_dirty_bitmap_get). 48 is also the
 * seed's minsz = offsetofend(struct vfio_iommu_type1_dirty_bitmap, bitmap), seed L331.
 */
export const VFIO_DIRTY_BITMAP_GET_SZ = 48;
/** VFIO_PIN_PAGES_MAX_ENTRIES = PAGE_SIZE / sizeof(unsigned long) (vfio.c, vfio_pin_pages). */
export const VFIO_PIN_PAGES_MAX_ENTRIES = 512;

/** 4 KiB | 2 MiB | 1 GiB, what an x86 IOMMU reports in VFIO_IOMMU_GET_INFO; the minimum page is 4 KiB. */
export const DEFAULT_IOVA_PGSIZES = 0x4020_1000;
/** Intel VT-d with 4-level tables: a 48-bit IOVA aperture. */
export const DEFAULT_IOVA_BITS = 48;
/** vfio_iommu_type1's dma_entry_limit module parameter default (U16_MAX). */
export const DEFAULT_DMA_ENTRY_LIMIT = 65535;
/** Largest bitmap one GET_BITMAP builds: 64 MiB covers 2 TiB of 4 KiB pages. */
export const DEFAULT_MAX_BITMAP_BYTES = 64 * 1024 * 1024;

/**
 * Which dirty pages a bitmap read reports.
 * - "all": the seed's GET_BITMAP: pinned pages plus pages written without a pin held now.
 * - "pinned": pages pinned now, always dirty (in an iommuMapped container every
 *   mapped page, seed L222); consumes nothing, so pre-copy rounds can skip them
 *   and the stop-and-copy read still gets them (the thread's downtime debate).
 * - "unpinned": pages unpinned while tracking (vfio_pfn.unpinned, seed L140) and
 *   pages written by device DMA through markDirty since the last read; consumed by the read.
 */
export type DirtyReport = "all" | "pinned" | "unpinned";
const DIRTY_REPORTS: readonly string[] = ["all", "pinned", "unpinned"];

export type DirtyPagesOp = "START" | "STOP" | "GET_BITMAP";

export interface IommuContainerOptions {
  /** VFIO_IOMMU_GET_INFO iova_pgsizes; its lowest bit is the page of every check and bitmap. Default 4 KiB|2 MiB|1 GiB. */
  readonly iovaPgsizes?: U64;
  /** IOVA aperture: mappings must end at or below 2^iovaBits (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE). Default 48, at most 53. */
  readonly iovaBits?: number;
  /** Guest memory size: vaddr + size of a mapping must not exceed it. Default 2^53. */
  readonly guestMemoryBytes?: number;
  /** Most mappings at once (dma_entry_limit). Default 65535. */
  readonly dmaEntryLimit?: number;
  /** Largest bitmap GET_BITMAP allocates (the seed's kmalloc, L377). Default 64 MiB. */
  readonly maxBitmapBytes?: number;
  /**
   * An IOMMU-backed (pass-through) device is in the container: every mapped page
   * is pinned and reported dirty (the seed's dma->iommu_mapped branch, L222).
   */
  readonly iommuMapped?: boolean;
}

export interface DmaMapRequest {
  readonly iova: U64;
  /** Guest-physical address backing the mapping. */
  readonly vaddr: U64;
  readonly size: U64;
  /** VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE */
  readonly flags: number;
}

export interface DmaUnmapRequest {
  readonly iova: U64;
  readonly size: U64;
}

export interface DmaMapping {
  readonly iova: number;
  readonly vaddr: number;
  readonly size: number;
  readonly flags: number;
  /** vfio_pfn entries with ref_count > 0 */
  readonly pinnedPages: number;
}

/** A run of dirty pages: iova and guest-physical address of its first byte, length in bytes. */
export interface DirtyRange {
  readonly iova: number;
  readonly gpa: number;
  readonly size: number;
}

export interface DmaUnmapOk {
  readonly unmappedBytes: number;
  /** Pinned pages unpinned on the way out (the vendor driver's answer to VFIO_IOMMU_NOTIFY_DMA_UNMAP). */
  readonly forcedUnpins: number;
  /**
   * While tracking: the unmapped pages that were dirty (pinned, unpinned while
   * tracking, or written through markDirty). The sidecar folds their gpa into
   * its device dirty log, since the iova no longer exists for GET_BITMAP.
   * Empty when not tracking.
   */
  readonly dirtyRanges: readonly DirtyRange[];
}

export interface DirtyPagesRequest {
  readonly argsz: number;
  /** START (1) | STOP (2) | GET_BITMAP (4): exactly one. */
  readonly flags: number;
  readonly iova?: U64;
  readonly size?: U64;
  readonly pgsize?: U64;
  /** Bytes the caller has room for. */
  readonly bitmapSize?: U64;
  /** GET_BITMAP only; default "all" (the seed's semantics). */
  readonly report?: DirtyReport;
}

export interface GetBitmapRequest {
  readonly iova: U64;
  readonly size: U64;
  /** Default: the IOMMU minimum page size. */
  readonly pgsize?: U64;
  /** Default: room for any bitmap. */
  readonly bitmapSize?: U64;
  readonly report?: DirtyReport;
}

export type DirtyPagesResult = IommuResult<{
  readonly op: DirtyPagesOp;
  /**
   * GET_BITMAP: bit n (byte n >> 3, bit n & 7, i.e. little-endian 64-bit words)
   * is the page at iova + n * pgsize. Length: ceil(size / pgsize / 64) * 8 bytes.
   */
  readonly bitmap?: Uint8Array;
  /** Bits set in bitmap (0 for START and STOP). */
  readonly dirty: number;
}>;

export interface IommuInfo {
  readonly iovaPgsizes: number;
  readonly pageSize: number;
  /** VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: inclusive bounds. */
  readonly iovaRanges: readonly { readonly start: number; readonly end: number }[];
  readonly dirtyTracking: boolean;
  /** vfio_pfn entries with ref_count > 0. */
  readonly pinnedPages: number;
  /** vfio_pfn entries unpinned while tracking, waiting for the next bitmap read or STOP. */
  readonly unpinnedTracked: number;
  readonly mappings: number;
  /** dma_avail */
  readonly dmaAvail: number;
}

/** struct vfio_pfn (seed L49-L54): a pinned page of a mapping. */
interface VfioPfn {
  refCount: number;
  /** Unpinned while tracking: kept so the next bitmap read reports it (seed L53, L140). */
  unpinned: boolean;
}

/** struct vfio_dma: one DMA_MAP. Page numbers are iova / pageSize. */
class VfioDma {
  /** Keyed by iova page number; the kernel's rb-tree dma->pfn_list. */
  readonly pfnList = new Map<number, VfioPfn>();
  /** Pages written by device DMA (markDirty) since the last consuming read, while tracking. */
  readonly dmaWritten = new Set<number>();
  constructor(
    readonly iovaPfn: number,
    readonly npages: number,
    readonly gpaPfn: number,
    readonly flags: number,
  ) {}
  get endPfn(): number {
    return this.iovaPfn + this.npages;
  }
}

function lowestSetBit(v: bigint): number {
  let n = 0;
  while (((v >> BigInt(n)) & 1n) === 0n) n++;
  return n;
}

/** Bytes of a GET_BITMAP bitmap for `npages` pages: verify_bitmap_size's ALIGN(npages, BITS_PER_LONG) / 8 (seed L306). */
export function dirtyBitmapBytes(npages: number): number {
  return Math.ceil(npages / 64) * 8;
}

/** Whether bit n of a dirty bitmap is set. */
export function testBit(bitmap: Uint8Array, n: number): boolean {
  return ((bitmap[n >>> 3] ?? 0) >>> (n & 7)) & 1 ? true : false;
}

/** Sets bit n; true when it was clear. */
function setBit(bitmap: Uint8Array, n: number): boolean {
  const byte = n >>> 3;
  const mask = 1 << (n & 7);
  const old = bitmap[byte] ?? 0;
  if (old & mask) return false;
  bitmap[byte] = old | mask;
  return true;
}

function optionInt(name: string, v: number | undefined, dflt: number, min: number, max: number): number {
  if (v === undefined) return dflt;
  if (!Number.isSafeInteger(v) || v < min || v > max) {
    throw new RangeError(`IommuContainer: ${name} ${String(v)} must be an integer in ${min}..${max}`);
  }
  return v;
}

export class IommuContainer {
  readonly iovaPgsizes: number;
  /** The IOMMU minimum page size: lowest set bit of iovaPgsizes. */
  readonly pageSize: number;
  readonly pageShift: number;
  readonly iovaBits: number;
  readonly guestMemoryBytes: number;
  readonly dmaEntryLimit: number;
  readonly maxBitmapBytes: number;
  readonly iommuMapped: boolean;

  private readonly pageSizeBig: bigint;
  private readonly pageMask: bigint;
  private readonly shiftBig: bigint;
  private readonly aperture: bigint;
  private readonly apertureNum: number;
  /** Mappings sorted by iova, never overlapping: the kernel's iommu->dma_list rb-tree. */
  private readonly dmaList: VfioDma[] = [];
  /** iommu->dirty_page_tracking (seed L45). */
  private tracking = false;
  private pinned = 0;
  private unpinnedTracked = 0;

  constructor(opts: IommuContainerOptions = {}) {
    const pgsizes = opts.iovaPgsizes ?? DEFAULT_IOVA_PGSIZES;
    const pgsizesBig = typeof pgsizes === "bigint" ? pgsizes : Number.isSafeInteger(pgsizes) ? BigInt(pgsizes) : -1n;
    if (pgsizesBig <= 0n || pgsizesBig > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new RangeError(`IommuContainer: iovaPgsizes ${String(pgsizes)} must be a non-zero bitmap of page sizes below 2^53`);
    }
    const shift = lowestSetBit(pgsizesBig);
    if (shift < 12 || shift > 30) {
      throw new RangeError(
        `IommuContainer: iovaPgsizes ${hex(pgsizesBig)} has minimum page 2^${shift}; it must be 4 KiB (2^12) .. 1 GiB (2^30)`,
      );
    }
    this.iovaPgsizes = Number(pgsizesBig);
    this.pageShift = shift;
    this.pageSize = 2 ** shift;
    this.pageSizeBig = 1n << BigInt(shift);
    this.pageMask = this.pageSizeBig - 1n;
    this.shiftBig = BigInt(shift);
    // 53 bits keeps every mapped iova, page number and byte count an exact number.
    this.iovaBits = optionInt("iovaBits", opts.iovaBits, DEFAULT_IOVA_BITS, shift + 1, 53);
    this.aperture = 1n << BigInt(this.iovaBits);
    this.apertureNum = 2 ** this.iovaBits;
    this.guestMemoryBytes = optionInt("guestMemoryBytes", opts.guestMemoryBytes, 2 ** 53, 0, 2 ** 53);
    this.dmaEntryLimit = optionInt("dmaEntryLimit", opts.dmaEntryLimit, DEFAULT_DMA_ENTRY_LIMIT, 1, 2 ** 31);
    this.maxBitmapBytes = optionInt("maxBitmapBytes", opts.maxBitmapBytes, DEFAULT_MAX_BITMAP_BYTES, 8, 2 ** 31);
    this.iommuMapped = opts.iommuMapped ?? false;
  }

  get dirtyTracking(): boolean {
    return this.tracking;
  }

  /** VFIO_IOMMU_GET_INFO plus the container's counters (IommuInfoResponse). */
  info(): IommuInfo {
    return {
      iovaPgsizes: this.iovaPgsizes,
      pageSize: this.pageSize,
      iovaRanges: [{ start: 0, end: this.apertureNum - 1 }],
      dirtyTracking: this.tracking,
      pinnedPages: this.pinned,
      unpinnedTracked: this.unpinnedTracked,
      mappings: this.dmaList.length,
      dmaAvail: this.dmaEntryLimit - this.dmaList.length,
    };
  }

  mappings(): DmaMapping[] {
    return this.dmaList.map((d) => this.describe(d));
  }

  /** VFIO_IOMMU_MAP_DMA: vfio_iommu_type1_ioctl + vfio_dma_do_map. */
  mapDma(req: DmaMapRequest): IommuResult<{ readonly mapping: DmaMapping }> {
    const op = "DMA_MAP";
    const flags = parseU32(op, "flags", req.flags);
    if (isError(flags)) return flags;
    // vfio_iommu_type1_ioctl VFIO_IOMMU_MAP_DMA: map.flags & ~mask -> -EINVAL.
    if (flags & ~DMA_MAP_FLAGS_MASK) {
      return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: flags ${hex(flags)} has bits outside READ (0x1) | WRITE (0x2)`);
    }
    // vfio_dma_do_map: !prot -> -EINVAL.
    if ((flags & DMA_MAP_FLAGS_MASK) === 0) {
      return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: flags 0x0 grants the device neither READ (0x1) nor WRITE (0x2)`);
    }
    const iova = parseU64(op, "iova", req.iova);
    if (isError(iova)) return iova;
    const vaddr = parseU64(op, "vaddr", req.vaddr);
    if (isError(vaddr)) return vaddr;
    const size = parseU64(op, "size", req.size);
    if (isError(size)) return size;
    // vfio_dma_do_map: !size || (size | iova | vaddr) & mask -> -EINVAL.
    if (size === 0n) return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: size 0 maps nothing; it must be a non-zero multiple of ${this.pageSize}`);
    for (const [field, v] of [["iova", iova], ["vaddr", vaddr], ["size", size]] as const) {
      if (v & this.pageMask) return this.misaligned(op, field, v);
    }
    // vfio_dma_do_map: iova + size - 1 < iova || vaddr + size - 1 < vaddr -> -EINVAL (no wrap).
    if (iova + size - 1n > U64_MAX) return this.wraps(op, "iova", iova, size);
    if (vaddr + size - 1n > U64_MAX) return this.wraps(op, "vaddr", vaddr, size);
    // vfio_dma_do_map: !vfio_iommu_iova_dma_valid() -> -EINVAL (outside the IOMMU's IOVA ranges).
    if (iova + size > this.aperture) {
      return iommuError(
        "OUT_OF_RANGE",
        "EINVAL",
        `${op}: iova range [${hex(iova)}, ${hex(iova + size)}) ends beyond the IOMMU aperture [0x0, ${hex(this.aperture)}) (iova_ranges of VFIO_IOMMU_GET_INFO)`,
      );
    }
    // vaddr_get_pfn fails on an address the process has not mapped (-EFAULT); here that is past guest memory.
    if (vaddr + size > BigInt(this.guestMemoryBytes)) {
      return iommuError(
        "OUT_OF_RANGE",
        "EFAULT",
        `${op}: vaddr range [${hex(vaddr)}, ${hex(vaddr + size)}) ends beyond guest memory of ${this.guestMemoryBytes} bytes`,
      );
    }
    const iovaPfn = Number(iova >> this.shiftBig);
    const npages = Number(size >> this.shiftBig);
    // vfio_dma_do_map: vfio_find_dma(iommu, iova, size) -> -EEXIST.
    const idx = this.firstEndingAfter(iovaPfn);
    const next = this.dmaList[idx];
    if (next && next.iovaPfn < iovaPfn + npages) {
      return iommuError(
        "ALREADY_EXISTS",
        "EEXIST",
        `${op}: iova range [${hex(iova)}, ${hex(iova + size)}) overlaps the existing mapping [${hex(next.iovaPfn * this.pageSize)}, ${hex(next.endPfn * this.pageSize)}); unmap it first`,
      );
    }
    // vfio_dma_do_map: !iommu->dma_avail -> -ENOSPC.
    if (this.dmaList.length >= this.dmaEntryLimit) {
      return iommuError("RESOURCE_EXHAUSTED", "ENOSPC", `${op}: the container already holds ${this.dmaList.length} mappings, the dma_entry_limit`);
    }
    const dma = new VfioDma(iovaPfn, npages, Number(vaddr >> this.shiftBig), flags);
    this.dmaList.splice(idx, 0, dma);
    return { ok: true, mapping: this.describe(dma) };
  }

  /**
   * VFIO_IOMMU_UNMAP_DMA: vfio_dma_do_unmap (type1 v2). Removes every mapping
   * inside [iova, iova + size); a range that would split a mapping fails.
   * Pinned pages are unpinned first, as the vendor driver does when notified.
   * While tracking, the dirty pages of the removed mappings come back in
   * dirtyRanges: the seed's vfio_iova_dirty_bitmap takes a start_iova "called
   * from DMA_UNMAP" (L208-L209) so that an unmap reports the range's dirty pages
   * before they vanish, instead of losing them.
   */
  unmapDma(req: DmaUnmapRequest): IommuResult<DmaUnmapOk> {
    const op = "DMA_UNMAP";
    const iova = parseU64(op, "iova", req.iova);
    if (isError(iova)) return iova;
    const size = parseU64(op, "size", req.size);
    if (isError(size)) return size;
    // vfio_dma_do_unmap: unmap->iova & mask -> -EINVAL.
    if (iova & this.pageMask) return this.misaligned(op, "iova", iova);
    // vfio_dma_do_unmap: !unmap->size || unmap->size & mask -> -EINVAL.
    if (size === 0n) return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: size 0 unmaps nothing; it must be a non-zero multiple of ${this.pageSize}`);
    if (size & this.pageMask) return this.misaligned(op, "size", size);
    // vfio_dma_do_unmap: unmap->iova + unmap->size - 1 < unmap->iova -> -EINVAL.
    if (iova + size - 1n > U64_MAX) return this.wraps(op, "iova", iova, size);
    if (iova >= this.aperture) return { ok: true, unmappedBytes: 0, forcedUnpins: 0, dirtyRanges: [] };
    const end = iova + size < this.aperture ? iova + size : this.aperture;
    const startPfn = Number(iova >> this.shiftBig);
    const endPfn = Number(end >> this.shiftBig);
    // vfio_dma_do_unmap, iommu->v2: "we do not allow unmaps that bisect mappings".
    const first = this.findDma(startPfn);
    if (first && first.iovaPfn !== startPfn) return this.bisects(op, iova, size, first);
    const last = this.findDma(endPfn - 1);
    if (last && last.endPfn !== endPfn) return this.bisects(op, iova, size, last);

    const idx = this.firstEndingAfter(startPfn);
    let n = 0;
    while (idx + n < this.dmaList.length && (this.dmaList[idx + n] as VfioDma).iovaPfn < endPfn) n++;
    const removed = this.dmaList.splice(idx, n);
    let unmappedBytes = 0;
    let forcedUnpins = 0;
    const dirtyRanges: DirtyRange[] = [];
    for (const dma of removed) {
      unmappedBytes += dma.npages * this.pageSize;
      if (this.tracking) this.collectDirtyRanges(dma, dirtyRanges);
      for (const vpfn of dma.pfnList.values()) {
        if (vpfn.unpinned) this.unpinnedTracked--;
        else {
          this.pinned--;
          forcedUnpins++;
        }
      }
    }
    return { ok: true, unmappedBytes, forcedUnpins, dirtyRanges };
  }

  /** iova -> guest-physical address; with `prot`, also checks the mapping grants it. */
  translate(iova: U64, prot = 0): IommuResult<{ readonly gpa: number; readonly flags: number }> {
    const op = "TRANSLATE";
    const v = parseU64(op, "iova", iova);
    if (isError(v)) return v;
    if (v >= this.aperture) return this.unmapped(op, v);
    const pfn = Number(v >> this.shiftBig);
    const dma = this.findDma(pfn);
    if (!dma) return this.unmapped(op, v);
    if ((dma.flags & prot) !== prot) return this.denied(op, v, dma, prot);
    const gpa = dma.gpaPfn * this.pageSize + (Number(v) - dma.iovaPfn * this.pageSize);
    return { ok: true, gpa, flags: dma.flags };
  }

  /**
   * vfio_iommu_type1_pin_pages: pin pages by iova (each aligned to pageSize).
   * All or nothing, as its pin_unwind. A page already pinned gains a
   * reference (vfio_iova_get_vfio_pfn); one unpinned while tracking is pinned
   * anew (the thread's fix, seed L115-L127). Returns guest page frame numbers
   * (guest-physical address / pageSize).
   */
  pinPages(iovas: readonly U64[], prot = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE): IommuResult<{ readonly guestPfns: number[] }> {
    const op = "PIN_PAGES";
    const p = parseU32(op, "prot", prot);
    if (isError(p)) return p;
    if (p === 0 || p & ~DMA_MAP_FLAGS_MASK) {
      return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: prot ${hex(p)} must be READ (0x1), WRITE (0x2) or both`);
    }
    const resolved = this.resolvePages(op, iovas);
    if (isError(resolved)) return resolved;
    const [pfns, dmas] = resolved;
    // vfio_iommu_type1_pin_pages: (dma->prot & prot) != prot -> -EPERM.
    for (let i = 0; i < pfns.length; i++) {
      const dma = dmas[i] as VfioDma;
      if ((dma.flags & p) !== p) return this.denied(op, BigInt(pfns[i] as number) << this.shiftBig, dma, p);
    }
    const guestPfns = new Array<number>(pfns.length);
    for (let i = 0; i < pfns.length; i++) {
      const pfn = pfns[i] as number;
      const dma = dmas[i] as VfioDma;
      const vpfn = dma.pfnList.get(pfn);
      if (vpfn && !vpfn.unpinned) {
        vpfn.refCount++;
      } else if (vpfn) {
        // The seed frees and re-adds the vfio_pfn; keep the fact that it was
        // written since the last read so an "unpinned" report still has it.
        dma.dmaWritten.add(pfn);
        vpfn.unpinned = false;
        vpfn.refCount = 1;
        this.unpinnedTracked--;
        this.pinned++;
      } else {
        dma.pfnList.set(pfn, { refCount: 1, unpinned: false });
        this.pinned++;
      }
      guestPfns[i] = dma.gpaPfn + (pfn - dma.iovaPfn);
    }
    return { ok: true, guestPfns };
  }

  /**
   * vfio_iommu_type1_unpin_pages. An iova not pinned (or already unpinned
   * while tracking, seed L167) is skipped and counted in notPinned. When the
   * last reference goes while tracking, the page stays listed as unpinned so
   * the next bitmap read reports it (seed L139-L142); otherwise it is dropped.
   * Unlike the kernel, which stops at the first unmapped iova, nothing changes
   * unless every iova is valid.
   */
  unpinPages(iovas: readonly U64[]): IommuResult<{ readonly unpinned: number; readonly notPinned: number }> {
    const op = "UNPIN_PAGES";
    const resolved = this.resolvePages(op, iovas);
    if (isError(resolved)) return resolved;
    const [pfns, dmas] = resolved;
    let unpinned = 0;
    let notPinned = 0;
    for (let i = 0; i < pfns.length; i++) {
      const pfn = pfns[i] as number;
      const dma = dmas[i] as VfioDma;
      const vpfn = dma.pfnList.get(pfn);
      // vfio_unpin_page_external: !vpfn -> 0; vpfn->unpinned -> 0 (seed L164-L168).
      if (!vpfn || vpfn.unpinned) {
        notPinned++;
        continue;
      }
      unpinned++;
      // vfio_iova_put_vfio_pfn: atomic_dec_and_test(&vpfn->ref_count) (seed L100).
      if (--vpfn.refCount > 0) continue;
      this.pinned--;
      if (this.tracking) {
        vpfn.unpinned = true; // seed L139-L140
        this.unpinnedTracked++;
      } else {
        dma.pfnList.delete(pfn); // seed L142
      }
    }
    return { ok: true, unpinned, notPinned };
  }

  /**
   * A device DMA write through the IOMMU to [iova, iova + len): every page it
   * touches must be mapped with WRITE (else the IOMMU faults: NOT_FOUND or
   * PERMISSION_DENIED, nothing marked). While tracking, the pages are logged
   * until the next consuming bitmap read; `pages` is how many were logged.
   */
  markDirty(iova: U64, len: U64): IommuResult<{ readonly pages: number }> {
    const op = "DMA_WRITE";
    let start: number;
    let length: number;
    if (
      typeof iova === "number" &&
      typeof len === "number" &&
      Number.isSafeInteger(iova) &&
      Number.isSafeInteger(len) &&
      iova >= 0 &&
      len > 0 &&
      len <= this.apertureNum &&
      iova <= this.apertureNum - len
    ) {
      start = iova; // fast path: no bigint for the common in-aperture write
      length = len;
    } else {
      const a = parseU64(op, "iova", iova);
      if (isError(a)) return a;
      const l = parseU64(op, "len", len);
      if (isError(l)) return l;
      if (l === 0n) return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: len 0 writes nothing; it must be at least 1 byte`);
      if (a + l > this.aperture) return this.unmapped(op, a >= this.aperture ? a : this.aperture);
      start = Number(a);
      length = Number(l);
    }
    const startPfn = Math.floor(start / this.pageSize);
    const endPfn = Math.ceil((start + length) / this.pageSize);
    const idx = this.firstEndingAfter(startPfn);
    let cursor = startPfn;
    for (let i = idx; cursor < endPfn; i++) {
      const dma = this.dmaList[i];
      if (!dma || dma.iovaPfn > cursor) return this.unmapped(op, BigInt(Math.max(cursor * this.pageSize, start)));
      if ((dma.flags & VFIO_DMA_MAP_FLAG_WRITE) === 0) {
        return this.denied(op, BigInt(Math.max(cursor * this.pageSize, start)), dma, VFIO_DMA_MAP_FLAG_WRITE);
      }
      cursor = dma.endPfn;
    }
    if (!this.tracking) return { ok: true, pages: 0 };
    cursor = startPfn;
    for (let i = idx; cursor < endPfn; i++) {
      const dma = this.dmaList[i] as VfioDma;
      const hi = Math.min(dma.endPfn, endPfn);
      for (; cursor < hi; cursor++) dma.dmaWritten.add(cursor);
    }
    return { ok: true, pages: endPfn - startPfn };
  }

  /** VFIO_IOMMU_DIRTY_PAGES with FLAG_START. */
  startDirtyTracking(): DirtyPagesResult {
    return this.dirtyPages({ argsz: VFIO_DIRTY_BITMAP_HDR_SZ, flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_START });
  }

  /** VFIO_IOMMU_DIRTY_PAGES with FLAG_STOP. */
  stopDirtyTracking(): DirtyPagesResult {
    return this.dirtyPages({ argsz: VFIO_DIRTY_BITMAP_HDR_SZ, flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP });
  }

  /** VFIO_IOMMU_DIRTY_PAGES with FLAG_GET_BITMAP, argsz and (by default) pgsize and bitmap_size filled in. */
  getBitmap(req: GetBitmapRequest): DirtyPagesResult {
    return this.dirtyPages({
      argsz: VFIO_DIRTY_BITMAP_GET_SZ,
      flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
      iova: req.iova,
      size: req.size,
      pgsize: req.pgsize ?? this.pageSize,
      bitmapSize: req.bitmapSize ?? U64_MAX,
      report: req.report,
    });
  }

  /** VFIO_IOMMU_DIRTY_PAGES: the seed's branch of vfio_iommu_type1_ioctl (L321-L480), without its bugs. */
  dirtyPages(req: DirtyPagesRequest): DirtyPagesResult {
    const op = "DIRTY_PAGES";
    const argsz = parseU32(op, "argsz", req.argsz);
    if (isError(argsz)) return argsz;
    const flags = parseU32(op, "flags", req.flags);
    if (isError(flags)) return flags;
    // seed L337: range.argsz < minsz -> -EINVAL. START and STOP carry only the header.
    if (argsz < VFIO_DIRTY_BITMAP_HDR_SZ) {
      return iommuError(
        "INVALID_ARGUMENT",
        "EINVAL",
        `${op}: argsz ${argsz} is smaller than the ${VFIO_DIRTY_BITMAP_HDR_SZ}-byte struct vfio_iommu_type1_dirty_bitmap header (argsz, flags)`,
      );
    }
    // seed L337: range.flags & ~mask -> -EINVAL.
    if (flags & ~DIRTY_PAGES_FLAGS_MASK) {
      return iommuError(
        "INVALID_ARGUMENT",
        "EINVAL",
        `${op}: flags ${hex(flags)} has bits outside START (0x1) | STOP (0x2) | GET_BITMAP (0x4)`,
      );
    }
    // seed L340-L352 is an else-if chain that silently runs START for START|STOP
    // and falls through to -ENOTTY (L482) for none; exactly one is required.
    if (flags === 0 || (flags & (flags - 1)) !== 0) {
      return iommuError(
        "INVALID_ARGUMENT",
        "EINVAL",
        `${op}: flags ${hex(flags)} selects ${flags === 0 ? "no operation" : "more than one operation"}; set exactly one of START (0x1), STOP (0x2), GET_BITMAP (0x4)`,
      );
    }
    if (flags === VFIO_IOMMU_DIRTY_PAGES_FLAG_START) {
      // seed L340-L342. Pages unpinned before START are not dirty (seed L143-L147).
      this.tracking = true;
      return { ok: true, op: "START", dirty: 0 };
    }
    if (flags === VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP) {
      // seed L343-L348: tracking off, vfio_remove_unpinned_from_dma_list; the DMA-write log goes too.
      this.tracking = false;
      for (const dma of this.dmaList) {
        for (const [pfn, vpfn] of dma.pfnList) if (vpfn.unpinned) dma.pfnList.delete(pfn);
        dma.dmaWritten.clear();
      }
      this.unpinnedTracked = 0;
      return { ok: true, op: "STOP", dirty: 0 };
    }
    return this.getBitmapChecked(op, argsz, req);
  }

  private getBitmapChecked(op: string, argsz: number, req: DirtyPagesRequest): DirtyPagesResult {
    // seed L331-L337: minsz = offsetofend(..., bitmap), 48 bytes for the range fields.
    if (argsz < VFIO_DIRTY_BITMAP_GET_SZ) {
      return iommuError(
        "INVALID_ARGUMENT",
        "EINVAL",
        `${op}: argsz ${argsz} is too small for GET_BITMAP; it needs ${VFIO_DIRTY_BITMAP_GET_SZ} bytes (header, iova, size, pgsize, bitmap_size, bitmap)`,
      );
    }
    const report = req.report ?? "all";
    if (!DIRTY_REPORTS.includes(report)) {
      return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: report "${String(report)}" must be "all", "pinned" or "unpinned"`);
    }
    const iova = parseU64(op, "iova", req.iova ?? 0);
    if (isError(iova)) return iova;
    const size = parseU64(op, "size", req.size ?? 0);
    if (isError(size)) return size;
    const pgsize = parseU64(op, "pgsize", req.pgsize ?? 0);
    if (isError(pgsize)) return pgsize;
    const bitmapSize = parseU64(op, "bitmap_size", req.bitmapSize ?? 0);
    if (isError(bitmapSize)) return bitmapSize;
    // seed L358-L363 lets any pgsize whose pgsize - 1 fits in iommu_pgmask
    // through (2048, even 3); upstream kept only the smallest supported page,
    // which is the unit every vfio_pfn and bitmap bit here is counted in.
    if (pgsize !== this.pageSizeBig) {
      return iommuError(
        "INVALID_ARGUMENT",
        "EINVAL",
        `${op}: pgsize ${pgsize} must equal the IOMMU minimum page size ${this.pageSize} (lowest bit of iova_pgsizes ${hex(this.iovaPgsizes)})`,
      );
    }
    // seed L365: range.iova & iommu_pgmask -> -EINVAL.
    if (iova & this.pageMask) return this.misaligned(op, "iova", iova);
    // seed L367: !range.size || range.size > SIZE_MAX -> -EINVAL (SIZE_MAX = 2^64-1 holds any uint64).
    if (size === 0n) return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: size 0 covers no page; it must be a non-zero multiple of ${this.pageSize}`);
    // seed L369: range.iova + range.size < range.iova (64-bit wrap) -> -EINVAL.
    if (iova + size > U64_MAX) {
      return iommuError(
        "INVALID_ARGUMENT",
        "EINVAL",
        `${op}: iova ${hex(iova)} + size ${hex(size)} overflows 64 bits (must not exceed 0xffffffffffffffff)`,
      );
    }
    // Not in the seed, which shifts size right (L372) and so gives the partial
    // last page no bit in verify_bitmap_size yet sets one in the walk (a heap
    // overflow); upstream added the same check.
    if (size & this.pageMask) return this.misaligned(op, "size", size);
    const npages = size >> this.shiftBig;
    // verify_bitmap_size (seed L299-L311): ALIGN(npages, BITS_PER_LONG) / 8 bytes.
    const bsize = ((npages + 63n) / 64n) * 8n;
    // seed L303: !bitmap_size -> -EINVAL.
    if (bitmapSize === 0n) {
      return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: bitmap_size 0 has no room; ${npages} pages need ${bsize} bytes (64-bit words)`);
    }
    // seed L308: bitmap_size < bsize -> -EINVAL.
    if (bitmapSize < bsize) {
      return iommuError(
        "INVALID_ARGUMENT",
        "EINVAL",
        `${op}: bitmap_size ${bitmapSize} is too small: ${npages} pages of ${this.pageSize} bytes need ${bsize} bytes (one bit per page, rounded up to 64-bit words)`,
      );
    }
    // seed L374 returns the uninitialised `ret` whenever bsize != 0, i.e. for
    // every valid size; here a valid size goes on to build the bitmap.
    // seed L377: kmalloc(bsize) -> -ENOMEM.
    if (bsize > BigInt(this.maxBitmapBytes)) {
      return iommuError(
        "RESOURCE_EXHAUSTED",
        "ENOMEM",
        `${op}: size ${size} needs a ${bsize}-byte bitmap, more than the ${this.maxBitmapBytes}-byte limit; ask for a smaller range`,
      );
    }
    // Upstream answers -EINVAL when tracking is off. The seed instead turns
    // tracking off on every read (L386), which the thread rejected: reads
    // repeat across pre-copy rounds, so here a read leaves tracking on.
    if (!this.tracking) {
      return iommuError("FAILED_PRECONDITION", "EINVAL", `${op}: GET_BITMAP needs dirty tracking; send START (flags 0x1) first`);
    }
    // The seed's walk (L220) stops at the first unmapped page and returns a
    // short bitmap as if the rest were clean; the range must be mapped throughout.
    if (iova + size > this.aperture) return this.unmapped(op, iova >= this.aperture ? iova : this.aperture);
    const startPfn = Number(iova >> this.shiftBig);
    const endPfn = startPfn + Number(npages);
    const gap = this.firstGap(startPfn, endPfn);
    if (gap >= 0) return this.unmapped(op, BigInt(gap) << this.shiftBig, ` (GET_BITMAP range [${hex(iova)}, ${hex(iova + size)}) must be fully mapped)`);
    const bitmap = new Uint8Array(Number(bsize));
    const dirty = this.fillBitmap(bitmap, startPfn, endPfn, report);
    return { ok: true, op: "GET_BITMAP", bitmap, dirty };
  }

  /**
   * vfio_iova_dirty_bitmap (seed L213-L297) over a fully mapped range. Pinned
   * pages are set on every read; unpinned and DMA-written pages are set and
   * then forgotten, but only inside the range: the seed's
   * vfio_remove_unpinned_from_pfn_list (L295) empties the whole vfio_dma and
   * so loses pages of it outside the range.
   */
  private fillBitmap(bitmap: Uint8Array, startPfn: number, endPfn: number, report: DirtyReport): number {
    const wantPinned = report !== "unpinned";
    const wantUnpinned = report !== "pinned";
    let dirty = 0;
    for (let i = this.firstEndingAfter(startPfn); i < this.dmaList.length; i++) {
      const dma = this.dmaList[i] as VfioDma;
      if (dma.iovaPfn >= endPfn) break;
      const lo = Math.max(dma.iovaPfn, startPfn);
      const hi = Math.min(dma.endPfn, endPfn);
      if (wantPinned && this.iommuMapped) {
        // seed L222-L240: an IOMMU-backed device may DMA anywhere, so every page is dirty.
        for (let pfn = lo; pfn < hi; pfn++) if (setBit(bitmap, pfn - startPfn)) dirty++;
      }
      for (const [pfn, vpfn] of dma.pfnList) {
        if (pfn < lo || pfn >= hi) continue;
        if (vpfn.unpinned ? wantUnpinned : wantPinned) {
          if (setBit(bitmap, pfn - startPfn)) dirty++;
        }
        if (vpfn.unpinned && wantUnpinned) {
          dma.pfnList.delete(pfn); // reported once, then gone (seed L295)
          this.unpinnedTracked--;
        }
      }
      if (wantUnpinned) {
        for (const pfn of dma.dmaWritten) {
          if (pfn < lo || pfn >= hi) continue;
          if (setBit(bitmap, pfn - startPfn)) dirty++;
          dma.dmaWritten.delete(pfn);
        }
      }
    }
    return dirty;
  }

  private collectDirtyRanges(dma: VfioDma, out: DirtyRange[]): void {
    let pages: number[];
    if (this.iommuMapped) {
      pages = [];
      for (let p = dma.iovaPfn; p < dma.endPfn; p++) pages.push(p);
    } else {
      const set = new Set<number>(dma.pfnList.keys());
      for (const p of dma.dmaWritten) set.add(p);
      pages = [...set].sort((a, b) => a - b);
    }
    let runStart = -1;
    let prev = -2;
    const flush = (): void => {
      if (runStart < 0) return;
      out.push({
        iova: runStart * this.pageSize,
        gpa: (dma.gpaPfn + runStart - dma.iovaPfn) * this.pageSize,
        size: (prev + 1 - runStart) * this.pageSize,
      });
    };
    for (const p of pages) {
      if (p !== prev + 1) {
        flush();
        runStart = p;
      }
      prev = p;
    }
    flush();
  }

  /** Parses, aligns and resolves the iovas of PIN_PAGES / UNPIN_PAGES; nothing changes on error. */
  private resolvePages(op: string, iovas: readonly U64[]): [number[], VfioDma[]] | IommuError {
    // vfio_pin_pages / vfio_unpin_pages: !npage -> -EINVAL; npage > VFIO_PIN_PAGES_MAX_ENTRIES -> -E2BIG.
    if (!Array.isArray(iovas) || iovas.length === 0) {
      return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: iovas is empty; give 1..${VFIO_PIN_PAGES_MAX_ENTRIES} page-aligned iovas`);
    }
    if (iovas.length > VFIO_PIN_PAGES_MAX_ENTRIES) {
      return iommuError(
        "INVALID_ARGUMENT",
        "E2BIG",
        `${op}: ${iovas.length} iovas exceed VFIO_PIN_PAGES_MAX_ENTRIES (${VFIO_PIN_PAGES_MAX_ENTRIES}) per call`,
      );
    }
    const pfns = new Array<number>(iovas.length);
    const dmas = new Array<VfioDma>(iovas.length);
    for (let i = 0; i < iovas.length; i++) {
      const v = parseU64(op, `iovas[${i}]`, iovas[i] as U64);
      if (isError(v)) return v;
      // The kernel takes page frame numbers (user_pfn << PAGE_SHIFT), so an iova is always aligned.
      if (v & this.pageMask) return this.misaligned(op, `iovas[${i}]`, v);
      // vfio_iommu_type1_pin_pages / _unpin_pages: vfio_find_dma(iommu, iova, PAGE_SIZE) == NULL -> -EINVAL.
      const pfn = v < this.aperture ? Number(v >> this.shiftBig) : -1;
      const dma = pfn >= 0 ? this.findDma(pfn) : undefined;
      if (!dma) return this.unmapped(op, v, ` (iovas[${i}])`);
      pfns[i] = pfn;
      dmas[i] = dma;
    }
    return [pfns, dmas];
  }

  /** Index of the first mapping that ends after page `pfn` (binary search of the sorted dma list). */
  private firstEndingAfter(pfn: number): number {
    let lo = 0;
    let hi = this.dmaList.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.dmaList[mid] as VfioDma).endPfn <= pfn) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** vfio_find_dma for one page. */
  private findDma(pfn: number): VfioDma | undefined {
    const dma = this.dmaList[this.firstEndingAfter(pfn)];
    return dma && dma.iovaPfn <= pfn ? dma : undefined;
  }

  /** First page of [startPfn, endPfn) no mapping covers, or -1. */
  private firstGap(startPfn: number, endPfn: number): number {
    let cursor = startPfn;
    for (let i = this.firstEndingAfter(startPfn); cursor < endPfn; i++) {
      const dma = this.dmaList[i];
      if (!dma || dma.iovaPfn > cursor) return cursor;
      cursor = dma.endPfn;
    }
    return -1;
  }

  private describe(d: VfioDma): DmaMapping {
    let pinnedPages = 0;
    for (const v of d.pfnList.values()) if (!v.unpinned) pinnedPages++;
    return { iova: d.iovaPfn * this.pageSize, vaddr: d.gpaPfn * this.pageSize, size: d.npages * this.pageSize, flags: d.flags, pinnedPages };
  }

  private misaligned(op: string, field: string, v: bigint): IommuError {
    return iommuError(
      "INVALID_ARGUMENT",
      "EINVAL",
      `${op}: ${field} ${hex(v)} is not a multiple of the IOMMU minimum page size ${this.pageSize} (${hex(this.pageSize)})`,
    );
  }

  private wraps(op: string, field: string, base: bigint, size: bigint): IommuError {
    return iommuError(
      "INVALID_ARGUMENT",
      "EINVAL",
      `${op}: ${field} ${hex(base)} + size ${hex(size)} wraps past 2^64; the range must end at or below 2^64`,
    );
  }

  private bisects(op: string, iova: bigint, size: bigint, dma: VfioDma): IommuError {
    return iommuError(
      "INVALID_ARGUMENT",
      "EINVAL",
      `${op}: range [${hex(iova)}, ${hex(iova + size)}) would split the mapping [${hex(dma.iovaPfn * this.pageSize)}, ${hex(dma.endPfn * this.pageSize)}); type1 v2 unmaps whole mappings only`,
    );
  }

  private unmapped(op: string, iova: bigint, what = ""): IommuError {
    return iommuError("NOT_FOUND", "EINVAL", `${op}: iova ${hex(iova)} is not mapped${what}; DMA_MAP it first`);
  }

  private denied(op: string, iova: bigint, dma: VfioDma, prot: number): IommuError {
    const names = (f: number): string => [f & 1 ? "READ" : "", f & 2 ? "WRITE" : ""].filter(Boolean).join("|") || "none";
    return iommuError(
      "PERMISSION_DENIED",
      "EPERM",
      `${op}: iova ${hex(iova)} is mapped ${names(dma.flags)} but ${names(prot)} is needed (mapping [${hex(dma.iovaPfn * this.pageSize)}, ${hex(dma.endPfn * this.pageSize)}))`,
    );
  }
}
