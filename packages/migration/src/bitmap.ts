// Page bitmaps as the sidecar, the balloon and the guest hand them over: one bit per
// 4 KiB guest page, little-endian 64-bit words (KVM_GET_DIRTY_LOG's layout). With
// little-endian words, bit `pfn` is bit (pfn & 7) of byte (pfn >> 3), so the helpers
// work bytewise and accept any length a peer sent (shorter = the missing pages clear).

export const PAGE_SIZE = 4096;

/** Bytes of a bitmap covering `pages` pages: whole 64-bit words. */
export function bitmapBytes(pages: number): number {
  if (!Number.isSafeInteger(pages) || pages < 0) throw new RangeError(`page count ${pages} is not a non-negative integer`);
  return Math.ceil(pages / 64) * 8;
}

export function newBitmap(pages: number): Uint8Array {
  return new Uint8Array(bitmapBytes(pages));
}

export function testBit(bitmap: Uint8Array, pfn: number): boolean {
  const b = pfn >>> 3;
  return b < bitmap.length && (bitmap[b]! & (1 << (pfn & 7))) !== 0;
}

export function setBit(bitmap: Uint8Array, pfn: number): void {
  bitmap[pfn >>> 3]! |= 1 << (pfn & 7);
}

export function clearBit(bitmap: Uint8Array, pfn: number): void {
  bitmap[pfn >>> 3]! &= ~(1 << (pfn & 7));
}

/** dst |= src over their common length; returns dst. */
export function bitmapOrInto(dst: Uint8Array, src: Uint8Array): Uint8Array {
  const n = Math.min(dst.length, src.length);
  for (let i = 0; i < n; i++) dst[i]! |= src[i]!;
  return dst;
}

/**
 * The union of bitmaps as one bitmap of `pages` pages (bits past `pages` dropped).
 * Empty inputs count as all clear, so a skipped source is simply an empty array.
 */
export function bitmapOr(pages: number, ...maps: Uint8Array[]): Uint8Array {
  const out = newBitmap(pages);
  for (const m of maps) bitmapOrInto(out, m);
  maskTail(out, pages);
  return out;
}

/** Clears the bits at and past `pages` (the padding of the last word). */
export function maskTail(bitmap: Uint8Array, pages: number): void {
  const full = pages >>> 3;
  if (full < bitmap.length && (pages & 7) !== 0) bitmap[full]! &= (1 << (pages & 7)) - 1;
  for (let i = full + ((pages & 7) !== 0 ? 1 : 0); i < bitmap.length; i++) bitmap[i] = 0;
}

const POP8 = new Uint8Array(256);
for (let i = 1; i < 256; i++) POP8[i] = (i & 1) + POP8[i >>> 1]!;

/** Bits set, counting only pages below `pages` when given. */
export function popcount(bitmap: Uint8Array, pages?: number): number {
  let end = bitmap.length;
  let tailMask = 0xff;
  if (pages !== undefined) {
    const full = pages >>> 3;
    if (full < end) {
      end = full;
      tailMask = (1 << (pages & 7)) - 1;
    } else tailMask = 0;
  }
  let n = 0;
  for (let i = 0; i < end; i++) n += POP8[bitmap[i]!]!;
  if (pages !== undefined && end < bitmap.length && tailMask) n += POP8[bitmap[end]! & tailMask]!;
  return n;
}

/** The set pfns in ascending order. */
export function* setPfns(bitmap: Uint8Array, pages = bitmap.length * 8): Generator<number> {
  const end = Math.min(bitmap.length, Math.ceil(pages / 8));
  for (let b = 0; b < end; b++) {
    let v = bitmap[b]!;
    while (v) {
      const bit = 31 - Math.clz32(v & -v);
      const pfn = b * 8 + bit;
      if (pfn >= pages) return;
      yield pfn;
      v &= v - 1;
    }
  }
}
