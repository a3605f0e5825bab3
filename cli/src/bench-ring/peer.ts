// The other process of `virtmesh bench ring` (spawned by ring.ts, never
// imported). It serves the same 64-byte echo on all four transports:
//  - the shared-memory virtqueue, as the device: pops each chain (one 64-byte
//    device-readable request, one device-writable response), copies the
//    request into the response and puts the chain on the used ring;
//  - gRPC unary and gRPC bidirectional streaming (hand-defined RingEcho service);
//  - NATS request/reply on NATS_ECHO_SUBJECT.
// argv[2] is a PeerConfig (JSON). stdin carries PeerCommands, stdout PeerMessages
// (one JSON object per line). The device loop runs synchronously on demand (a
// "ring" command) until the driver sets CTL_STOP, so while it runs the event
// loop (gRPC, NATS) is idle, and while gRPC/NATS run the device does not poll.

import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import * as grpc from "@grpc/grpc-js";
import type { NatsConnection } from "@nats-io/transport-node";
import { connectNats, drainNats } from "@virtmesh/nats";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { ChainError, DeviceQueue, GuestMemory, type DescriptorChain } from "@virtmesh/virtqueue";
import {
  CALL_DOORBELL_OFFSET,
  CONTROL_BYTES,
  CTL_DEVICE_RUNNING,
  CTL_STOP,
  GUEST_MEMORY_BYTES,
  KICK_DOORBELL_OFFSET,
  MSG_BYTES,
  NATS_ECHO_SUBJECT,
  QUEUE_LAYOUT,
  SHARED_FILE_BYTES,
  ringEchoService,
  type PeerCommand,
  type PeerConfig,
  type PeerMessage,
} from "./wire";

// If the bench process dies, this one must not keep burning a core. process.ppid
// is a snapshot in Node 20, so read the live parent from /proc (rarely).
function currentPpid(): number {
  const stat = readFileSync("/proc/self/stat", "utf8");
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
}
const parentPid = currentPpid();
const orphaned = (): boolean => currentPpid() !== parentPid;

function send(msg: PeerMessage): void {
  process.stdout.write(JSON.stringify(msg) + "\n");
}

function parseConfig(raw: string | undefined): PeerConfig {
  const cfg = JSON.parse(raw ?? "null") as Partial<PeerConfig> | null;
  if (!cfg || typeof cfg.sharedPath !== "string" || typeof cfg.natsUrl !== "string") {
    throw new TypeError("bench-ring peer: argv[2] must be a JSON PeerConfig {sharedPath, natsUrl}");
  }
  return { sharedPath: cfg.sharedPath, natsUrl: cfg.natsUrl };
}

interface Device {
  ctl: Int32Array;
  bytes: Uint8Array;
  mem: GuestMemory;
  q: DeviceQueue;
  chain: DescriptorChain;
  kick: Doorbell;
  call: Doorbell;
  hasWork: () => boolean;
}

/**
 * Serves the virtqueue until the driver sets CTL_STOP with nothing pending.
 * Blocks the event loop: it is the device's polling thread for this phase.
 */
function runDevice(d: Device): PeerMessage {
  const { ctl, bytes, mem, q, chain, kick, call } = d;
  // Imported bindings are getter calls under tsx's CommonJS output: use locals in the loop.
  const msgBytes = MSG_BYTES;
  const ctlStop = CTL_STOP;
  const kickBefore = kick.counters;
  let served = 0;
  let interruptsNeeded = 0;
  let interruptSyscalls = 0;
  const signal = (): void => {
    if (q.needsInterrupt()) {
      interruptsNeeded++;
      if (call.ring()) interruptSyscalls++;
    }
  };
  Atomics.store(ctl, CTL_DEVICE_RUNNING, 1);
  q.disableNotifications();
  for (;;) {
    let popped = 0;
    for (let c = q.pop(chain); c !== null; c = q.pop(chain)) {
      if (c instanceof ChainError) {
        // Our own driver never builds a bad chain; if it did, the queue's state is suspect.
        throw new Error(`virtqueue: bad chain from the driver: ${c.message}`);
      }
      // The echo device's request format: exactly one 64-byte device-readable
      // buffer followed by one device-writable buffer of at least 64 bytes
      // (§2.7.4.2 already guarantees readable before writable). Anything else is
      // returned unused, with len 0 (§2.7.8.2: len is the bytes written).
      const req = c.addr[0]!;
      const resp = c.addr[1]!;
      if (c.count !== 2 || c.readableCount !== 1 || c.len[0] !== msgBytes || c.len[1]! < msgBytes) {
        q.addUsed(c.head, 0);
      } else {
        // Both ranges were bounds-checked by the chain walk (ADDRESS_OUT_OF_RANGE,
        // §2.7.5). copyWithin moves the 64 bytes without allocating a view.
        bytes.copyWithin(resp, req, req + msgBytes);
        mem.device.markDirty(resp, msgBytes);
        q.addUsed(c.head, msgBytes);
      }
      served++;
      // Interrupt per small batch so the driver can refill its window early.
      if ((++popped & 31) === 0) signal();
    }
    signal();
    if (Atomics.load(ctl, ctlStop) !== 0 && !q.hasPending()) break;
    // Idle: ask for kicks again, re-check (vhost_enable_notify's race), then
    // spin and sleep on the kick doorbell.
    if (q.enableNotifications()) {
      q.disableNotifications();
      continue;
    }
    while (!kick.spinThenWaitSync(d.hasWork, { timeoutMs: 500 })) if (orphaned()) process.exit(2);
    q.disableNotifications();
  }
  Atomics.store(ctl, CTL_DEVICE_RUNNING, 0);
  const kickAfter = kick.counters;
  return {
    type: "ring",
    served,
    interruptsNeeded,
    interruptSyscalls,
    deviceSleeps: kickAfter.waitSyscalls - kickBefore.waitSyscalls,
    kickWakeups: kickAfter.wakeups - kickBefore.wakeups,
  };
}

async function main(): Promise<void> {
  const cfg = parseConfig(process.argv[2]);
  let mapping: SharedMapping | null = null;
  let kick: Doorbell | null = null;
  let call: Doorbell | null = null;
  let nc: NatsConnection | undefined;
  const server = new grpc.Server();
  let closing = false;
  const shutdown = async (code: number): Promise<void> => {
    if (closing) return;
    closing = true;
    server.forceShutdown();
    await drainNats(nc);
    kick?.close();
    call?.close();
    mapping?.unmap();
    process.exit(code);
  };
  try {
    mapping = mapFile(cfg.sharedPath, SHARED_FILE_BYTES);
    const ctl = new Int32Array(mapping.buffer, 0, CONTROL_BYTES / 4);
    kick = Doorbell.attach(mapping, KICK_DOORBELL_OFFSET, false);
    call = Doorbell.attach(mapping, CALL_DOORBELL_OFFSET, false);
    const mem = new GuestMemory(mapping.buffer, { byteOffset: CONTROL_BYTES, size: GUEST_MEMORY_BYTES });
    // No saved state: the position comes from used->idx in guest memory (0 on a fresh queue).
    const q = new DeviceQueue(mem, { ...QUEUE_LAYOUT, eventIdx: true });
    const stopWord = CTL_STOP;
    const device: Device = {
      ctl,
      bytes: mem.bytes,
      mem,
      q,
      chain: q.newChain(),
      kick,
      call,
      hasWork: () => q.hasPending() || Atomics.load(ctl, stopWord) !== 0,
    };

    const echo: grpc.handleUnaryCall<Buffer, Buffer> = (c, cb) => cb(null, c.request);
    const echoStream: grpc.handleBidiStreamingCall<Buffer, Buffer> = (c) => {
      c.on("data", (m: Buffer) => c.write(m));
      c.on("end", () => c.end());
      c.on("error", () => undefined); // the client cancelling is not our failure
    };
    server.addService(ringEchoService, { Echo: echo, EchoStream: echoStream });
    const grpcPort = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, port) => (err ? reject(err) : resolve(port))),
    );

    nc = await connectNats(cfg.natsUrl, "virtmesh-bench-ring-peer");
    nc.subscribe(NATS_ECHO_SUBJECT, {
      callback: (err, msg) => {
        if (!err) msg.respond(msg.data);
      },
    });
    await nc.flush(); // the subscription is registered before we say ready

    const rl = createInterface({ input: process.stdin });
    rl.on("line", (line) => {
      let cmd: PeerCommand;
      try {
        cmd = JSON.parse(line) as PeerCommand;
      } catch {
        send({ type: "error", message: `bad command line: ${line.slice(0, 80)}` });
        return;
      }
      if (cmd.cmd === "ring") {
        try {
          send(runDevice(device));
        } catch (err) {
          send({ type: "error", message: String((err as Error).stack ?? err) });
          void shutdown(1);
        }
      } else if (cmd.cmd === "exit") void shutdown(0);
      else send({ type: "error", message: `unknown command ${JSON.stringify(cmd)}` });
    });
    // The bench process went away (or closed our stdin): stop.
    rl.on("close", () => void shutdown(0));
    send({ type: "ready", grpcPort });
  } catch (err) {
    send({ type: "error", message: String((err as Error).stack ?? err) });
    await shutdown(1);
  }
}

void main();
