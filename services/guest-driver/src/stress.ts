// The memory-dirtying workload of QEMU's tests/qtest/migration-test: the guest
// walks its working set in page order and increments the first byte of each
// page (wrapping at 256), forever. Each vCPU walks its own contiguous part of
// the working set, so along a part the first bytes read v+1 .. v+1, v .. v
// with a single step down where the walk stands; after a migration,
// check_guests_ram() on the destination finds exactly that or a page the
// migration lost.
//
// Every write goes through the vCPU's GuestMemory `vcpu` accessor, whose dirty
// log is the vCPU log (what KVM_GET_DIRTY_LOG reports): the migration's rounds
// find the pages the walk dirtied there.
import { DIRTY_PAGE_SIZE, type MemoryAccessor } from "@virtmesh/virtqueue";

export const STRESS_PAGE = DIRTY_PAGE_SIZE;

export interface StressParams {
  /** Guest-physical start of the working set (page aligned). */
  addr: number;
  /** Working set size (a positive multiple of 4096). */
  bytes: number;
  /** Target dirty rate over all its vCPUs (bytes/s); 0: flat out. */
  rateBytesPerS: number;
  /** vCPU threads that walk it: vCPUs 1..vcpus. */
  vcpus: number;
}

export interface StressSnapshot {
  running: boolean;
  addr: number;
  bytes: number;
  vcpus: number;
  /** Page increments since the start (all vCPUs). */
  pagesWritten: number;
  /** Completed walks of the working set: the lowest over its vCPUs' parts. */
  passes: number;
  /** Measured over the last second of running (bytes/s). */
  dirtyRateBytesPerS: number;
  throttlePct: number;
}

export interface StressVerifyResult {
  pagesChecked: number;
  mismatches: number;
  /** "page N: X after Y" (N: page index in the working set), or "". */
  firstMismatch: string;
}

/** Checks params against guest memory of memSize bytes and the vCPUs available; an error message or null. */
export function checkStressParams(p: StressParams, memSize: number, vcpus: number): string | null {
  if (!(Number.isSafeInteger(p.addr) && p.addr >= 0 && p.addr % STRESS_PAGE === 0)) return `working set address ${p.addr} must be a multiple of ${STRESS_PAGE}`;
  if (!(Number.isSafeInteger(p.bytes) && p.bytes > 0 && p.bytes % STRESS_PAGE === 0)) return `working set of ${p.bytes} bytes must be a positive multiple of ${STRESS_PAGE}`;
  if (p.addr + p.bytes > memSize) return `working set [${p.addr}, +${p.bytes}) ends past guest memory of ${memSize} bytes`;
  if (!(Number.isInteger(p.vcpus) && p.vcpus >= 1 && p.vcpus <= vcpus)) return `vcpus ${p.vcpus} must be in [1, ${vcpus}]`;
  if (p.vcpus > p.bytes / STRESS_PAGE) return `vcpus ${p.vcpus} exceed the ${p.bytes / STRESS_PAGE} pages of the working set`;
  if (!(Number.isFinite(p.rateBytesPerS) && p.rateBytesPerS >= 0)) return `dirty rate ${p.rateBytesPerS} must be >= 0`;
  return null;
}

/** vCPU k's (0-based among the walkers) contiguous part: [addr, addr + pages * 4096). */
export function stressPart(p: StressParams, k: number): { addr: number; pages: number } {
  const total = p.bytes / STRESS_PAGE;
  const base = Math.floor(total / p.vcpus);
  const extra = total % p.vcpus;
  const first = k * base + Math.min(k, extra);
  return { addr: p.addr + first * STRESS_PAGE, pages: base + (k < extra ? 1 : 0) };
}

/** What a walker carries across a migration. */
export interface StressWalkerState {
  addr: number;
  pages: number;
  pos: number;
  pagesWritten: number;
  passes: number;
  /** Credit of pages the pacing allows now (fractional). */
  credit: number;
}

/**
 * One vCPU's walk over its part. Not thread-aware itself: the vCPU thread
 * calls step() between its other work, pacing it by budget.
 */
export class StressWalker {
  pos = 0;
  pagesWritten = 0;
  passes = 0;
  credit = 0;

  constructor(
    private readonly mem: MemoryAccessor,
    readonly addr: number,
    readonly pages: number,
  ) {}

  /** Starts the pattern from a known state: first byte of every page 0 (a vCPU write, logged). */
  init(): void {
    for (let i = 0; i < this.pages; i++) this.mem.writeU8(this.addr + i * STRESS_PAGE, 0);
  }

  /** Increments up to n pages along the walk; returns the pages written. */
  step(n: number): number {
    const mem = this.mem;
    const bytes = mem.memory.bytes;
    for (let i = 0; i < n; i++) {
      const a = this.addr + this.pos * STRESS_PAGE;
      // writeU8 marks the vCPU dirty log (when logging is on), as the MMU's write fault would.
      mem.writeU8(a, (bytes[a]! + 1) & 0xff);
      if (++this.pos === this.pages) {
        this.pos = 0;
        this.passes++;
      }
    }
    this.pagesWritten += n;
    return n;
  }

  save(): StressWalkerState {
    return { addr: this.addr, pages: this.pages, pos: this.pos, pagesWritten: this.pagesWritten, passes: this.passes, credit: this.credit };
  }

  static restore(mem: MemoryAccessor, s: StressWalkerState): StressWalker {
    const w = new StressWalker(mem, s.addr, s.pages);
    if (!(Number.isInteger(s.pos) && s.pos >= 0 && s.pos < s.pages)) throw new RangeError(`stress walker position ${s.pos} outside its ${s.pages} pages`);
    w.pos = s.pos;
    w.pagesWritten = s.pagesWritten;
    w.passes = s.passes;
    w.credit = s.credit;
    return w;
  }
}

/**
 * migration-test's check_guests_ram() over each vCPU's part: the first byte of
 * consecutive pages equals the previous one or is one less (mod 256), and only
 * one page per part may step down (where the walk stood). Every other change
 * is a mismatch: a page the migration did not carry, or carried stale.
 */
export function verifyStress(mem: Uint8Array, p: StressParams): StressVerifyResult {
  let pagesChecked = 0;
  let mismatches = 0;
  let firstMismatch = "";
  for (let k = 0; k < p.vcpus; k++) {
    const part = stressPart(p, k);
    const firstPage = (part.addr - p.addr) / STRESS_PAGE;
    let last = mem[part.addr]!;
    let stepped = false;
    pagesChecked++;
    for (let i = 1; i < part.pages; i++) {
      const b = mem[part.addr + i * STRESS_PAGE]!;
      pagesChecked++;
      if (b !== last) {
        if (((b + 1) & 0xff) === last && !stepped) stepped = true;
        else {
          mismatches++;
          if (firstMismatch === "") firstMismatch = `page ${firstPage + i}: ${b} after ${last}`;
        }
      }
      last = b;
    }
  }
  return { pagesChecked, mismatches, firstMismatch };
}
