// What the bench process (ring.ts, the client and virtqueue driver) and its
// peer process (peer.ts, the server and virtqueue device) agree on: the layout
// of the shared file, the gRPC echo service and the control messages.

import type { MethodDefinition, ServiceDefinition } from "@grpc/grpc-js";
import { splitQueueLayout } from "@virtmesh/virtqueue";

/** Bytes of every request and every response, on every transport. */
export const MSG_BYTES = 64;
export const MSG_WORDS = MSG_BYTES / 4;

// The shared file: one control page, then guest memory.
//   control page (bench protocol, not guest memory)
//     word 0               CTL_DEVICE_RUNNING: the peer's device loop is polling the queue
//     word 32 (byte 128)   CTL_STOP: the driver asks the device loop to return (own cache line,
//                          read by the device only when it runs out of work)
//     byte 1024            kick doorbell (driver -> device, ioeventfd's role)
//     byte 2048            call doorbell (device -> driver, irqfd's role)
//   guest memory at CONTROL_BYTES
//     0       split virtqueue, QUEUE_SIZE entries, used ring on its own page
//     REQ_BASE  QUEUE_SIZE request buffers of 64 bytes (device-readable)
//     RESP_BASE QUEUE_SIZE response buffers of 64 bytes (device-writable)
export const CONTROL_BYTES = 4096;
export const CTL_DEVICE_RUNNING = 0;
export const CTL_STOP = 32;
export const KICK_DOORBELL_OFFSET = 1024;
export const CALL_DOORBELL_OFFSET = 2048;

export const QUEUE_SIZE = 256;
/** Used ring on its own page: the device's stores never share a line with the driver's. */
export const QUEUE_LAYOUT = splitQueueLayout(QUEUE_SIZE, 0, { usedAlign: 4096 });
export const REQ_BASE = 16384;
export const RESP_BASE = REQ_BASE + QUEUE_SIZE * MSG_BYTES;
export const GUEST_MEMORY_BYTES = RESP_BASE + QUEUE_SIZE * MSG_BYTES;
export const SHARED_FILE_BYTES = CONTROL_BYTES + GUEST_MEMORY_BYTES;
if (QUEUE_LAYOUT.end > REQ_BASE) throw new Error("bench-ring: virtqueue overlaps the request buffers");

/** Each request is one 2-descriptor chain, so at most QUEUE_SIZE / 2 are in flight. */
export const MAX_IN_FLIGHT = QUEUE_SIZE / 2;

/** No progress from the other process for this long means it died or hangs. */
export const STALL_MS = 5000;

/** The NATS subject the peer answers. */
export const NATS_ECHO_SUBJECT = "virtmesh.bench.ring.echo";

// gRPC echo, defined by hand with raw Buffer (de)serializers: the 64 bytes go
// on the wire as the message itself, no protobuf framing inside.
const identity = (b: Buffer): Buffer => b;

export const ECHO_UNARY_PATH = "/virtmesh.bench.v1.RingEcho/Echo";
export const ECHO_STREAM_PATH = "/virtmesh.bench.v1.RingEcho/EchoStream";

const echoMethod = (path: string, streaming: boolean): MethodDefinition<Buffer, Buffer> => ({
  path,
  requestStream: streaming,
  responseStream: streaming,
  requestSerialize: identity,
  requestDeserialize: identity,
  responseSerialize: identity,
  responseDeserialize: identity,
});

export const ringEchoService: ServiceDefinition = {
  Echo: echoMethod(ECHO_UNARY_PATH, false),
  EchoStream: echoMethod(ECHO_STREAM_PATH, true),
};
export { identity as rawBuffer };

/** argv[2] of the peer, JSON. */
export interface PeerConfig {
  sharedPath: string;
  natsUrl: string;
}

/** Commands on the peer's stdin, one JSON object per line. */
export type PeerCommand = { cmd: "ring" } | { cmd: "exit" };

/** Lines the peer writes on stdout. */
export type PeerMessage =
  | { type: "ready"; grpcPort: number }
  | { type: "ring"; served: number; interruptsNeeded: number; interruptSyscalls: number; deviceSleeps: number; kickWakeups: number }
  | { type: "error"; message: string };
