// Host-side balloon device core (what balloon-host runs per VM): validates each
// buffer the guest hands over, then applies it. A refused request changes
// nothing: decoding into the range list finishes before any page is touched.

import { BalloonedPages } from "./ballooned";
import { PAGE_SHIFT } from "./buddy";
import { PageRangeList } from "./ranges";
import {
  BalloonConfigSpace,
  type BalloonGuestStats,
  type BalloonMode,
  type BalloonRequestError,
  MAX_REQUEST_RANGES,
  VIRTIO_BALLOON_F_REPORTING,
  VIRTIO_BALLOON_F_STATS_VQ,
  balloonModeFor,
  decodePageBitmap,
  decodePfnArray,
  decodeReportRanges,
  decodeStats,
  emptyGuestStats,
  hasFeature,
} from "./wire";

export type BalloonQueue = "inflate" | "deflate" | "reporting" | "stats";

/** Gives guest memory [offset, offset+length) back to the host (fallocate PUNCH_HOLE / madvise). */
export type ReleaseFn = (offset: number, length: number) => void;

export interface BalloonDeviceOptions {
  guestPages: number;
  /** Negotiated features; they choose the inflate/deflate format. */
  features: number;
  release: ReleaseFn;
  /**
   * Legacy PFN buffers are released page by page, as QEMU's balloon_page() does
   * per PFN (the seed's stages c and d "page per page"). Set to coalesce them too.
   */
  coalescePfn?: boolean;
  /** Backing store for the ballooned-pages bitmap (e.g. a shared buffer). */
  balloonedStorage?: Uint32Array;
  /** Config space to write the target into (SetTarget). */
  config?: BalloonConfigSpace;
  /** Monotonic clock in ms; performance.now by default. */
  now?: () => number;
}

export interface BalloonDeviceCounters {
  inflateRequests: number;
  deflateRequests: number;
  reportRequests: number;
  statsRequests: number;
  refusedRequests: number;
  inflatedPages: number;
  deflatedPages: number;
  reportedPages: number;
  releaseCalls: number;
  releasedBytes: number;
  /** Time decoding and validating buffers (the seed's stage c, address translation). */
  translateMs: number;
  /** Time releasing memory and updating the bitmap (the seed's stage d, madvise). */
  releaseMs: number;
}

export class BalloonDevice {
  readonly mode: BalloonMode;
  readonly guestPages: number;
  readonly ballooned: BalloonedPages;
  readonly counters: BalloonDeviceCounters = {
    inflateRequests: 0,
    deflateRequests: 0,
    reportRequests: 0,
    statsRequests: 0,
    refusedRequests: 0,
    inflatedPages: 0,
    deflatedPages: 0,
    reportedPages: 0,
    releaseCalls: 0,
    releasedBytes: 0,
    translateMs: 0,
    releaseMs: 0,
  };
  /** The last refused request's error, for the service to report. */
  lastError: BalloonRequestError | null = null;
  /** The last stats buffer the guest sent, or null. */
  guestStats: BalloonGuestStats | null = null;

  private readonly ranges = new PageRangeList(MAX_REQUEST_RANGES);
  private readonly release: ReleaseFn;
  private readonly coalescePfn: boolean;
  private readonly now: () => number;
  private readonly config: BalloonConfigSpace | undefined;
  private readonly features: number;

  constructor(opts: BalloonDeviceOptions) {
    if (!Number.isInteger(opts.guestPages) || opts.guestPages <= 0) throw new RangeError(`guestPages must be a positive integer, got ${opts.guestPages}`);
    this.guestPages = opts.guestPages;
    this.features = opts.features;
    this.mode = balloonModeFor(opts.features);
    this.release = opts.release;
    this.coalescePfn = opts.coalescePfn ?? false;
    this.now = opts.now ?? (() => performance.now());
    this.config = opts.config;
    this.ballooned = new BalloonedPages(opts.guestPages, opts.balloonedStorage);
  }

  /** SetTarget: pages the guest should give up; the driver follows on its config-change interrupt. */
  setTarget(pages: number): void {
    if (!Number.isInteger(pages) || pages < 0 || pages > this.guestPages) throw new RangeError(`target must be 0..${this.guestPages} pages, got ${pages}`);
    if (!this.config) throw new Error("no config space attached");
    this.config.numPages = pages;
  }

  /** Dispatches one buffer popped from a queue. Returns null if applied, the error if refused. */
  handle(queue: BalloonQueue, buf: Uint8Array, len: number): BalloonRequestError | null {
    switch (queue) {
      case "inflate":
        return this.handleInflate(buf, len);
      case "deflate":
        return this.handleDeflate(buf, len);
      case "reporting":
        return this.handleReport(buf, len);
      case "stats":
        return this.handleStats(buf, len);
    }
  }

  handleInflate(buf: Uint8Array, len: number): BalloonRequestError | null {
    this.counters.inflateRequests++;
    const err = this.translate(buf, len, this.mode);
    if (err) return this.refuse(err);
    const t = this.now();
    const r = this.ranges;
    const perPage = this.mode === "pfn" && !this.coalescePfn;
    for (let i = 0; i < r.length; i++) {
      const start = r.starts[i]!;
      const count = r.counts[i]!;
      if (perPage) for (let p = start; p < start + count; p++) this.releasePages(p, 1);
      else this.releasePages(start, count);
      this.ballooned.setRange(start, count);
      this.counters.inflatedPages += count;
    }
    this.counters.releaseMs += this.now() - t;
    return null;
  }

  /** Deflate: the guest takes pages back; they fault in fresh (zero) on next touch. */
  handleDeflate(buf: Uint8Array, len: number): BalloonRequestError | null {
    this.counters.deflateRequests++;
    const err = this.translate(buf, len, this.mode);
    if (err) return this.refuse(err);
    const t = this.now();
    const r = this.ranges;
    for (let i = 0; i < r.length; i++) {
      this.ballooned.clearRange(r.starts[i]!, r.counts[i]!);
      this.counters.deflatedPages += r.counts[i]!;
    }
    this.counters.releaseMs += this.now() - t;
    return null;
  }

  /**
   * Free page reporting: the ranges are free in the guest; release them, but
   * they stay the guest's (not ballooned), which may reuse them without telling.
   */
  handleReport(buf: Uint8Array, len: number): BalloonRequestError | null {
    this.counters.reportRequests++;
    // The reporting queue exists only with VIRTIO_BALLOON_F_REPORTING (virtio 1.2, 5.5.2).
    if (!hasFeature(this.features, VIRTIO_BALLOON_F_REPORTING)) return this.refuse(notNegotiated("reporting"));
    const err = this.translate(buf, len, "reporting");
    if (err) return this.refuse(err);
    const t = this.now();
    const r = this.ranges;
    for (let i = 0; i < r.length; i++) {
      this.releasePages(r.starts[i]!, r.counts[i]!);
      this.counters.reportedPages += r.counts[i]!;
    }
    this.counters.releaseMs += this.now() - t;
    return null;
  }

  handleStats(buf: Uint8Array, len: number): BalloonRequestError | null {
    this.counters.statsRequests++;
    if (!hasFeature(this.features, VIRTIO_BALLOON_F_STATS_VQ)) return this.refuse(notNegotiated("stats"));
    const into = this.guestStats ?? emptyGuestStats();
    const err = decodeStats(buf, len, into);
    if (err) return this.refuse(err);
    this.guestStats = into;
    return null;
  }

  private translate(buf: Uint8Array, len: number, format: BalloonMode): BalloonRequestError | null {
    const t = this.now();
    const err =
      format === "bitmap"
        ? decodePageBitmap(buf, len, this.guestPages, this.ranges)
        : format === "reporting"
          ? decodeReportRanges(buf, len, this.guestPages, this.ranges)
          : decodePfnArray(buf, len, this.guestPages, this.ranges);
    this.counters.translateMs += this.now() - t;
    return err;
  }

  private releasePages(pfn: number, count: number): void {
    const bytes = count * 2 ** PAGE_SHIFT;
    this.release(pfn * 2 ** PAGE_SHIFT, bytes);
    this.counters.releaseCalls++;
    this.counters.releasedBytes += bytes;
  }

  private refuse(err: BalloonRequestError): BalloonRequestError {
    this.counters.refusedRequests++;
    this.lastError = err;
    this.ranges.clear();
    return err;
  }
}

function notNegotiated(queue: BalloonQueue): BalloonRequestError {
  return { kind: "queue-not-negotiated", queue, message: `buffer on the ${queue} queue, which the negotiated features do not provide` };
}
