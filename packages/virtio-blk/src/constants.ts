// virtio-blk (virtio 1.2 cs01 §5.2, include/uapi/linux/virtio_blk.h) and the vhost
// ioctl constants of seed 000 (drivers/vhost/blk.c, include/linux/vhost.h).
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1 } from "@virtmesh/virtqueue";

/** §5.2.6: struct virtio_blk_req { le32 type; le32 reserved; le64 sector; } */
export const BLK_HDR_BYTES = 16;
/** §5.2.6: sectors are always 512 bytes, whatever blk_size says. */
export const SECTOR_SIZE = 512;
export const SECTOR_SHIFT = 9;
/** §5.2.6: GET_ID returns a 20-byte serial, not NUL-terminated if 20 long. */
export const VIRTIO_BLK_ID_BYTES = 20;

/** §5.2.6 request types. */
export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_DISCARD = 11;
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;

/** §5.2.6 status byte values. */
export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;

/** §5.2.3 feature bits. */
export const VIRTIO_BLK_F_SEG_MAX = 2;
export const VIRTIO_BLK_F_BLK_SIZE = 6;
export const VIRTIO_BLK_F_FLUSH = 9;
export const VIRTIO_BLK_F_DISCARD = 13;
export const VIRTIO_BLK_F_WRITE_ZEROES = 14;

/** include/linux/vhost.h: "Log all write descriptors. Can be changed while device is active." */
export const VHOST_F_LOG_ALL = 26;

/** §5.2.6: struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; } */
export const DISCARD_WZ_SEG_BYTES = 16;
/** §5.2.6: flags bit 0 of a WRITE_ZEROES segment. */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

export const bit = (n: number): bigint => 1n << BigInt(n);

/**
 * What vhost-worker offers: the seed's VHOST_BLK_FEATURES (NOTIFY_ON_EMPTY,
 * INDIRECT_DESC, EVENT_IDX, VHOST_F_LOG_ALL) plus VERSION_1 and the virtio-blk
 * request types it serves (FLUSH, DISCARD, WRITE_ZEROES).
 */
export const VHOST_BLK_FEATURES: bigint =
  bit(VIRTIO_F_NOTIFY_ON_EMPTY) |
  bit(VIRTIO_F_INDIRECT_DESC) |
  bit(VIRTIO_F_EVENT_IDX) |
  bit(VHOST_F_LOG_ALL) |
  bit(VIRTIO_F_VERSION_1) |
  bit(VIRTIO_BLK_F_FLUSH) |
  bit(VIRTIO_BLK_F_DISCARD) |
  bit(VIRTIO_BLK_F_WRITE_ZEROES) |
  bit(VIRTIO_BLK_F_BLK_SIZE) |
  bit(VIRTIO_BLK_F_SEG_MAX);

export function hasFeature(features: bigint, n: number): boolean {
  return (features & bit(n)) !== 0n;
}

/** Name of a request type for messages. */
export function blkTypeName(t: number): string {
  switch (t) {
    case VIRTIO_BLK_T_IN:
      return "IN";
    case VIRTIO_BLK_T_OUT:
      return "OUT";
    case VIRTIO_BLK_T_FLUSH:
      return "FLUSH";
    case VIRTIO_BLK_T_GET_ID:
      return "GET_ID";
    case VIRTIO_BLK_T_DISCARD:
      return "DISCARD";
    case VIRTIO_BLK_T_WRITE_ZEROES:
      return "WRITE_ZEROES";
    default:
      return `type ${t}`;
  }
}
