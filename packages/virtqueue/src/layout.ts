// Split virtqueue layout, virtio 1.2 §2.7: "Virtqueue Part / Alignment / Size".
//
//   Descriptor Table   align 16   16 * N
//   Available Ring     align 2    6 + 2 * N   (flags, idx, ring[N], used_event)
//   Used Ring          align 4    6 + 8 * N   (flags, idx, ring[N]{id,len}, avail_event)
//
// N (Queue Size) is a power of 2, at most 32768 (§2.7).

import { DESC_SIZE, MAX_QUEUE_SIZE } from "./constants";

export interface SplitQueueAddresses {
  /** Queue Size N. */
  size: number;
  /** Guest-physical address of the descriptor table (Descriptor Area). */
  descAddr: number;
  /** Guest-physical address of the available ring (Driver Area). */
  availAddr: number;
  /** Guest-physical address of the used ring (Device Area). */
  usedAddr: number;
}

export interface SplitQueueLayout extends SplitQueueAddresses {
  /** First byte after the used ring. */
  end: number;
  /** end - base. */
  bytes: number;
}

export const descTableBytes = (size: number): number => DESC_SIZE * size;
export const availRingBytes = (size: number): number => 6 + 2 * size;
export const usedRingBytes = (size: number): number => 6 + 8 * size;

export function isValidQueueSize(size: number): boolean {
  return Number.isInteger(size) && size >= 1 && size <= MAX_QUEUE_SIZE && (size & (size - 1)) === 0;
}

const alignUp = (x: number, a: number): number => Math.ceil(x / a) * a;

export interface LayoutOptions {
  /**
   * Alignment of the used ring. 4 is the §2.7 minimum; pass 4096 for the
   * legacy layout (§2.7.2) or to keep the device-written part on its own page,
   * which keeps the device dirty log from dirtying the driver's pages.
   */
  usedAlign?: number;
}

/**
 * Packs one split queue at or after `base`: descriptor table (16-aligned), then
 * the available ring, then the used ring (4-aligned, or `usedAlign`).
 */
export function splitQueueLayout(size: number, base = 0, opts: LayoutOptions = {}): SplitQueueLayout {
  if (!isValidQueueSize(size)) throw new RangeError(`queue size ${size} is not a power of 2 in [1, 32768] (virtio 1.2 §2.7)`);
  if (!Number.isSafeInteger(base) || base < 0) throw new RangeError(`layout base ${base} must be a non-negative integer`);
  const usedAlign = opts.usedAlign ?? 4;
  if (usedAlign < 4 || (usedAlign & (usedAlign - 1)) !== 0) throw new RangeError(`usedAlign ${usedAlign} must be a power of 2 >= 4`);
  const descAddr = alignUp(base, 16);
  const availAddr = descAddr + descTableBytes(size); // 16*N keeps 2-alignment
  const usedAddr = alignUp(availAddr + availRingBytes(size), usedAlign);
  const end = usedAddr + usedRingBytes(size);
  return { size, descAddr, availAddr, usedAddr, end, bytes: end - base };
}

export enum QueueConfigErrorCode {
  BadQueueSize = "BAD_QUEUE_SIZE",
  Misaligned = "MISALIGNED",
  OutOfMemory = "RING_OUTSIDE_GUEST_MEMORY",
}

/** A queue configuration the device must refuse (vhost: VHOST_SET_VRING_NUM / _ADDR return EINVAL). */
export class QueueConfigError extends Error {
  override readonly name = "QueueConfigError";
  constructor(
    readonly code: QueueConfigErrorCode,
    readonly section: string,
    message: string,
  ) {
    super(`${message} (virtio 1.2 ${section})`);
  }
}

/** Checks a driver-supplied queue placement against §2.7 / §2.7.1 and the guest memory size. */
export function checkQueueAddresses(q: SplitQueueAddresses, memSize: number): QueueConfigError | null {
  if (!isValidQueueSize(q.size)) {
    return new QueueConfigError(QueueConfigErrorCode.BadQueueSize, "§2.7", `queue size ${q.size} is not a power of 2 in [1, 32768]`);
  }
  const parts: Array<[string, number, number, number]> = [
    ["descriptor table", q.descAddr, 16, descTableBytes(q.size)],
    ["available ring", q.availAddr, 2, availRingBytes(q.size)],
    ["used ring", q.usedAddr, 4, usedRingBytes(q.size)],
  ];
  for (const [name, addr, align, len] of parts) {
    if (!Number.isSafeInteger(addr) || addr < 0 || addr + len > memSize) {
      return new QueueConfigError(QueueConfigErrorCode.OutOfMemory, "§2.7", `${name} [0x${addr.toString(16)}, +${len}) is outside guest memory of ${memSize} bytes`);
    }
    if (addr % align !== 0) {
      return new QueueConfigError(QueueConfigErrorCode.Misaligned, "§2.7.1", `${name} at 0x${addr.toString(16)} is not ${align}-byte aligned`);
    }
  }
  return null;
}
