// Constants from virtio 1.2 (cs01) §2.7 and §6, and include/uapi/linux/virtio_ring.h.

/** §2.7.5: buffer continues via `next`. */
export const VIRTQ_DESC_F_NEXT = 1;
/** §2.7.5: buffer is device write-only (otherwise device read-only). */
export const VIRTQ_DESC_F_WRITE = 2;
/** §2.7.5.3: buffer holds a table of descriptors. */
export const VIRTQ_DESC_F_INDIRECT = 4;

/** §2.7.6 / §2.7.7: driver asks the device not to send used buffer notifications (no EVENT_IDX). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** §2.7.8 / §2.7.10: device asks the driver not to send available buffer notifications (no EVENT_IDX). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;

/** §6 feature bits. */
export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
export const VIRTIO_F_INDIRECT_DESC = 28;
export const VIRTIO_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;
export const VIRTIO_F_RING_PACKED = 34;

/** §2.1: device status bit the device sets when it needs a reset. */
export const VIRTIO_CONFIG_S_NEEDS_RESET = 64;

/** §2.7: "The maximum Queue Size value is 32768." */
export const MAX_QUEUE_SIZE = 32768;

export const DESC_SIZE = 16;
