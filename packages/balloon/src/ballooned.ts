// The host's record of which guest pages are in the balloon: one bit per 4 KiB
// guest page, bit (pfn % 32) of u32 word (pfn / 32), i.e. a little-endian
// Linux-style bitmap when exported as bytes. The migration-manager skips these
// pages (their contents are gone; the guest must not touch them).

export class BalloonedPages {
  readonly words: Uint32Array;
  private setCount = 0;

  constructor(readonly pages: number, storage?: Uint32Array) {
    const n = Math.ceil(pages / 32);
    if (storage && storage.length < n) throw new RangeError(`storage needs ${n} words`);
    this.words = storage ? storage.subarray(0, n) : new Uint32Array(n);
    if (storage) for (let i = 0; i < n; i++) this.setCount += popcount(this.words[i]!);
  }

  get count(): number {
    return this.setCount;
  }

  test(pfn: number): boolean {
    return pfn >= 0 && pfn < this.pages && ((this.words[pfn >>> 5]! >>> (pfn & 31)) & 1) === 1;
  }

  /** Sets [start, start+count); returns how many bits were newly set. */
  setRange(start: number, count: number): number {
    const added = this.apply(start, count, true);
    this.setCount += added;
    return added;
  }

  /** Clears [start, start+count); returns how many bits were set before. */
  clearRange(start: number, count: number): number {
    const removed = this.apply(start, count, false);
    this.setCount -= removed;
    return removed;
  }

  clear(): void {
    this.words.fill(0);
    this.setCount = 0;
  }

  /** The bitmap as bytes (LSB of byte 0 = PFN 0), a view, not a copy: ceil(pages/8) bytes. */
  toBytes(): Uint8Array {
    return new Uint8Array(this.words.buffer, this.words.byteOffset, Math.ceil(this.pages / 8));
  }

  static fromBytes(pages: number, bytes: Uint8Array): BalloonedPages {
    const need = Math.ceil(pages / 8);
    if (bytes.length < need) throw new RangeError(`ballooned-pages bitmap of ${pages} pages needs ${need} bytes, got ${bytes.length}`);
    const words = new Uint32Array(Math.ceil(pages / 32));
    new Uint8Array(words.buffer).set(bytes.subarray(0, need));
    // Bits past `pages` in the last byte are not pages; drop them.
    const tail = pages % 32;
    if (tail !== 0) words[words.length - 1] = words[words.length - 1]! & ((1 << tail) - 1);
    return new BalloonedPages(pages, words);
  }

  /** Calls fn for each maximal run of ballooned pages, ascending. */
  forEachRange(fn: (start: number, count: number) => void): void {
    let runStart = -1;
    for (let w = 0; w < this.words.length; w++) {
      const x = this.words[w]!;
      if (x === 0xffffffff && runStart >= 0) continue;
      if (x === 0 && runStart < 0) continue;
      for (let b = 0; b < 32; b++) {
        const pfn = w * 32 + b;
        const on = pfn < this.pages && ((x >>> b) & 1) === 1;
        if (on && runStart < 0) runStart = pfn;
        else if (!on && runStart >= 0) {
          fn(runStart, pfn - runStart);
          runStart = -1;
        }
      }
    }
    if (runStart >= 0) fn(runStart, this.pages - runStart);
  }

  private apply(start: number, count: number, set: boolean): number {
    if (!(start >= 0 && count >= 0 && start + count <= this.pages)) throw new RangeError(`range ${start}+${count} outside ${this.pages} pages`);
    let changed = 0;
    let pfn = start;
    const end = start + count;
    while (pfn < end) {
      const w = Math.floor(pfn / 32);
      const bit = pfn % 32;
      const n = Math.min(32 - bit, end - pfn);
      const mask = n === 32 ? 0xffffffff : (((1 << n) - 1) << bit) >>> 0;
      const old = this.words[w]!;
      if (set) {
        changed += popcount(~old & mask);
        this.words[w] = old | mask;
      } else {
        changed += popcount(old & mask);
        this.words[w] = old & ~mask;
      }
      pfn += n;
    }
    return changed;
  }
}

export function popcount(x: number): number {
  x = x - ((x >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}
