// The `rpc` mode of `virtmesh bench vhost-blk`: every block request is one gRPC
// unary call that carries the data (OUT: in the request; IN: in the response),
// no shared ring. Defined by hand (raw Buffer serializers) so the bench adds no
// .proto file.
//
// Request:  u32 type (VIRTIO_BLK_T_IN | _OUT | _FLUSH), u32 length, u64 byte offset
//           (little-endian, 16 bytes, like struct virtio_blk_outhdr), then `length`
//           data bytes for OUT.
// Response: one virtio status byte, then `length` data bytes for a successful IN.
import type { ServiceDefinition } from "@grpc/grpc-js";

export const RPC_HDR_BYTES = 16;
export const RPC_MAX_LEN = 1 << 20;
export const BLK_RPC_SERVICE_NAME = "virtmesh.bench.v1.BlkRpc";

const raw = (b: Buffer): Buffer => b;

export const BLK_RPC_SERVICE: ServiceDefinition = {
  request: {
    path: `/${BLK_RPC_SERVICE_NAME}/Request`,
    requestStream: false,
    responseStream: false,
    requestSerialize: raw,
    requestDeserialize: raw,
    responseSerialize: raw,
    responseDeserialize: raw,
    originalName: "Request",
  },
};

export interface RpcPeerConfig {
  backend: "null" | "file";
  /** Image file (file backend). */
  path: string;
  capacityBytes: number;
}

/** The peer's one stdout line once it serves. */
export interface RpcPeerReady {
  ready: string;
}

export function writeRpcHeader(b: Buffer, type: number, len: number, offset: number): void {
  b.writeUInt32LE(type, 0);
  b.writeUInt32LE(len, 4);
  b.writeUInt32LE(offset % 0x1_0000_0000, 8);
  b.writeUInt32LE(Math.floor(offset / 0x1_0000_0000), 12);
}
