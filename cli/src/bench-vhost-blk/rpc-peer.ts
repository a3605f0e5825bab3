// The server side of the bench's `rpc` mode (wire.ts): a process of its own that
// serves one gRPC unary call per block request and performs the same I/O as
// vhost-worker's backend of the same kind (null: none; file: positional read /
// write on a raw image, FLUSH = fsync), with the data inside the messages.
// Started by vhost-blk.ts: argv[2] is an RpcPeerConfig; prints one RpcPeerReady
// line; exits when stdin closes (its parent is gone) or on SIGTERM.
import { closeSync, fstatSync, fsync, openSync, read, write, constants as fsConstants } from "node:fs";
import * as grpc from "@grpc/grpc-js";
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from "@virtmesh/virtio-blk";
import { BLK_RPC_SERVICE, RPC_HDR_BYTES, RPC_MAX_LEN, type RpcPeerConfig } from "./wire";

const cfg = JSON.parse(process.argv[2] ?? "{}") as RpcPeerConfig;
if (cfg.backend !== "null" && cfg.backend !== "file") {
  process.stderr.write(`rpc-peer: backend ${String(cfg.backend)} must be null or file\n`);
  process.exit(2);
}
let fd = -1;
let capacity = cfg.capacityBytes;
if (cfg.backend === "file") {
  fd = openSync(cfg.path, fsConstants.O_RDWR);
  const size = fstatSync(fd).size;
  capacity = size - (size % 512);
}

const STATUS_OK = Buffer.from([VIRTIO_BLK_S_OK]);
const STATUS_IOERR = Buffer.from([VIRTIO_BLK_S_IOERR]);
const STATUS_UNSUPP = Buffer.from([VIRTIO_BLK_S_UNSUPP]);

type Callback = grpc.sendUnaryData<Buffer>;

function handle(call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: Callback): void {
  const req = call.request;
  // The request is as untrusted as a descriptor chain: header, length and range
  // are checked the way vhost-worker checks §5.2.6.1 before any I/O.
  if (req.length < RPC_HDR_BYTES) return cb({ code: grpc.status.INVALID_ARGUMENT, details: `request of ${req.length} bytes is shorter than the ${RPC_HDR_BYTES}-byte header` });
  const type = req.readUInt32LE(0);
  const len = req.readUInt32LE(4);
  const pos = req.readUInt32LE(8) + req.readUInt32LE(12) * 0x1_0000_0000;
  if (type === VIRTIO_BLK_T_FLUSH) {
    if (fd < 0) return cb(null, STATUS_OK);
    return fsync(fd, (err) => cb(null, err ? STATUS_IOERR : STATUS_OK));
  }
  if (type !== VIRTIO_BLK_T_IN && type !== VIRTIO_BLK_T_OUT) return cb(null, STATUS_UNSUPP);
  if (len === 0 || len % 512 !== 0 || len > RPC_MAX_LEN || pos % 512 !== 0 || pos + len > capacity) return cb(null, STATUS_IOERR);
  if (type === VIRTIO_BLK_T_OUT) {
    if (req.length !== RPC_HDR_BYTES + len) return cb({ code: grpc.status.INVALID_ARGUMENT, details: `OUT of ${len} bytes carries ${req.length - RPC_HDR_BYTES}` });
    if (fd < 0) return cb(null, STATUS_OK);
    return write(fd, req, RPC_HDR_BYTES, len, pos, (err, n) => cb(null, err || n !== len ? STATUS_IOERR : STATUS_OK));
  }
  if (req.length !== RPC_HDR_BYTES) return cb({ code: grpc.status.INVALID_ARGUMENT, details: "IN carries data" });
  const res = Buffer.allocUnsafe(1 + len);
  res[0] = VIRTIO_BLK_S_OK;
  // Null backend: like vhost-worker's, the data is whatever the buffer held.
  if (fd < 0) return cb(null, res);
  read(fd, res, 1, len, pos, (err, n) => {
    if (err || n !== len) return cb(null, STATUS_IOERR);
    cb(null, res);
  });
}

const server = new grpc.Server({ "grpc.max_receive_message_length": RPC_HDR_BYTES + RPC_MAX_LEN });
server.addService(BLK_RPC_SERVICE, { request: handle });
server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) {
    process.stderr.write(`rpc-peer: bind: ${err.message}\n`);
    process.exit(1);
  }
  process.stdout.write(JSON.stringify({ ready: `127.0.0.1:${port}` }) + "\n");
});

let stopping = false;
function stop(): void {
  if (stopping) return;
  stopping = true;
  server.tryShutdown(() => {
    if (fd >= 0) closeSync(fd);
    process.exit(0);
  });
  setTimeout(() => process.exit(0), 2000).unref();
}
process.stdin.on("end", stop);
process.stdin.on("error", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
