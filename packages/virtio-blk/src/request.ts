// struct virtio_blk_req (virtio 1.2 §5.2.6) in guest memory:
//   le32 type; le32 reserved; le64 sector;   (device-readable, 16 bytes)
//   u8 data[];                               (readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID)
//   u8 status;                               (device-writable, last byte of the chain)
import type { MemoryAccessor } from "@virtmesh/virtqueue";
import { BLK_HDR_BYTES, DISCARD_WZ_SEG_BYTES } from "./constants";

/** Writes a request header at guest address `addr` (driver side). */
export function writeBlkHeader(mem: MemoryAccessor, addr: number, type: number, sector: number): void {
  mem.writeU32(addr, type);
  mem.writeU32(addr + 4, 0);
  mem.writeU32(addr + 8, sector >>> 0);
  mem.writeU32(addr + 12, Math.floor(sector / 0x1_0000_0000));
}

/** Decoded header from the 16 bytes in `hdr` (device side; sector exact up to 2^53). */
export function blkHeaderType(hdr: DataView): number {
  return hdr.getUint32(0, true);
}
export function blkHeaderSector(hdr: DataView): number {
  return hdr.getUint32(8, true) + hdr.getUint32(12, true) * 0x1_0000_0000;
}

/** Writes one struct virtio_blk_discard_write_zeroes segment (driver side). */
export function writeDiscardSegment(mem: MemoryAccessor, addr: number, sector: number, numSectors: number, flags: number): void {
  mem.writeU32(addr, sector >>> 0);
  mem.writeU32(addr + 4, Math.floor(sector / 0x1_0000_0000));
  mem.writeU32(addr + 8, numSectors);
  mem.writeU32(addr + 12, flags);
}

export { BLK_HDR_BYTES, DISCARD_WZ_SEG_BYTES };
