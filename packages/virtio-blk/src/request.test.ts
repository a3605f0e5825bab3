// parseBlkRequest over a real split queue: a DriverQueue builds the chains in a plain
// buffer, a DeviceQueue pops them, the parser checks them. One case per rule the e2e
// hostile test (e2e/vhost-blk-hostile.test.ts) exercises through the live worker.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { ChainError, DeviceQueue, DriverQueue, GuestMemory, splitQueueLayout, type BufferSegment, type DescriptorChain } from "@virtmesh/virtqueue";
import {
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
  bit,
} from "./constants";
import {
  BLK_MAX_DISCARD_SEG,
  BLK_MAX_ZEROES_BYTES,
  BLK_SEG_MAX,
  BlkRequest,
  BlkRequestError,
  BlkRequestErrorCode,
  parseBlkRequest,
  writeBlkHeader,
  writeDiscardSegment,
  type BlkLimits,
} from "./request";

const CAP = 1 << 20;
const HDR = 0x8000;
const DATA = 0x10000;
const STATUS = 0x9000;
const ALL = bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);

function rig(features = ALL, size = 128) {
  const mem = new GuestMemory(new ArrayBuffer(1 << 20));
  const layout = splitQueueLayout(size, 0);
  const cfg = { ...layout, size, eventIdx: false, indirect: true, notifyOnEmpty: false };
  const driver = new DriverQueue(mem, cfg, { indirectArea: { addr: 0x40000, maxIndirect: 128 } });
  const device = new DeviceQueue(mem, cfg);
  const chain = device.newChain();
  const limits: BlkLimits = { features, capacityBytes: CAP, segMax: BLK_SEG_MAX, maxDiscardSeg: BLK_MAX_DISCARD_SEG, maxZeroesBytes: BLK_MAX_ZEROES_BYTES };
  const out = new BlkRequest();
  /** Adds one chain, pops it and parses it. */
  const parse = (readable: BufferSegment[], writable: BufferSegment[], indirect = false): BlkRequest | BlkRequestError => {
    assert.ok(driver.add(readable, writable, indirect) >= 0);
    const c = device.pop(chain);
    assert.ok(c !== null && !(c instanceof ChainError), "the chain walks");
    return parseBlkRequest(c as DescriptorChain, mem.device, limits, out);
  };
  const hdr = (type: number, sector: number) => writeBlkHeader(mem.vcpu, HDR, type, sector);
  return { mem, parse, hdr, device, chain, out };
}

function refused(r: BlkRequest | BlkRequestError, code: BlkRequestErrorCode, status: number): BlkRequestError {
  assert.ok(r instanceof BlkRequestError, `refused with ${code}`);
  assert.equal(r.code, code);
  assert.equal(r.fatal, false);
  assert.equal(r.status, status);
  assert.equal(r.statusAddr, STATUS);
  return r;
}

const H = [{ addr: HDR, len: 16 }];
const S = [{ addr: STATUS, len: 1 }];

test("IN: data segments exclude the status byte; used len = data + 1", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_IN, 8);
  const r = t.parse(H, [{ addr: DATA, len: 4096 }, { addr: STATUS, len: 1 }]);
  assert.ok(r instanceof BlkRequest);
  assert.deepEqual([r.type, r.sector, r.dataBytes, r.usedLen, r.segCount, r.segAddr[0], r.segLen[0], r.statusAddr, r.isWrite], [VIRTIO_BLK_T_IN, 8, 4096, 4097, 1, DATA, 4096, STATUS, false]);
});

test("IN: the status byte may share the last data descriptor, trailing empty descriptors are skipped (§5.2.6)", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_IN, 0);
  const r = t.parse(H, [{ addr: DATA, len: 513 }, { addr: DATA + 4096, len: 0 }]);
  assert.ok(r instanceof BlkRequest);
  assert.deepEqual([r.dataBytes, r.statusAddr, r.segCount, r.segLen[0]], [512, DATA + 512, 1, 512]);
});

test("OUT: header split across descriptors, data after the header, used len 1", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_OUT, 16);
  const r = t.parse([{ addr: HDR, len: 10 }, { addr: HDR + 10, len: 6 + 512 }, { addr: DATA, len: 1024 }], S);
  assert.ok(r instanceof BlkRequest);
  assert.deepEqual([r.sector, r.dataBytes, r.usedLen, r.segCount, r.segAddr[0], r.segLen[0], r.segAddr[1], r.segLen[1], r.isWrite], [16, 1536, 1, 2, HDR + 16, 512, DATA, 1024, true]);
});

test("FLUSH and GET_ID are accepted; GET_ID's room is the writable bytes before the status", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_FLUSH, 0);
  assert.ok(t.parse(H, S) instanceof BlkRequest);
  t.hdr(VIRTIO_BLK_T_GET_ID, 0);
  const r = t.parse(H, [{ addr: DATA, len: 20 }, { addr: STATUS, len: 1 }]);
  assert.ok(r instanceof BlkRequest);
  assert.equal(r.dataBytes, 20);
});

test("unknown type -> UNSUPP (§5.2.6.1)", () => {
  const t = rig();
  t.hdr(99, 0);
  const e = refused(t.parse(H, S), BlkRequestErrorCode.UnsupportedType, VIRTIO_BLK_S_UNSUPP);
  assert.equal(e.type, 99);
});

test("IN crossing the capacity -> IOERR; OUT at sector 2^50 (beyond 2^53 bytes) -> IOERR", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_IN, CAP / 512 - 1);
  refused(t.parse(H, [{ addr: DATA, len: 4096 }, ...S]), BlkRequestErrorCode.OutOfRange, VIRTIO_BLK_S_IOERR);
  t.hdr(VIRTIO_BLK_T_OUT, 2 ** 50);
  refused(t.parse([...H, { addr: DATA, len: 512 }], S), BlkRequestErrorCode.OutOfRange, VIRTIO_BLK_S_IOERR);
  // Exactly up to the end is fine.
  t.hdr(VIRTIO_BLK_T_IN, CAP / 512 - 8);
  assert.ok(t.parse(H, [{ addr: DATA, len: 4096 }, ...S]) instanceof BlkRequest);
});

test("IN/OUT data not a positive multiple of 512 -> IOERR (§5.2.6.1)", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_IN, 0);
  refused(t.parse(H, [{ addr: DATA, len: 100 }, ...S]), BlkRequestErrorCode.BadDataLength, VIRTIO_BLK_S_IOERR);
  t.hdr(VIRTIO_BLK_T_OUT, 0);
  refused(t.parse(H, S), BlkRequestErrorCode.BadDataLength, VIRTIO_BLK_S_IOERR);
});

test("more data segments than seg_max -> IOERR", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_IN, 0);
  const segs = Array.from({ length: BLK_SEG_MAX + 1 }, (_, i) => ({ addr: DATA + i * 512, len: 512 }));
  refused(t.parse(H, [...segs, ...S], true), BlkRequestErrorCode.TooManySegments, VIRTIO_BLK_S_IOERR);
  assert.ok(t.parse(H, [...segs.slice(1), ...S], true) instanceof BlkRequest);
});

test("DISCARD / WRITE_ZEROES without the feature -> UNSUPP (§5.2.6.2)", () => {
  const t = rig(0n);
  t.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
  writeDiscardSegment(t.mem.vcpu, HDR + 16, 0, 8, 0);
  refused(t.parse([{ addr: HDR, len: 32 }], S), BlkRequestErrorCode.FeatureNotNegotiated, VIRTIO_BLK_S_UNSUPP);
  t.hdr(VIRTIO_BLK_T_DISCARD, 0);
  refused(t.parse([{ addr: HDR, len: 32 }], S), BlkRequestErrorCode.FeatureNotNegotiated, VIRTIO_BLK_S_UNSUPP);
});

test("DISCARD with the unmap flag, or unknown flags -> UNSUPP; WRITE_ZEROES with unmap is fine", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_DISCARD, 0);
  writeDiscardSegment(t.mem.vcpu, HDR + 16, 0, 8, 1);
  refused(t.parse([{ addr: HDR, len: 32 }], S), BlkRequestErrorCode.BadSegmentFlags, VIRTIO_BLK_S_UNSUPP);
  t.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
  writeDiscardSegment(t.mem.vcpu, HDR + 16, 0, 8, 2);
  refused(t.parse([{ addr: HDR, len: 32 }], S), BlkRequestErrorCode.BadSegmentFlags, VIRTIO_BLK_S_UNSUPP);
  writeDiscardSegment(t.mem.vcpu, HDR + 16, 8, 8, 1);
  const r = t.parse([{ addr: HDR, len: 32 }], S);
  assert.ok(r instanceof BlkRequest);
  assert.deepEqual([r.zeroCount, r.zeroPos[0], r.zeroLen[0]], [1, 4096, 4096]);
});

test("WRITE_ZEROES past the capacity, too large, or a bad segment table -> IOERR", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
  writeDiscardSegment(t.mem.vcpu, HDR + 16, CAP / 512 - 4, 8, 0);
  refused(t.parse([{ addr: HDR, len: 32 }], S), BlkRequestErrorCode.OutOfRange, VIRTIO_BLK_S_IOERR);
  writeDiscardSegment(t.mem.vcpu, HDR + 16, 0, BLK_MAX_ZEROES_BYTES / 512 + 1, 0);
  refused(t.parse([{ addr: HDR, len: 32 }], S), BlkRequestErrorCode.SegmentTooLarge, VIRTIO_BLK_S_IOERR);
  refused(t.parse([{ addr: HDR, len: 16 + 8 }], S), BlkRequestErrorCode.BadSegmentTable, VIRTIO_BLK_S_IOERR);
  refused(t.parse(H, S), BlkRequestErrorCode.BadSegmentTable, VIRTIO_BLK_S_IOERR);
  refused(t.parse([{ addr: HDR, len: 16 + 16 * (BLK_MAX_DISCARD_SEG + 1) }], S), BlkRequestErrorCode.BadSegmentTable, VIRTIO_BLK_S_IOERR);
});

test("a header of 8 bytes, or no device-writable status byte, is fatal (NEEDS_RESET)", () => {
  const t = rig();
  t.hdr(VIRTIO_BLK_T_IN, 0);
  const short = t.parse([{ addr: HDR, len: 8 }], S);
  assert.ok(short instanceof BlkRequestError && short.fatal);
  assert.equal(short.code, BlkRequestErrorCode.ShortHeader);
  assert.match(short.message, /request header of 8 bytes/);
  const none = t.parse([{ addr: HDR, len: 16 }, { addr: DATA, len: 512 }], []);
  assert.ok(none instanceof BlkRequestError && none.fatal);
  assert.equal(none.code, BlkRequestErrorCode.NoStatusByte);
  const empty = t.parse(H, [{ addr: STATUS, len: 0 }]);
  assert.ok(empty instanceof BlkRequestError && empty.code === BlkRequestErrorCode.NoStatusByte);
});

test("a buffer outside guest memory never reaches the parser: the walk refuses it (§2.7.5)", () => {
  const t = rig();
  const v = t.mem.vcpu;
  const layout = splitQueueLayout(128, 0);
  // A raw one-descriptor chain whose address is 2^40, past DriverQueue's own checks.
  v.writeU32(layout.descAddr, 0);
  v.writeU32(layout.descAddr + 4, 2 ** 8);
  v.writeU32(layout.descAddr + 8, 16);
  v.writeU16(layout.descAddr + 12, 0);
  v.writeU16(layout.availAddr + 4, 0);
  v.storeU16Atomic(layout.availAddr + 2, 1);
  const r = t.device.pop(t.chain);
  assert.ok(r instanceof ChainError);
  assert.match(r.message, /outside guest memory/);
});

test("property: any accepted IN/OUT stays inside the capacity and its segments sum to the data", () => {
  fc.assert(
    fc.property(fc.boolean(), fc.integer({ min: 0, max: 2 ** 40 }), fc.array(fc.integer({ min: 0, max: 3000 }), { minLength: 1, maxLength: 6 }), (write, sector, lens) => {
      const t = rig();
      t.hdr(write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, sector);
      const data = lens.map((len, i) => ({ addr: DATA + i * 4096, len }));
      const r = write ? t.parse([...H, ...data], S) : t.parse(H, [...data, ...S]);
      if (r instanceof BlkRequestError) {
        assert.equal(r.fatal, false);
        return;
      }
      let sum = 0;
      for (let i = 0; i < r.segCount; i++) sum += r.segLen[i]!;
      assert.equal(sum, r.dataBytes);
      assert.equal(r.dataBytes % 512, 0);
      assert.ok(r.sector * 512 + r.dataBytes <= CAP);
    }),
    { numRuns: 200 },
  );
});
