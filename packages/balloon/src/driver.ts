// Guest balloon driver (drivers/virtio/virtio_balloon.c with the seed's
// PAGE_BITMAP path): follows the device's target, inflates by allocating guest
// pages and telling the host, deflates with MUST_TELL_HOST ordering, gives pages
// back when the guest runs out of memory, and fills the stats queue. Pure: the
// allocator and the transport (virtqueue + kick + wait for used) are injected.

import { BuddyAllocator, MAX_ORDER, PAGE_SIZE } from "./buddy";
import type { BalloonQueue } from "./device";
import {
  BalloonConfigSpace,
  type BalloonGuestStats,
  type BalloonMode,
  PAGE_BITMAP_BUFFER_SIZE,
  PAGE_REPORTING_CAPACITY,
  REPORT_ENTRY_SIZE,
  STATS_BUFFER_SIZE,
  VIRTIO_BALLOON_ARRAY_PFNS_MAX,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  VIRTIO_BALLOON_F_MUST_TELL_HOST,
  VIRTIO_BALLOON_F_STATS_VQ,
  balloonModeFor,
  emptyGuestStats,
  encodePfnArray,
  encodeStats,
  fillPageBitmapBuffer,
  hasFeature,
  writeReportEntry,
} from "./wire";

/** Adds buf[0..len) to a queue, kicks, and resolves once the device has used it (rejects if refused). */
export interface BalloonTransport {
  send(queue: BalloonQueue, buf: Uint8Array, len: number): Promise<void>;
}

export interface VmEventCounters {
  swapIn: number;
  swapOut: number;
  majorFaults: number;
  minorFaults: number;
  diskCaches: number;
}

export interface BalloonDriverOptions {
  allocator: BuddyAllocator;
  transport: BalloonTransport;
  /** Negotiated features. */
  features: number;
  /** Device config (num_pages target, actual). */
  config?: BalloonConfigSpace;
  /** Data buffer in guest memory, at least PAGE_BITMAP_BUFFER_SIZE bytes. */
  buffer?: Uint8Array;
  /** Stats buffer in guest memory, at least STATS_BUFFER_SIZE bytes. */
  statsBuffer?: Uint8Array;
  /** Pages given back per OOM notification (OOM_VBALLOON_DEFAULT_PAGES). */
  oomPages?: number;
  vmEvents?: () => VmEventCounters;
  now?: () => number;
}

/** Stage times in ms, accumulated: a = allocating pages, b = encoding and handing buffers over (device time included). */
export interface BalloonDriverTimings {
  allocMs: number;
  sendMs: number;
  buffers: number;
}

export const OOM_VBALLOON_DEFAULT_PAGES = 256;

export class BalloonDriver {
  readonly mode: BalloonMode;
  readonly features: number;
  readonly timings: BalloonDriverTimings = { allocMs: 0, sendMs: 0, buffers: 0 };
  /** Pages the balloon holds (vb->num_pages). */
  numPages = 0;

  private readonly alloc: BuddyAllocator;
  private readonly transport: BalloonTransport;
  private readonly config: BalloonConfigSpace | undefined;
  private readonly buf: Uint8Array;
  private readonly statsBuf: Uint8Array;
  private readonly oomPages: number;
  private readonly vmEvents: (() => VmEventCounters) | undefined;
  private readonly now: () => number;
  // The balloon's pages (vb_dev_info->pages) as a stack of buddy blocks.
  private readonly stackPfn: Int32Array;
  private readonly stackOrder: Uint8Array;
  private depth = 0;
  private readonly leakPfn: Int32Array;
  private readonly leakOrder: Uint8Array;
  // Request bitmap for PAGE_BITMAP (the seed's page_bitmap[]), 64-bit words as u32 pairs.
  private readonly bits: Uint32Array;
  private readonly pfnScratch = new Int32Array(VIRTIO_BALLOON_ARRAY_PFNS_MAX);
  private readonly lenOut = new Uint32Array(1);
  private chain: Promise<unknown> = Promise.resolve();

  constructor(opts: BalloonDriverOptions) {
    this.alloc = opts.allocator;
    this.transport = opts.transport;
    this.features = opts.features;
    this.mode = balloonModeFor(opts.features);
    this.config = opts.config;
    this.buf = opts.buffer ?? new Uint8Array(PAGE_BITMAP_BUFFER_SIZE);
    if (this.buf.length < PAGE_BITMAP_BUFFER_SIZE) throw new RangeError(`balloon buffer needs ${PAGE_BITMAP_BUFFER_SIZE} bytes`);
    this.statsBuf = opts.statsBuffer ?? new Uint8Array(STATS_BUFFER_SIZE);
    this.oomPages = opts.oomPages ?? OOM_VBALLOON_DEFAULT_PAGES;
    this.vmEvents = opts.vmEvents;
    this.now = opts.now ?? (() => performance.now());
    const n = this.alloc.totalPages;
    this.stackPfn = new Int32Array(n);
    this.stackOrder = new Uint8Array(n);
    this.leakPfn = new Int32Array(n);
    this.leakOrder = new Uint8Array(n);
    this.bits = new Uint32Array(Math.ceil(n / 64) * 2);
  }

  /** Config-change handler (virtballoon_changed + update_balloon_size_func): move to the device's target, then write actual. */
  async update(): Promise<void> {
    if (!this.config) throw new Error("no config space attached");
    const config = this.config;
    await this.locked(async () => {
      await this.moveTo(config.numPages);
      config.actual = this.numPages;
    });
  }

  /** Inflates or deflates until the balloon holds `target` pages (or the guest has no more free pages). */
  async setTarget(target: number): Promise<void> {
    await this.locked(() => this.moveTo(target));
    if (this.config) this.config.actual = this.numPages;
  }

  /** One fill_balloon(): up to num pages (PFN mode: at most 256). Returns pages added. */
  fill(num: number): Promise<number> {
    return this.locked(() => this.fillUnlocked(num));
  }

  /** One leak_balloon(): up to num pages (PFN mode: at most 256). Returns pages released to the guest. */
  leak(num: number): Promise<number> {
    return this.locked(() => this.leakUnlocked(num));
  }

  /**
   * virtballoon_oom_notify(): with DEFLATE_ON_OOM negotiated, give oomPages back
   * to the guest (telling the host first under MUST_TELL_HOST). Returns pages freed.
   */
  deflateOnOom(): Promise<number> {
    if (!hasFeature(this.features, VIRTIO_BALLOON_F_DEFLATE_ON_OOM)) return Promise.resolve(0);
    return this.locked(async () => {
      let freed = 0;
      while (freed < this.oomPages && this.numPages > 0) {
        const n = await this.leakUnlocked(this.oomPages - freed);
        if (n === 0) break;
        freed += n;
      }
      return freed;
    });
  }

  /** Guest allocation that deflates the balloon on OOM and retries; -1 if still out of memory. */
  async allocPages(order: number): Promise<number> {
    for (;;) {
      const pfn = this.alloc.alloc(order);
      if (pfn >= 0) return pfn;
      if ((await this.deflateOnOom()) === 0) return -1;
    }
  }

  /** update_balloon_stats(). */
  collectStats(): BalloonGuestStats {
    const s = emptyGuestStats();
    const ev = this.vmEvents?.();
    if (ev) {
      s.swapIn = ev.swapIn;
      s.swapOut = ev.swapOut;
      s.majorFaults = ev.majorFaults;
      s.minorFaults = ev.minorFaults;
      s.diskCaches = ev.diskCaches;
    }
    s.freeMemory = this.alloc.freePages * PAGE_SIZE;
    // Without DEFLATE_ON_OOM ballooned pages leave totalram (adjust_managed_page_count).
    const managed = hasFeature(this.features, VIRTIO_BALLOON_F_DEFLATE_ON_OOM) ? this.alloc.totalPages : this.alloc.totalPages - this.numPages;
    s.totalMemory = managed * PAGE_SIZE;
    s.availableMemory = s.freeMemory + s.diskCaches;
    return s;
  }

  /** stats_handle_request(): refill the stats queue with fresh figures. */
  async sendStats(): Promise<void> {
    if (!hasFeature(this.features, VIRTIO_BALLOON_F_STATS_VQ)) throw new Error("STATS_VQ was not negotiated");
    const len = encodeStats(this.statsBuf, this.collectStats());
    await this.transport.send("stats", this.statsBuf, len);
  }

  /**
   * Free page reporting (mm/page_reporting.c): isolates free blocks of order >=
   * minOrder, reports them in batches of PAGE_REPORTING_CAPACITY on the
   * reporting queue, and returns them to the free lists once the host has used
   * each batch. Returns pages reported.
   */
  reportFreePages(minOrder = 9): Promise<number> {
    return this.locked(async () => {
      const found: number[] = [];
      for (let o = MAX_ORDER - 1; o >= minOrder; o--) this.alloc.forEachFreeBlock(o, (pfn) => void found.push(pfn, o));
      let reported = 0;
      const batchPfn = new Int32Array(PAGE_REPORTING_CAPACITY);
      const batchOrder = new Uint8Array(PAGE_REPORTING_CAPACITY);
      for (let i = 0; i < found.length; ) {
        let n = 0;
        for (; i < found.length && n < PAGE_REPORTING_CAPACITY; i += 2) {
          if (!this.alloc.takeFreeBlock(found[i]!, found[i + 1]!)) continue;
          batchPfn[n] = found[i]!;
          batchOrder[n] = found[i + 1]!;
          writeReportEntry(this.buf, n++, found[i]!, found[i + 1]!);
        }
        if (n === 0) continue;
        try {
          await this.transport.send("reporting", this.buf, n * REPORT_ENTRY_SIZE);
          for (let k = 0; k < n; k++) reported += 2 ** batchOrder[k]!;
        } finally {
          for (let k = 0; k < n; k++) this.alloc.free(batchPfn[k]!, batchOrder[k]!);
        }
      }
      return reported;
    });
  }

  /** Whether pfn lies in a block the balloon holds (O(balloon blocks); for checks and tests). */
  holds(pfn: number): boolean {
    for (let i = 0; i < this.depth; i++) {
      const s = this.stackPfn[i]!;
      if (pfn >= s && pfn < s + 2 ** this.stackOrder[i]!) return true;
    }
    return false;
  }

  resetTimings(): void {
    this.timings.allocMs = 0;
    this.timings.sendMs = 0;
    this.timings.buffers = 0;
  }

  // ---- internals ----------------------------------------------------------------

  private locked<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn, fn);
    this.chain = run.catch(() => undefined);
    return run;
  }

  private async moveTo(target: number): Promise<void> {
    if (!Number.isInteger(target) || target < 0) throw new RangeError(`balloon target must be a non-negative integer, got ${target}`);
    while (this.numPages < target) if ((await this.fillUnlocked(target - this.numPages)) === 0) break;
    while (this.numPages > target) if ((await this.leakUnlocked(this.numPages - target)) === 0) break;
  }

  private async fillUnlocked(num: number): Promise<number> {
    if (this.mode === "pfn") num = Math.min(num, VIRTIO_BALLOON_ARRAY_PFNS_MAX);
    const first = this.depth;
    // Stage a: allocate. Order-0 pages one at a time as fill_balloon(); in
    // "reporting" mode whole buddy blocks, the seed's TODO for stage a.
    const t0 = this.now();
    let got = 0;
    if (this.mode === "reporting") {
      while (got < num) {
        let order = Math.min(MAX_ORDER - 1, Math.floor(Math.log2(num - got)));
        let pfn = -1;
        for (; order >= 0; order--) if ((pfn = this.alloc.alloc(order)) >= 0) break;
        if (pfn < 0) break;
        this.push(pfn, order);
        got += 2 ** order;
      }
    } else {
      while (got < num) {
        const pfn = this.alloc.alloc(0);
        if (pfn < 0) break;
        this.push(pfn, 0);
        got++;
      }
    }
    const t1 = this.now();
    this.timings.allocMs += t1 - t0;
    if (got === 0) return 0;
    // Stage b: tell the host. The pages stay in the balloon even if the send
    // fails: the guest must not reuse a page the host may have released.
    this.numPages += got;
    try {
      await this.tellHost("inflate", this.stackPfn, this.stackOrder, first, this.depth);
    } finally {
      this.timings.sendMs += this.now() - t1;
    }
    return got;
  }

  private async leakUnlocked(num: number): Promise<number> {
    if (this.mode === "pfn") num = Math.min(num, VIRTIO_BALLOON_ARRAY_PFNS_MAX);
    num = Math.min(num, this.numPages);
    if (num <= 0) return 0;
    // balloon_page_dequeue(): pop blocks; a block larger than what is left to
    // give back is split, its lower half stays in the balloon.
    let taken = 0;
    let n = 0;
    while (taken < num && this.depth > 0) {
      const d = this.depth - 1;
      const pfn = this.stackPfn[d]!;
      let order = this.stackOrder[d]!;
      if (2 ** order > num - taken) {
        this.alloc.splitAllocated(pfn, order);
        order--;
        this.stackOrder[d] = order;
        this.push(pfn + 2 ** order, order);
        continue;
      }
      this.depth = d;
      this.leakPfn[n] = pfn;
      this.leakOrder[n] = order;
      n++;
      taken += 2 ** order;
    }
    this.numPages -= taken;
    const mustTell = hasFeature(this.features, VIRTIO_BALLOON_F_MUST_TELL_HOST);
    // leak_balloon(): "if virtio_has_feature(vdev, VIRTIO_BALLOON_F_MUST_TELL_HOST)
    // is true, we *have* to do it in this order": tell the host, then release.
    if (!mustTell) this.releaseToGuest(n);
    const t = this.now();
    try {
      await this.tellHost("deflate", this.leakPfn, this.leakOrder, 0, n);
    } catch (e) {
      // Never acknowledged: under MUST_TELL_HOST the pages stay in the balloon.
      if (mustTell) {
        for (let i = n - 1; i >= 0; i--) this.push(this.leakPfn[i]!, this.leakOrder[i]!);
        this.numPages += taken;
      }
      throw e;
    } finally {
      this.timings.sendMs += this.now() - t;
    }
    if (mustTell) this.releaseToGuest(n);
    return taken;
  }

  private releaseToGuest(n: number): void {
    for (let i = 0; i < n; i++) this.alloc.free(this.leakPfn[i]!, this.leakOrder[i]!);
  }

  private push(pfn: number, order: number): void {
    this.stackPfn[this.depth] = pfn;
    this.stackOrder[this.depth] = order;
    this.depth++;
  }

  /** Sends stack entries [from, to) on a queue in the negotiated format. */
  private async tellHost(queue: BalloonQueue, pfns: Int32Array, orders: Uint8Array, from: number, to: number): Promise<void> {
    const buf = this.buf;
    if (this.mode === "pfn") {
      let n = 0;
      for (let i = from; i < to; i++) {
        const pfn = pfns[i]!;
        for (let p = 0; p < 2 ** orders[i]!; p++) {
          this.pfnScratch[n++] = pfn + p;
          if (n === VIRTIO_BALLOON_ARRAY_PFNS_MAX) {
            await this.sendBuf(queue, encodePfnArray(buf, this.pfnScratch, 0, n));
            n = 0;
          }
        }
      }
      if (n > 0) await this.sendBuf(queue, encodePfnArray(buf, this.pfnScratch, 0, n));
      return;
    }
    if (this.mode === "reporting") {
      let n = 0;
      for (let i = from; i < to; i++) {
        writeReportEntry(buf, n++, pfns[i]!, orders[i]!);
        if (n === PAGE_REPORTING_CAPACITY) {
          await this.sendBuf(queue, n * REPORT_ENTRY_SIZE);
          n = 0;
        }
      }
      if (n > 0) await this.sendBuf(queue, n * REPORT_ENTRY_SIZE);
      return;
    }
    // PAGE_BITMAP: set_page_bitmap() builds the bitmap by scanning the pages,
    // then set_bulk_pages() turns it into heads, one buffer at a time.
    const bits = this.bits;
    let minWord = Infinity;
    let maxWord = -1;
    for (let i = from; i < to; i++) {
      const pfn = pfns[i]!;
      const size = 2 ** orders[i]!;
      for (let p = pfn; p < pfn + size; p++) bits[p >>> 5] = bits[p >>> 5]! | (1 << (p & 31));
      const w0 = Math.floor(pfn / 64);
      const w1 = Math.floor((pfn + size - 1) / 64);
      if (w0 < minWord) minWord = w0;
      if (w1 > maxWord) maxWord = w1;
    }
    let w = minWord;
    try {
      while (w <= maxWord) {
        w = fillPageBitmapBuffer(buf, bits, w, maxWord + 1, this.lenOut);
        if (this.lenOut[0]! > 0) await this.sendBuf(queue, this.lenOut[0]!);
      }
    } finally {
      // Leave the request bitmap clean even if a send failed part way.
      if (w <= maxWord) bits.fill(0, 2 * w, 2 * (maxWord + 1));
    }
  }

  private async sendBuf(queue: BalloonQueue, len: number): Promise<void> {
    this.timings.buffers++;
    await this.transport.send(queue, this.buf, len);
  }
}
