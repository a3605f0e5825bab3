// The ReceivePages client stream against an in-process gRPC server: flow control
// (write() false, then 'drain'), a receiver that fails mid-stream, a stuck receiver.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import {
  Server,
  ServerCredentials,
  status as Status,
  type sendUnaryData,
  type ServerReadableStream,
  type UntypedServiceImplementation,
} from "@grpc/grpc-js";
import { sidecar } from "@virtmesh/proto";
import { GuestPages, MigrationBitmap, sendDirtyPages, SendFailed } from "./migration";
import { openPageStream, SidecarClients } from "./page-stream";

const PG = 4096;
/** What the server does with the next stream. */
let mode: "slow" | "fail-after-2" | "stuck" = "slow";
let received: number[] = [];
const server = new Server({ "grpc.max_receive_message_length": 64 << 20 });
const clients = new SidecarClients();
let address = "";
const held: Array<ServerReadableStream<sidecar.PageBatch, sidecar.ReceivePagesResponse>> = [];

before(async () => {
  const impl = {
    receivePages(call: ServerReadableStream<sidecar.PageBatch, sidecar.ReceivePagesResponse>, cb: sendUnaryData<sidecar.ReceivePagesResponse>) {
      let batches = 0;
      let pages = 0;
      let bytes = 0;
      let done = false;
      if (mode === "stuck") {
        // Reads nothing and never answers: flow control fills up.
        call.pause();
        held.push(call);
        return;
      }
      call.on("data", (b: sidecar.PageBatch) => {
        if (done) return;
        batches++;
        received.push(...b.pfns);
        pages += b.pfns.length;
        bytes += b.data.length;
        if (mode === "fail-after-2" && batches === 2) {
          done = true;
          cb({ code: Status.NOT_FOUND, details: "vm 'vm1' does not exist on host t2" });
          return;
        }
        if (mode === "slow") {
          // A slow receiver: pause a little after every batch, so the sender meets backpressure.
          call.pause();
          setTimeout(() => call.resume(), 2);
        }
      });
      call.on("end", () => {
        if (!done) cb(null, { pages, bytes });
      });
      call.on("error", () => {});
    },
  };
  server.addService(sidecar.SharedMemoryServiceService, impl as unknown as UntypedServiceImplementation);
  const port = await new Promise<number>((res, rej) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))),
  );
  address = `127.0.0.1:${port}`;
});

after(() => {
  clients.closeAll();
  server.forceShutdown();
});

function guest(pages: number): GuestPages {
  const ab = new ArrayBuffer(pages * PG);
  const ram = new Uint8Array(ab);
  for (let p = 0; p < pages; p++) ram[p * PG] = (p & 0xff) | 1;
  return new GuestPages(pages * PG, () => ab);
}

const opts = { vm: "vm1", round: 0, bucket: null, now: () => performance.now(), sleep: () => Promise.resolve(), abortReason: () => null };

test("a slow receiver: the sender waits for drain and every page arrives once, in pfn order", async () => {
  mode = "slow";
  received = [];
  const pages = 2048; // 8 MiB in batches of 16 pages: far more than the stream buffers
  const sink = openPageStream(clients.get(address), "test-sidecar");
  let drains = 0;
  const counting = { ...sink, waitDrain: () => (drains++, sink.waitDrain()) };
  const bm = new MigrationBitmap(pages);
  const r = await sendDirtyPages(bm, guest(pages), counting, { ...opts, batchPages: 16 });
  assert.equal(r.pages, pages);
  assert.equal(bm.dirty, 0);
  assert.deepEqual(received, Array.from({ length: pages }, (_, i) => i));
  assert.ok(drains > 0, "write() asked the sender to wait at least once");
});

test("a receiver that fails mid-stream: the sender fails naming it, and every page is back in the bitmap", async () => {
  mode = "fail-after-2";
  const pages = 512;
  const bm = new MigrationBitmap(pages);
  const sink = openPageStream(clients.get(address), "shm-sidecar@t2");
  await assert.rejects(
    sendDirtyPages(bm, guest(pages), sink, { ...opts, batchPages: 8 }),
    (e: unknown) => e instanceof SendFailed && e.kind === "stream" && /shm-sidecar@t2 answered NOT_FOUND: vm 'vm1' does not exist/.test(e.message),
  );
  assert.equal(bm.dirty, pages);
});

test("a receiver that reads nothing: the stall timeout cancels the stream", async () => {
  mode = "stuck";
  const pages = 4096;
  const bm = new MigrationBitmap(pages);
  const sink = openPageStream(clients.get(address), "shm-sidecar@t2", 300);
  await assert.rejects(
    sendDirtyPages(bm, guest(pages), sink, { ...opts, batchPages: 256 }),
    (e: unknown) => e instanceof SendFailed && /shm-sidecar@t2 made no progress for 300 ms/.test(e.message),
  );
  assert.equal(bm.dirty, pages);
  for (const c of held) c.destroy();
});
