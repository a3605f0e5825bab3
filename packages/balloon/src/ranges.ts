// A preallocated list of page ranges [start, start+count) that host-side
// decoders fill and the device applies. No per-request allocation: the arrays
// are sized once for the largest request a buffer can carry.

export class PageRangeList {
  readonly starts: Float64Array;
  readonly counts: Float64Array;
  length = 0;
  /** True while every pushed range began at or after the end of the previous one. */
  private ascending = true;
  private order: Int32Array;

  constructor(readonly capacity: number) {
    this.starts = new Float64Array(capacity);
    this.counts = new Float64Array(capacity);
    this.order = new Int32Array(capacity);
  }

  clear(): void {
    this.length = 0;
    this.ascending = true;
  }

  /** Appends a range, merging with the previous one when adjacent. False when full. */
  push(start: number, count: number): boolean {
    const n = this.length;
    if (n > 0) {
      const end = this.starts[n - 1]! + this.counts[n - 1]!;
      if (end === start) {
        this.counts[n - 1] = this.counts[n - 1]! + count;
        return true;
      }
      if (start < end) this.ascending = false;
    }
    if (n === this.capacity) return false;
    this.starts[n] = start;
    this.counts[n] = count;
    this.length = n + 1;
    return true;
  }

  get pages(): number {
    let p = 0;
    for (let i = 0; i < this.length; i++) p += this.counts[i]!;
    return p;
  }

  /**
   * Sorts by start, coalesces adjacent ranges, and returns the first PFN that is
   * named twice, or -1 when no two ranges intersect. Guests normally send ranges
   * in ascending order, which costs nothing here.
   */
  normalize(): number {
    if (this.ascending) return -1;
    const n = this.length;
    const idx = this.order;
    for (let i = 0; i < n; i++) idx[i] = i;
    const starts = this.starts;
    const sorted = idx.subarray(0, n).sort((a, b) => starts[a]! - starts[b]!);
    const s2 = new Float64Array(n);
    const c2 = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      s2[i] = this.starts[sorted[i]!]!;
      c2[i] = this.counts[sorted[i]!]!;
    }
    this.length = 0;
    this.ascending = true;
    for (let i = 0; i < n; i++) {
      if (this.length > 0) {
        const end = this.starts[this.length - 1]! + this.counts[this.length - 1]!;
        if (s2[i]! < end) return s2[i]!;
      }
      this.push(s2[i]!, c2[i]!);
    }
    return -1;
  }
}
