// Self-describing verify blocks for `virtmesh fio --verify crc32c` (fio's
// verify_header idea): every block written says where it belongs and which write
// produced it, and carries a CRC-32C of the rest, so a read can tell a corrupt
// block from a lost write (stale generation or never written) and from a
// misplaced one (offset field names another block).
//
//   0   u32 magic "VMFV"
//   4   u32 crc32c of bytes [8, block size)
//   8   u32 disk offset low   } byte offset of the block on the disk
//   12  u32 disk offset high  }
//   16  u32 block size
//   20  u32 generation        1, 2, ... per write of this block within a run
//   24  u32 run id            random per fio run
//   28  u32 job
//   32  pattern               xorshift32 stream seeded from offset, generation, run
import { crc32c } from "./crc32c";

export const VERIFY_MAGIC = 0x56464d56; // "VMFV"
export const VERIFY_HEADER_BYTES = 32;

export interface VerifyStamp {
  generation: number;
  run: number;
  job: number;
}

function seedOf(offset: number, generation: number, run: number): number {
  let s = (offset / 512) ^ Math.imul(generation, 0x9e3779b1) ^ Math.imul(run, 0x85ebca6b);
  s = s >>> 0 || 0x1234567;
  return s;
}

/** Fills buf[at, at+bs) with the block for disk `offset`. */
export function fillVerifyBlock(buf: Uint8Array, at: number, bs: number, offset: number, stamp: VerifyStamp): void {
  const dv = new DataView(buf.buffer, buf.byteOffset + at, bs);
  dv.setUint32(8, offset >>> 0, true);
  dv.setUint32(12, Math.floor(offset / 0x1_0000_0000), true);
  dv.setUint32(16, bs, true);
  dv.setUint32(20, stamp.generation, true);
  dv.setUint32(24, stamp.run, true);
  dv.setUint32(28, stamp.job, true);
  let x = seedOf(offset, stamp.generation, stamp.run);
  let i = VERIFY_HEADER_BYTES;
  for (; i + 4 <= bs; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    dv.setUint32(i, x >>> 0, true);
  }
  for (; i < bs; i++) buf[at + i] = i & 0xff;
  dv.setUint32(4, crc32c(buf, at + 8, at + bs), true);
  dv.setUint32(0, VERIFY_MAGIC, true);
}

export interface VerifyExpect {
  /** Generation that must be there (0: any, e.g. written by an earlier run). */
  generation: number;
  /** Run id that must be there (0: any). */
  run: number;
}

/**
 * Checks the block read at disk `offset`. Returns null if good, or why not: a
 * never-written/lost block (no magic), a corrupt one (CRC), a misplaced one
 * (offset field), or a stale one (older generation: a lost write).
 */
export function checkVerifyBlock(buf: Uint8Array, at: number, bs: number, offset: number, expect: VerifyExpect): string | null {
  const dv = new DataView(buf.buffer, buf.byteOffset + at, bs);
  const magic = dv.getUint32(0, true);
  if (magic !== VERIFY_MAGIC) {
    let zero = true;
    for (let i = 0; i < bs && zero; i++) if (buf[at + i] !== 0) zero = false;
    return zero ? `offset ${offset}: block is all zeros (never written or write lost)` : `offset ${offset}: bad magic 0x${magic.toString(16)} (corrupt)`;
  }
  const stored = dv.getUint32(4, true);
  const actual = crc32c(buf, at + 8, at + bs);
  if (stored !== actual) return `offset ${offset}: crc32c mismatch (stored 0x${stored.toString(16)}, computed 0x${actual.toString(16)})`;
  const where = dv.getUint32(8, true) + dv.getUint32(12, true) * 0x1_0000_0000;
  if (where !== offset) return `offset ${offset}: misplaced block (it was written for offset ${where})`;
  if (dv.getUint32(16, true) !== bs) return `offset ${offset}: block size ${dv.getUint32(16, true)} != ${bs}`;
  const gen = dv.getUint32(20, true);
  const run = dv.getUint32(24, true);
  if (expect.run !== 0 && run !== expect.run) return `offset ${offset}: block from run ${run}, expected run ${expect.run} (write lost)`;
  if (expect.generation !== 0 && gen !== expect.generation) return `offset ${offset}: generation ${gen}, expected ${expect.generation} (${gen < expect.generation ? "write lost" : "unexpected write"})`;
  return null;
}
