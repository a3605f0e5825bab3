// Guest page allocator: a binary buddy allocator over the guest's 4 KiB page
// frames, as Linux's mm/page_alloc.c keeps it (per-order free lists, buddy =
// pfn ^ (1 << order), merge on free). All metadata lives in typed arrays over one
// caller-supplied buffer so that it can sit in guest memory, like struct page and
// the zone free lists do in a real guest.

export const PAGE_SHIFT = 12;
export const PAGE_SIZE = 1 << PAGE_SHIFT;
/** Orders 0..MAX_ORDER-1, as Linux before 6.4 (MAX_ORDER 11: blocks up to 4 MiB). */
export const MAX_ORDER = 11;

// Per-page state byte. A free block's head holds its order (0..MAX_ORDER-1).
const TAIL = 0xff; // inside a block, not its head
const RESERVED = 0xfe; // never handed out (boot-time / kernel pages)
const ALLOCATED = 0x80; // head of an allocated block: ALLOCATED | order

export class BuddyError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BuddyError";
  }
}

export interface BuddyStats {
  totalPages: number;
  freePages: number;
  /** Free blocks per order, index = order. */
  freeBlocks: number[];
}

export interface BuddyAllocatorOptions {
  /** Pages [0, reservedPages) are never free (the guest kernel's own memory). */
  reservedPages?: number;
  /** Where the metadata lives (e.g. guest memory); byteOffset must be 4-aligned. */
  metadata?: { buffer: ArrayBufferLike; byteOffset: number };
  /** Attach to metadata already initialised (e.g. guest memory after migration). */
  attach?: boolean;
}

export class BuddyAllocator {
  readonly totalPages: number;
  private readonly next: Int32Array;
  private readonly prev: Int32Array;
  private readonly heads: Int32Array;
  private readonly counts: Int32Array;
  private readonly state: Uint8Array;

  /** Bytes of metadata for `pages` page frames: 9 per page plus the list heads. */
  static metadataBytes(pages: number): number {
    return pages * 8 + MAX_ORDER * 8 + align4(pages);
  }

  constructor(pages: number, opts: BuddyAllocatorOptions = {}) {
    if (!Number.isInteger(pages) || pages <= 0 || pages > 0x7fffffff) throw new BuddyError(`page count must be 1..2^31-1, got ${pages}`);
    const reserved = opts.reservedPages ?? 0;
    if (!Number.isInteger(reserved) || reserved < 0 || reserved > pages) throw new BuddyError(`reservedPages must be 0..${pages}, got ${reserved}`);
    this.totalPages = pages;
    const bytes = BuddyAllocator.metadataBytes(pages);
    const buffer = opts.metadata?.buffer ?? new ArrayBuffer(bytes);
    const base = opts.metadata?.byteOffset ?? 0;
    if (base % 4 !== 0) throw new BuddyError(`metadata byteOffset must be 4-aligned, got ${base}`);
    if (base + bytes > buffer.byteLength) throw new BuddyError(`metadata needs ${bytes} bytes at ${base}, buffer has ${buffer.byteLength}`);
    let off = base;
    this.next = new Int32Array(buffer, off, pages);
    off += pages * 4;
    this.prev = new Int32Array(buffer, off, pages);
    off += pages * 4;
    this.heads = new Int32Array(buffer, off, MAX_ORDER);
    off += MAX_ORDER * 4;
    this.counts = new Int32Array(buffer, off, MAX_ORDER);
    off += MAX_ORDER * 4;
    this.state = new Uint8Array(buffer, off, pages);
    if (opts.attach) return;

    this.heads.fill(-1);
    this.counts.fill(0);
    this.state.fill(TAIL);
    this.state.fill(RESERVED, 0, reserved);
    // Carve [reserved, pages) into naturally aligned blocks, largest first, as
    // memblock_free_all() hands boot memory to the buddy allocator. Pushed in
    // descending address order so that the lowest block is at the list head.
    const blocks: number[] = [];
    let pfn = reserved;
    while (pfn < pages) {
      let order = MAX_ORDER - 1;
      while (order > 0 && (pfn % (1 << order) !== 0 || pfn + (1 << order) > pages)) order--;
      blocks.push(pfn, order);
      pfn += 1 << order;
    }
    for (let i = blocks.length - 2; i >= 0; i -= 2) this.pushFree(blocks[i]!, blocks[i + 1]!);
  }

  /** Allocates a naturally aligned block of 2^order pages; returns its first PFN or -1. */
  alloc(order: number): number {
    let o = order;
    while (o < MAX_ORDER && this.heads[o]! < 0) o++;
    if (o >= MAX_ORDER || order < 0) return -1;
    const pfn = this.heads[o]!;
    this.unlink(pfn, o);
    // expand(): hand the upper halves back, one per order.
    while (o > order) {
      o--;
      this.pushFree(pfn + (1 << o), o);
    }
    this.state[pfn] = ALLOCATED | order;
    return pfn;
  }

  /** Frees a block returned by alloc(order), merging with free buddies (__free_one_page). */
  free(pfn: number, order: number): void {
    if (!Number.isInteger(pfn) || pfn < 0 || pfn >= this.totalPages) throw new BuddyError(`free of pfn ${pfn} outside 0..${this.totalPages - 1}`);
    if (this.state[pfn] !== (ALLOCATED | order)) {
      throw new BuddyError(`free of pfn ${pfn} order ${order}: not an allocated block of that order (double free or wrong order)`);
    }
    this.state[pfn] = TAIL;
    while (order < MAX_ORDER - 1) {
      const buddy = pfn ^ (1 << order);
      if (buddy + (1 << order) > this.totalPages || this.state[buddy] !== order) break;
      this.unlink(buddy, order);
      pfn = pfn < buddy ? pfn : buddy;
      order++;
    }
    this.pushFree(pfn, order);
  }

  /**
   * Takes one specific free block off its list (isolation for free page
   * reporting, as page_reporting isolates blocks before telling the host).
   * Returns false if pfn is not the head of a free block of that order.
   */
  takeFreeBlock(pfn: number, order: number): boolean {
    if (pfn < 0 || pfn >= this.totalPages || this.state[pfn] !== order) return false;
    this.unlink(pfn, order);
    this.state[pfn] = ALLOCATED | order;
    return true;
  }

  /**
   * Splits an allocated order-k block into two allocated order-(k-1) blocks
   * (split_page()), so the balloon can give back part of a large block.
   */
  splitAllocated(pfn: number, order: number): void {
    if (order <= 0 || this.state[pfn] !== (ALLOCATED | order)) throw new BuddyError(`split of pfn ${pfn}: not an allocated block of order ${order}`);
    this.state[pfn] = ALLOCATED | (order - 1);
    this.state[pfn + (1 << (order - 1))] = ALLOCATED | (order - 1);
  }

  /** Free blocks of one order. */
  freeCount(order: number): number {
    return this.counts[order] ?? 0;
  }

  get freePages(): number {
    let n = 0;
    for (let o = 0; o < MAX_ORDER; o++) n += this.counts[o]! * (1 << o);
    return n;
  }

  /** Calls fn(pfn) for each free block of `order`, list order; stop early by returning false. The list must not change meanwhile. */
  forEachFreeBlock(order: number, fn: (pfn: number) => boolean | void): void {
    for (let p = this.heads[order]!; p >= 0; p = this.next[p]!) if (fn(p) === false) return;
  }

  /** Order of the allocated block whose head is pfn, or -1. */
  allocatedOrder(pfn: number): number {
    const s = this.state[pfn];
    return s !== undefined && s !== TAIL && s !== RESERVED && (s & ALLOCATED) !== 0 ? s & 0x7f : -1;
  }

  /** Order of the free block whose head is pfn, or -1. */
  freeOrder(pfn: number): number {
    const s = this.state[pfn];
    return s !== undefined && s < MAX_ORDER ? s : -1;
  }

  stats(): BuddyStats {
    return { totalPages: this.totalPages, freePages: this.freePages, freeBlocks: Array.from(this.counts) };
  }

  private pushFree(pfn: number, order: number): void {
    const head = this.heads[order]!;
    this.state[pfn] = order;
    this.next[pfn] = head;
    this.prev[pfn] = -1;
    if (head >= 0) this.prev[head] = pfn;
    this.heads[order] = pfn;
    this.counts[order]!++;
  }

  private unlink(pfn: number, order: number): void {
    const n = this.next[pfn]!;
    const p = this.prev[pfn]!;
    if (p >= 0) this.next[p] = n;
    else this.heads[order] = n;
    if (n >= 0) this.prev[n] = p;
    this.counts[order]!--;
    this.state[pfn] = TAIL;
  }
}

function align4(n: number): number {
  return Math.ceil(n / 4) * 4;
}
