// The balloon device's state outside guest memory, as bytes: what SaveState returns,
// LoadState takes, and balloon-host persists per VM to survive its own restart.
// (QEMU keeps the equivalent in hw/virtio/virtio-balloon.c's vmstate plus
// virtio_save()'s per-queue last_avail_idx.)
//
// Envelope (little-endian), checked before anything is used:
//   0  u32 magic "VBST"
//   4  u16 version (BALLOON_STATE_VERSION)
//   6  u16 reserved, 0
//   8  u32 J = bytes of the JSON section
//  12  u32 B = bytes of the ballooned bitmap (one bit per guest page, LSB of byte 0 = PFN 0)
//  16  J bytes JSON (BalloonVmState without the bitmap), B bytes bitmap
//  16+J+B  u32 crc32c (Castagnoli) of bytes [0, 16+J+B)
// The bytes come from callers (LoadState) and from a file in a shared directory:
// every field is type- and range-checked, a bad one is a StateError.
import { BALLOON_QUEUES, type BalloonGuestStats, type BalloonMode, type BalloonQueue, PAGE_SIZE, emptyGuestStats } from "@virtmesh/balloon";
import { NAME_RE } from "@virtmesh/config";
import { crc32c } from "@virtmesh/virtio-blk";

export const BALLOON_STATE_MAGIC = 0x54534256; // "VBST"
export const BALLOON_STATE_VERSION = 1;
const HEADER = 16;
/** A JSON section is a few KiB; refuse anything far larger before parsing. */
const MAX_JSON_BYTES = 1 << 20;

export class StateError extends Error {
  override readonly name = "StateError";
}

export interface SavedQueue {
  name: BalloonQueue;
  size: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  /** Device-side next avail slot (VHOST_GET_VRING_BASE's num). */
  lastAvailIdx: number;
  /** The device's shadow of used->idx. */
  usedIdx: number;
  /** The ChainError code that put the queue in NEEDS_RESET (§2.1.2), or "". */
  needsReset: string;
}

export interface BalloonVmState {
  vm: string;
  memoryBytes: number;
  guestPages: number;
  configAddr: number;
  /** Negotiated VIRTIO_BALLOON_F_* bits. */
  features: number;
  mode: BalloonMode;
  targetPages: number;
  actualPages: number;
  /** Config page refused[inflate, deflate, stats, reporting]. */
  refusedByQueue: number[];
  queues: SavedQueue[];
  /** The stats buffer the device holds (§5.5.6.3), -1 if none. */
  heldStats: number;
  refusedRequests: number;
  refusedByKind: Record<string, number>;
  counters: Record<string, number>;
  guestStats: BalloonGuestStats | null;
  /** Inode of the memory file (only meaningful on the host that wrote it: a restart). */
  memoryIno: number;
  /** ceil(guestPages / 8) bytes. */
  ballooned: Uint8Array;
}

export function encodeBalloonState(s: BalloonVmState): Uint8Array {
  const { ballooned, ...rest } = s;
  const json = Buffer.from(JSON.stringify(rest), "utf8");
  const out = new Uint8Array(HEADER + json.length + ballooned.length + 4);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, BALLOON_STATE_MAGIC, true);
  dv.setUint16(4, BALLOON_STATE_VERSION, true);
  dv.setUint32(8, json.length, true);
  dv.setUint32(12, ballooned.length, true);
  out.set(json, HEADER);
  out.set(ballooned, HEADER + json.length);
  const end = HEADER + json.length + ballooned.length;
  dv.setUint32(end, crc32c(out, 0, end) >>> 0, true);
  return out;
}

const MODES: readonly BalloonMode[] = ["pfn", "bitmap", "reporting"];
const STAT_KEYS = Object.keys(emptyGuestStats()) as Array<keyof BalloonGuestStats>;

export function decodeBalloonState(bytes: Uint8Array): BalloonVmState {
  if (bytes.length < HEADER + 4) throw new StateError(`balloon state of ${bytes.length} bytes is shorter than its ${HEADER + 4}-byte envelope`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const magic = dv.getUint32(0, true);
  if (magic !== BALLOON_STATE_MAGIC) throw new StateError(`not a balloon state (magic 0x${magic.toString(16)}, expected 0x${BALLOON_STATE_MAGIC.toString(16)} "VBST")`);
  const version = dv.getUint16(4, true);
  if (version !== BALLOON_STATE_VERSION) throw new StateError(`balloon state version ${version} is not supported (this balloon-host reads version ${BALLOON_STATE_VERSION})`);
  if (dv.getUint16(6, true) !== 0) throw new StateError("balloon state: reserved header bits set");
  const j = dv.getUint32(8, true);
  const b = dv.getUint32(12, true);
  if (j > MAX_JSON_BYTES || HEADER + j + b + 4 !== bytes.length) {
    throw new StateError(`balloon state: sections of ${j} + ${b} bytes do not fill the ${bytes.length}-byte envelope`);
  }
  const end = HEADER + j + b;
  const want = dv.getUint32(end, true);
  const got = crc32c(bytes, 0, end) >>> 0;
  if (want !== got) throw new StateError(`balloon state checksum mismatch: crc32c 0x${got.toString(16)}, the state says 0x${want.toString(16)}`);
  let raw: unknown;
  try {
    raw = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset + HEADER, j).toString("utf8"));
  } catch (e) {
    throw new StateError(`balloon state: JSON section does not parse: ${(e as Error).message}`);
  }
  const s = checkState(raw);
  const need = Math.ceil(s.guestPages / 8);
  if (b !== need) throw new StateError(`balloon state: bitmap of ${b} bytes for ${s.guestPages} guest pages (needs ${need})`);
  return { ...s, ballooned: bytes.slice(HEADER + j, end) };
}

const isObj = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

function uint(o: Record<string, unknown>, k: string, max = Number.MAX_SAFE_INTEGER, min = 0): number {
  const v = o[k];
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) throw new StateError(`balloon state: ${k} must be an integer in [${min}, ${max}]`);
  return v;
}

function checkState(raw: unknown): Omit<BalloonVmState, "ballooned"> {
  if (!isObj(raw)) throw new StateError("balloon state: JSON section is not an object");
  const vm = raw.vm;
  if (typeof vm !== "string" || !NAME_RE.test(vm)) throw new StateError("balloon state: vm is not a valid name");
  const mode = raw.mode;
  if (typeof mode !== "string" || !MODES.includes(mode as BalloonMode)) throw new StateError("balloon state: mode must be pfn, bitmap or reporting");
  const memoryBytes = uint(raw, "memoryBytes");
  const guestPages = uint(raw, "guestPages", Math.floor(memoryBytes / PAGE_SIZE), 1);
  const refusedByQueue = raw.refusedByQueue;
  if (!Array.isArray(refusedByQueue) || refusedByQueue.length !== 4 || !refusedByQueue.every((x) => Number.isInteger(x) && (x as number) >= 0 && (x as number) <= 0xffff_ffff)) {
    throw new StateError("balloon state: refusedByQueue must be 4 u32 counters");
  }
  if (!Array.isArray(raw.queues) || raw.queues.length > BALLOON_QUEUES.length) throw new StateError("balloon state: queues must be a list of at most 4");
  const seen = new Set<string>();
  const queues: SavedQueue[] = raw.queues.map((q: unknown) => {
    if (!isObj(q)) throw new StateError("balloon state: a queue is not an object");
    const name = q.name;
    if (typeof name !== "string" || !BALLOON_QUEUES.includes(name as BalloonQueue) || seen.has(name)) throw new StateError("balloon state: queue name unknown or repeated");
    seen.add(name);
    const needsReset = q.needsReset;
    if (typeof needsReset !== "string" || needsReset.length > 64) throw new StateError("balloon state: needsReset must be a short string");
    return {
      name: name as BalloonQueue,
      size: uint(q, "size", 32768, 1),
      descAddr: uint(q, "descAddr", memoryBytes),
      availAddr: uint(q, "availAddr", memoryBytes),
      usedAddr: uint(q, "usedAddr", memoryBytes),
      lastAvailIdx: uint(q, "lastAvailIdx", 0xffff),
      usedIdx: uint(q, "usedIdx", 0xffff),
      needsReset,
    };
  });
  const numbers = (k: string): Record<string, number> => {
    const o = raw[k];
    if (!isObj(o) || Object.keys(o).length > 64) throw new StateError(`balloon state: ${k} must be an object of at most 64 counters`);
    const out: Record<string, number> = {};
    for (const key of Object.keys(o)) {
      if (key.length > 64) throw new StateError(`balloon state: ${k} has an over-long key`);
      const v = o[key];
      if (typeof v !== "number" || !Number.isFinite(v) || v < 0) throw new StateError(`balloon state: ${k}.${key.slice(0, 64)} must be a non-negative number`);
      out[key] = v;
    }
    return out;
  };
  let guestStats: BalloonGuestStats | null = null;
  if (raw.guestStats !== null) {
    if (!isObj(raw.guestStats)) throw new StateError("balloon state: guestStats must be an object or null");
    const g = emptyGuestStats();
    for (const k of STAT_KEYS) g[k] = uint(raw.guestStats, k);
    guestStats = g;
  }
  return {
    vm,
    memoryBytes,
    guestPages,
    configAddr: uint(raw, "configAddr", memoryBytes),
    features: uint(raw, "features", 0xffff_ffff),
    mode: mode as BalloonMode,
    targetPages: uint(raw, "targetPages", guestPages),
    actualPages: uint(raw, "actualPages", 0xffff_ffff),
    refusedByQueue: refusedByQueue as number[],
    queues,
    heldStats: uint(raw, "heldStats", 32767, -1),
    refusedRequests: uint(raw, "refusedRequests"),
    refusedByKind: numbers("refusedByKind"),
    counters: numbers("counters"),
    guestStats,
    memoryIno: uint(raw, "memoryIno"),
  };
}
