// struct virtio_blk_req (virtio 1.2 §5.2.6) in guest memory:
//   le32 type; le32 reserved; le64 sector;   (device-readable, 16 bytes)
//   u8 data[];                               (readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID)
//   u8 status;                               (device-writable, last byte of the chain)
//
// parseBlkRequest is the device side: every check the device makes on a popped chain
// before it touches the backend (the seed's vhost_blk_handle_guest_kick header checks,
// QEMU's hw/block/virtio-blk.c virtio_blk_handle_request). It writes into a BlkRequest
// made once per queue and returns it, or a BlkRequestError: fatal (the device enters
// NEEDS_RESET, no status byte can be written) or a status byte to complete with.
import type { DescriptorChain, MemoryAccessor } from "@virtmesh/virtqueue";
import {
  BLK_HDR_BYTES,
  DISCARD_WZ_SEG_BYTES,
  SECTOR_SIZE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
  hasFeature,
} from "./constants";

/** Writes a request header at guest address `addr` (driver side). */
export function writeBlkHeader(mem: MemoryAccessor, addr: number, type: number, sector: number): void {
  mem.writeU32(addr, type);
  mem.writeU32(addr + 4, 0);
  mem.writeU32(addr + 8, sector >>> 0);
  mem.writeU32(addr + 12, Math.floor(sector / 0x1_0000_0000));
}

/** Writes one struct virtio_blk_discard_write_zeroes segment (driver side). */
export function writeDiscardSegment(mem: MemoryAccessor, addr: number, sector: number, numSectors: number, flags: number): void {
  mem.writeU32(addr, sector >>> 0);
  mem.writeU32(addr + 4, Math.floor(sector / 0x1_0000_0000));
  mem.writeU32(addr + 8, numSectors);
  mem.writeU32(addr + 12, flags);
}

/** What the device advertises and serves (virtio-blk config space, §5.2.4) plus the backend's size. */
export interface BlkLimits {
  /** Negotiated features: DISCARD / WRITE_ZEROES are served only when negotiated (§5.2.6.2). */
  features: bigint;
  /** Disk size in bytes (config capacity * 512). */
  capacityBytes: number;
  /** Most data segments one IN/OUT request may carry (config seg_max). */
  segMax: number;
  /** Most segments per DISCARD / WRITE_ZEROES request (config max_discard_seg / max_write_zeroes_seg). */
  maxDiscardSeg: number;
  /** Most bytes one DISCARD / WRITE_ZEROES segment may cover (config max_*_sectors * 512). */
  maxZeroesBytes: number;
}

/** Most data segments one request may carry (what vhost-worker offers as seg_max). */
export const BLK_SEG_MAX = 64;
/** Most bytes one DISCARD / WRITE_ZEROES segment may cover. */
export const BLK_MAX_ZEROES_BYTES = 64 << 20;
/** Most DISCARD / WRITE_ZEROES segments per request. */
export const BLK_MAX_DISCARD_SEG = 16;

/** Why a chain was refused. */
export enum BlkRequestErrorCode {
  /** No device-writable byte at the end of the chain for the status (§5.2.6): fatal. */
  NoStatusByte = "no-status-byte",
  /** Fewer than 16 device-readable bytes for struct virtio_blk_req (§5.2.6): fatal. */
  ShortHeader = "short-header",
  /** A type the device does not serve (§5.2.6.1: VIRTIO_BLK_S_UNSUPP). */
  UnsupportedType = "unsupported-type",
  /** IN/OUT data not a positive multiple of 512 bytes (§5.2.6.1). */
  BadDataLength = "bad-data-length",
  /** IN/OUT/DISCARD/WRITE_ZEROES past the capacity (§5.2.6.1: IOERR). */
  OutOfRange = "out-of-range",
  /** More data segments than seg_max (§5.2.4). */
  TooManySegments = "too-many-segments",
  /** DISCARD / WRITE_ZEROES without the feature negotiated (§5.2.6.2: UNSUPP). */
  FeatureNotNegotiated = "feature-not-negotiated",
  /** DISCARD / WRITE_ZEROES payload not a positive multiple of 16 bytes, or above max_discard_seg (§5.2.6.2). */
  BadSegmentTable = "bad-segment-table",
  /** DISCARD with the unmap flag, or unknown flags (§5.2.6.2: UNSUPP). */
  BadSegmentFlags = "bad-segment-flags",
  /** One DISCARD / WRITE_ZEROES segment above max_*_sectors (§5.2.6.2). */
  SegmentTooLarge = "segment-too-large",
}

/**
 * A refused chain. `fatal`: the device cannot answer it (no status byte, or the header
 * is unreadable) and enters NEEDS_RESET (§2.1.2, QEMU's virtio_error). Otherwise the
 * device completes the head with `status` (IOERR / UNSUPP), used len 1, at `statusAddr`.
 */
export class BlkRequestError {
  constructor(
    readonly code: BlkRequestErrorCode,
    readonly head: number,
    readonly fatal: boolean,
    readonly status: number,
    readonly statusAddr: number,
    readonly type: number,
    readonly message: string,
  ) {}
}

/** A checked request, written by parseBlkRequest (one per queue, reused: no allocation per request). */
export class BlkRequest {
  head = -1;
  type = 0;
  /** First sector (exact up to 2^53). */
  sector = 0;
  /** Guest address of the status byte: the last byte of the last non-empty writable descriptor (§5.2.6). */
  statusAddr = 0;
  /** IN / OUT: data bytes; GET_ID: room for the serial (writable bytes before the status). */
  dataBytes = 0;
  /** Used len to report (§2.7.8.2): IN data + status; 1 otherwise (GET_ID: set by the device from what it wrote). */
  usedLen = 1;
  /** IN / OUT data ranges, header and status byte excluded. */
  segCount = 0;
  readonly segAddr: Float64Array;
  readonly segLen: Uint32Array;
  /** DISCARD / WRITE_ZEROES ranges in bytes. */
  zeroCount = 0;
  readonly zeroPos: Float64Array;
  readonly zeroLen: Float64Array;

  constructor(segMax = BLK_SEG_MAX, maxDiscardSeg = BLK_MAX_DISCARD_SEG) {
    this.segAddr = new Float64Array(segMax);
    this.segLen = new Uint32Array(segMax);
    this.zeroPos = new Float64Array(maxDiscardSeg);
    this.zeroLen = new Float64Array(maxDiscardSeg);
  }

  get isWrite(): boolean {
    return this.type === VIRTIO_BLK_T_OUT;
  }
}

const scratch = new Uint8Array(BLK_HDR_BYTES);
const scratchView = new DataView(scratch.buffer);

/** Copies `scratch.length` device-readable bytes of the chain starting `skip` bytes in (DeviceQueue.readChain's walk). */
function readReadable(chain: DescriptorChain, mem: MemoryAccessor, skip: number): void {
  let copied = 0;
  for (let i = 0; i < chain.readableCount && copied < BLK_HDR_BYTES; i++) {
    let len = chain.len[i]!;
    if (skip >= len) {
      skip -= len;
      continue;
    }
    const addr = chain.addr[i]! + skip;
    len -= skip;
    skip = 0;
    const n = Math.min(len, BLK_HDR_BYTES - copied);
    mem.read(addr, scratch.subarray(copied, copied + n));
    copied += n;
  }
}

/** A non-fatal refusal of the request in `out` (head, type and status address are set). */
function refuse(out: BlkRequest, code: BlkRequestErrorCode, status: number, msg: string): BlkRequestError {
  return new BlkRequestError(code, out.head, false, status, out.statusAddr, out.type, `head ${out.head}: ${msg}`);
}

const u64 = (off: number): number => scratchView.getUint32(off, true) + scratchView.getUint32(off + 4, true) * 0x1_0000_0000;

/**
 * Checks one popped chain as a virtio-blk request. The chain's addresses were already
 * checked against guest memory by the walk (§2.7.5, DeviceQueue.pop), so reads here
 * stay inside it. Writes nothing to guest memory.
 */
export function parseBlkRequest(chain: DescriptorChain, memory: MemoryAccessor, limits: BlkLimits, out: BlkRequest = new BlkRequest(limits.segMax, limits.maxDiscardSeg)): BlkRequest | BlkRequestError {
  const head = chain.head;
  // §5.2.6: the status byte is the last device-writable byte (trailing empty descriptors skipped).
  // QEMU virtio_blk_handle_request: "virtio-blk request inhdr too short" -> virtio_error.
  let last = chain.count - 1;
  while (last >= chain.readableCount && chain.len[last] === 0) last--;
  if (chain.writableBytes < 1 || last < chain.readableCount) {
    return new BlkRequestError(BlkRequestErrorCode.NoStatusByte, head, true, 0, 0, -1, `head ${head}: no device-writable status byte (§5.2.6)`);
  }
  const statusAddr = chain.addr[last]! + chain.len[last]! - 1;
  // Seed: "Bad block header length" (vq_err); QEMU: "virtio-blk request outhdr too short" -> virtio_error.
  if (chain.readableBytes < BLK_HDR_BYTES) {
    return new BlkRequestError(BlkRequestErrorCode.ShortHeader, head, true, 0, statusAddr, -1, `head ${head}: request header of ${chain.readableBytes} bytes, need ${BLK_HDR_BYTES} (§5.2.6)`);
  }
  readReadable(chain, memory, 0);
  const type = scratchView.getUint32(0, true);
  const sector = u64(8);
  out.head = head;
  out.type = type;
  out.sector = sector;
  out.statusAddr = statusAddr;
  out.usedLen = 1;
  out.dataBytes = 0;
  out.segCount = 0;
  out.zeroCount = 0;

  switch (type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
      const isWrite = type === VIRTIO_BLK_T_OUT;
      // IN: data = writable bytes minus the status byte; OUT: readable bytes after the header.
      const dataBytes = isWrite ? chain.readableBytes - BLK_HDR_BYTES : chain.writableBytes - 1;
      // §5.2.6.1: "The length of data MUST be a multiple of 512 bytes" for IN and OUT.
      if (dataBytes % SECTOR_SIZE !== 0 || dataBytes === 0) return refuse(out, BlkRequestErrorCode.BadDataLength, VIRTIO_BLK_S_IOERR, `data of ${dataBytes} bytes is not a positive multiple of ${SECTOR_SIZE} (§5.2.6.1)`);
      // §5.2.6.1: a request past the capacity fails with IOERR (and sector*512 must stay exact).
      if (sector > Number.MAX_SAFE_INTEGER / SECTOR_SIZE || sector * SECTOR_SIZE + dataBytes > limits.capacityBytes) {
        return refuse(out, BlkRequestErrorCode.OutOfRange, VIRTIO_BLK_S_IOERR, `sector ${sector} + ${dataBytes} bytes is past the capacity of ${limits.capacityBytes} bytes (§5.2.6.1)`);
      }
      if (!collectSegments(chain, out, isWrite, dataBytes, limits.segMax)) return refuse(out, BlkRequestErrorCode.TooManySegments, VIRTIO_BLK_S_IOERR, `more than seg_max ${limits.segMax} data segments (§5.2.4)`);
      out.dataBytes = dataBytes;
      out.usedLen = isWrite ? 1 : dataBytes + 1;
      return out;
    }
    case VIRTIO_BLK_T_FLUSH:
      return out;
    case VIRTIO_BLK_T_GET_ID:
      // §5.2.6: up to VIRTIO_BLK_ID_BYTES of serial into the data buffer, before the status byte.
      out.dataBytes = chain.writableBytes - 1;
      return out;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
      return parseDiscardOrZeroes(chain, memory, limits, out);
    default:
      // §5.2.6.1: "the device MUST set the status byte to VIRTIO_BLK_S_UNSUPP" for a type
      // it does not offer (the seed discarded the chain instead).
      return refuse(out, BlkRequestErrorCode.UnsupportedType, VIRTIO_BLK_S_UNSUPP, `request type ${type} is not served (§5.2.6.1)`);
  }
}

/** Data ranges of an IN/OUT request, skipping the header (OUT) or the status byte (IN). False above segMax. */
function collectSegments(c: DescriptorChain, out: BlkRequest, isWrite: boolean, dataBytes: number, segMax: number): boolean {
  let skip = isWrite ? BLK_HDR_BYTES : 0;
  let remaining = dataBytes;
  const from = isWrite ? 0 : c.readableCount;
  const to = isWrite ? c.readableCount : c.count;
  let n = 0;
  for (let i = from; i < to && remaining > 0; i++) {
    let a = c.addr[i]!;
    let l = c.len[i]!;
    if (skip >= l) {
      skip -= l;
      continue;
    }
    a += skip;
    l -= skip;
    skip = 0;
    if (l > remaining) l = remaining;
    if (n >= segMax || n >= out.segAddr.length) return false;
    out.segAddr[n] = a;
    out.segLen[n] = l;
    n++;
    remaining -= l;
  }
  out.segCount = n;
  return true;
}

function parseDiscardOrZeroes(
  chain: DescriptorChain,
  memory: MemoryAccessor,
  limits: BlkLimits,
  out: BlkRequest,
): BlkRequest | BlkRequestError {
  const discard = out.type === VIRTIO_BLK_T_DISCARD;
  // §5.2.6.2: only with VIRTIO_BLK_F_DISCARD / VIRTIO_BLK_F_WRITE_ZEROES negotiated.
  if (!hasFeature(limits.features, discard ? VIRTIO_BLK_F_DISCARD : VIRTIO_BLK_F_WRITE_ZEROES)) {
    return refuse(out, BlkRequestErrorCode.FeatureNotNegotiated, VIRTIO_BLK_S_UNSUPP, `${discard ? "DISCARD" : "WRITE_ZEROES"} without its feature negotiated (§5.2.6.2)`);
  }
  const payload = chain.readableBytes - BLK_HDR_BYTES;
  const max = Math.min(limits.maxDiscardSeg, out.zeroPos.length);
  // §5.2.6: the data is an array of struct virtio_blk_discard_write_zeroes.
  if (payload <= 0 || payload % DISCARD_WZ_SEG_BYTES !== 0 || payload / DISCARD_WZ_SEG_BYTES > max) {
    return refuse(out, BlkRequestErrorCode.BadSegmentTable, VIRTIO_BLK_S_IOERR, `segment table of ${payload} bytes is not 1..${max} segments of ${DISCARD_WZ_SEG_BYTES} bytes (§5.2.6.2)`);
  }
  const segs = payload / DISCARD_WZ_SEG_BYTES;
  for (let i = 0; i < segs; i++) {
    readReadable(chain, memory, BLK_HDR_BYTES + i * DISCARD_WZ_SEG_BYTES);
    const sector = u64(0);
    const count = scratchView.getUint32(8, true);
    const flags = scratchView.getUint32(12, true);
    // §5.2.6.2: DISCARD with the unmap flag set, or flags other than unmap -> UNSUPP.
    if ((discard && flags !== 0) || (flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) {
      return refuse(out, BlkRequestErrorCode.BadSegmentFlags, VIRTIO_BLK_S_UNSUPP, `segment ${i} flags 0x${flags.toString(16)} are not allowed (§5.2.6.2)`);
    }
    const len = count * SECTOR_SIZE;
    if (len > limits.maxZeroesBytes) return refuse(out, BlkRequestErrorCode.SegmentTooLarge, VIRTIO_BLK_S_IOERR, `segment ${i} of ${len} bytes is above ${limits.maxZeroesBytes} (§5.2.6.2)`);
    if (sector > Number.MAX_SAFE_INTEGER / SECTOR_SIZE || sector * SECTOR_SIZE + len > limits.capacityBytes) {
      return refuse(out, BlkRequestErrorCode.OutOfRange, VIRTIO_BLK_S_IOERR, `segment ${i} (sector ${sector}, ${count} sectors) is past the capacity (§5.2.6.2)`);
    }
    out.zeroPos[i] = sector * SECTOR_SIZE;
    out.zeroLen[i] = len;
  }
  out.zeroCount = segs;
  return out;
}

export { BLK_HDR_BYTES, DISCARD_WZ_SEG_BYTES };
