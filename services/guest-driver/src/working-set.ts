// Guest-physical ranges taken from (and given back to) the guest's page allocator
// for the dirtying workload, and the allocator's free pages as a bitmap
// (virtio-balloon free page hinting: virtio_balloon's report_free_page_func hands
// the host free page blocks so that migration skips them; here the whole free set
// at once).
import { BuddyError, MAX_ORDER, PAGE_SIZE, type BuddyAllocator } from "@virtmesh/balloon";

/** A contiguous run of pages held as naturally aligned allocated buddy blocks. */
export interface WorkingSet {
  /** First page frame. */
  pfn: number;
  pages: number;
  /** The blocks that make it up, for freeing: [pfn, order] pairs. */
  blocks: Array<[number, number]>;
}

/** Sets one bit per free page of the allocator in `bits` (bit i of byte i >> 3: little-endian 64-bit words). */
export function freePageBitmap(alloc: BuddyAllocator, bits: Uint8Array): number {
  let free = 0;
  for (let order = 0; order < MAX_ORDER; order++) {
    const n = 1 << order;
    alloc.forEachFreeBlock(order, (pfn) => {
      for (let p = pfn; p < pfn + n; p++) bits[p >> 3]! |= 1 << (p & 7);
      free += n;
    });
  }
  return free;
}

/** The free-page hint: `pages` guest pages (the whole guest memory), LE 64-bit words. */
export function freePageHint(alloc: BuddyAllocator, guestPages: number): { pages: number; free: number; bitmap: Uint8Array } {
  const bitmap = new Uint8Array(Math.ceil(guestPages / 64) * 8);
  const free = freePageBitmap(alloc, bitmap);
  return { pages: guestPages, free, bitmap };
}

const isFree = (bits: Uint8Array, p: number): boolean => (bits[p >> 3]! & (1 << (p & 7))) !== 0;

/**
 * Takes `pages` contiguous free pages from the allocator, lowest address first, or
 * returns null (nothing changed) if no run that long is free. The run is carved into
 * naturally aligned blocks; each is cut out of the free block that contains it by
 * taking that block and splitting it down (split_page()), the other halves freed.
 */
export function allocWorkingSet(alloc: BuddyAllocator, pages: number): WorkingSet | null {
  if (!Number.isSafeInteger(pages) || pages <= 0) throw new RangeError(`working set of ${pages} pages`);
  const bits = new Uint8Array(Math.ceil(alloc.totalPages / 8));
  freePageBitmap(alloc, bits);
  let start = -1;
  for (let p = 0, run = 0; p < alloc.totalPages; p++) {
    run = isFree(bits, p) ? run + 1 : 0;
    if (run === pages) {
      start = p - pages + 1;
      break;
    }
  }
  if (start < 0) return null;
  const blocks: Array<[number, number]> = [];
  const carve = (pfn: number, order: number): void => {
    if (takeBlock(alloc, pfn, order)) {
      blocks.push([pfn, order]);
      return;
    }
    // Spans several free blocks: take its halves separately (an order-0 page always lies in one).
    if (order === 0) throw new BuddyError(`page ${pfn} is not free`);
    carve(pfn, order - 1);
    carve(pfn + (1 << (order - 1)), order - 1);
  };
  for (let p = start, end = start + pages; p < end; ) {
    let order = MAX_ORDER - 1;
    while (order > 0 && (p % (1 << order) !== 0 || p + (1 << order) > end)) order--;
    carve(p, order);
    p += 1 << order;
  }
  return { pfn: start, pages, blocks };
}

/** Allocates exactly block (pfn, order) if one free block contains it; false otherwise (nothing changed). */
function takeBlock(alloc: BuddyAllocator, pfn: number, order: number): boolean {
  for (let o = order; o < MAX_ORDER; o++) {
    const head = pfn - (pfn % (1 << o));
    if (alloc.freeOrder(head) !== o) continue;
    if (!alloc.takeFreeBlock(head, o)) return false;
    // Split down to (pfn, order), freeing the halves that do not hold it.
    let h = head;
    for (let k = o; k > order; k--) {
      alloc.splitAllocated(h, k);
      const half = 1 << (k - 1);
      if (pfn >= h + half) {
        alloc.free(h, k - 1);
        h += half;
      } else alloc.free(h + half, k - 1);
    }
    return true;
  }
  return false;
}

export function freeWorkingSet(alloc: BuddyAllocator, ws: WorkingSet): void {
  for (const [pfn, order] of ws.blocks) alloc.free(pfn, order);
}

export const workingSetAddr = (ws: WorkingSet): number => ws.pfn * PAGE_SIZE;
