// Request decoding at the gRPC boundary.
//
// The ts-proto stubs decode uint64 as a JS number and throw on values above
// 2^53-1, which grpc-js turns into INTERNAL. Two fixes here:
//  - the IOMMU requests (DmaMap, DmaUnmap, PinPages, UnpinPages, DirtyPages)
//    are decoded with every uint64 kept exact (number when safe, else bigint),
//    so the seed's own checks see the caller's value: `iova + size < iova`
//    (seed L369) needs values near 2^64;
//  - every other request that fails to decode becomes an UndecodableRequest,
//    which the handler answers with INVALID_ARGUMENT naming the problem.
import type { ServiceDefinition, UntypedServiceImplementation } from "@grpc/grpc-js";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { sidecar } from "@virtmesh/proto";
import type { U64 } from "@virtmesh/vfio";

export class UndecodableRequest {
  constructor(readonly message: string) {}
}

type Kind = "string" | "uint32" | "uint64" | "repeated-uint64";
type Spec = Record<number, readonly [string, Kind]>;

function exact(v: bigint): U64 {
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

function u64(r: BinaryReader): U64 {
  const v = r.uint64();
  return exact(typeof v === "bigint" ? v : BigInt(v));
}

/** Decodes a flat message of the given fields; unknown fields and mismatched wire types are skipped, as ts-proto does. */
function decodeFlat(bytes: Uint8Array, spec: Spec, init: Record<string, unknown>): Record<string, unknown> {
  const r = new BinaryReader(bytes);
  const out: Record<string, unknown> = { ...init };
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    const f = spec[no];
    if (f) {
      const [name, kind] = f;
      if (kind === "string" && wt === WireType.LengthDelimited) {
        out[name] = r.string();
        continue;
      }
      if (kind === "uint32" && wt === WireType.Varint) {
        out[name] = r.uint32();
        continue;
      }
      if (kind === "uint64" && wt === WireType.Varint) {
        out[name] = u64(r);
        continue;
      }
      if (kind === "repeated-uint64") {
        const list = out[name] as U64[];
        if (wt === WireType.Varint) {
          list.push(u64(r));
          continue;
        }
        if (wt === WireType.LengthDelimited) {
          const end = r.uint32() + r.pos;
          while (r.pos < end) list.push(u64(r));
          continue;
        }
      }
    }
    r.skip(wt, no);
  }
  return out;
}

export interface DmaMapRequest {
  vm: string;
  iova: U64;
  vaddr: U64;
  size: U64;
  flags: number;
}
export interface DmaUnmapRequest {
  vm: string;
  iova: U64;
  size: U64;
}
export interface PinRequest {
  vm: string;
  iovas: U64[];
}
export interface DirtyPagesRequest {
  vm: string;
  argsz: number;
  flags: number;
  iova: U64;
  size: U64;
  pgsize: U64;
  bitmapSize: U64;
  reportMode: number;
}

export const decodeDmaMap = (b: Uint8Array): DmaMapRequest =>
  decodeFlat(
    b,
    { 1: ["vm", "string"], 2: ["iova", "uint64"], 3: ["vaddr", "uint64"], 4: ["size", "uint64"], 5: ["flags", "uint32"] },
    { vm: "", iova: 0, vaddr: 0, size: 0, flags: 0 },
  ) as unknown as DmaMapRequest;

export const decodeDmaUnmap = (b: Uint8Array): DmaUnmapRequest =>
  decodeFlat(b, { 1: ["vm", "string"], 2: ["iova", "uint64"], 3: ["size", "uint64"] }, { vm: "", iova: 0, size: 0 }) as unknown as DmaUnmapRequest;

export const decodePin = (b: Uint8Array): PinRequest =>
  decodeFlat(b, { 1: ["vm", "string"], 2: ["iovas", "repeated-uint64"] }, { vm: "", iovas: [] }) as unknown as PinRequest;

export const decodeDirtyPages = (b: Uint8Array): DirtyPagesRequest =>
  decodeFlat(
    b,
    {
      1: ["vm", "string"],
      2: ["argsz", "uint32"],
      3: ["flags", "uint32"],
      4: ["iova", "uint64"],
      5: ["size", "uint64"],
      6: ["pgsize", "uint64"],
      7: ["bitmapSize", "uint64"],
      8: ["reportMode", "uint32"],
    },
    { vm: "", argsz: 0, flags: 0, iova: 0, size: 0, pgsize: 0, bitmapSize: 0, reportMode: 0 },
  ) as unknown as DirtyPagesRequest;

const WIDE: Partial<Record<keyof typeof sidecar.SharedMemoryServiceService, (b: Uint8Array) => unknown>> = {
  dmaMap: decodeDmaMap,
  dmaUnmap: decodeDmaUnmap,
  pinPages: decodePin,
  unpinPages: decodePin,
  dirtyPages: decodeDirtyPages,
};

/**
 * The SharedMemoryService definition with the decoders above: the generated
 * serializers for responses, exact-uint64 decoders for the IOMMU requests, and
 * no decoder that throws (a failure becomes an UndecodableRequest).
 */
export function sidecarServiceDefinition(): ServiceDefinition<UntypedServiceImplementation> {
  const def: Record<string, ServiceDefinition<UntypedServiceImplementation>[string]> = {};
  for (const [method, d] of Object.entries(sidecar.SharedMemoryServiceService)) {
    const decode = WIDE[method as keyof typeof sidecar.SharedMemoryServiceService] ?? (d.requestDeserialize as (b: Uint8Array) => unknown);
    def[method] = {
      ...d,
      requestDeserialize: (b: Buffer): unknown => {
        try {
          return decode(b);
        } catch (e) {
          return new UndecodableRequest((e as Error).message);
        }
      },
    } as ServiceDefinition<UntypedServiceImplementation>[string];
  }
  return def;
}
