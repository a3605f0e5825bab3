/**
 * vring_need_event from include/uapi/linux/virtio_ring.h, the arithmetic behind
 * VIRTIO_F_EVENT_IDX (§2.7.7.2 for used_event, §2.7.10.1 for avail_event).
 *
 * The other side asked to be notified once the index moves past `eventIdx`
 * (i.e. once entry `eventIdx` is written). We just moved the index from `oldIdx`
 * to `newIdx`. Notify iff eventIdx lies in the half-open window [oldIdx, newIdx),
 * computed modulo 2^16 so it works across the 65535 -> 0 wrap:
 *
 *     (u16)(new - event - 1) < (u16)(new - old)
 *
 * All arguments are 16-bit ring indexes (free-running, wrapping at 65536).
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
