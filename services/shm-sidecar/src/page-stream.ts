// The outgoing half of the migration page stream: one ReceivePages client
// stream to the destination host's shm-sidecar, as a PageSink for sendDirtyPages.
import { credentials, Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";
import { sidecar } from "@virtmesh/proto";
import type { PageSink } from "./migration";

/** No progress (a drain, the answer) for this long: the destination is stuck, the stream is cancelled. */
export const STALL_TIMEOUT_MS = 60_000;

const CLIENT_OPTIONS = {
  // A batch of MAX_BATCH_PAGES is 16 MiB; the receiving server takes up to 64 MiB.
  "grpc.max_send_message_length": 64 << 20,
  // A destination host that vanishes mid-stream fails the call instead of hanging it.
  "grpc.keepalive_time_ms": 10_000,
  "grpc.keepalive_timeout_ms": 10_000,
  "grpc.keepalive_permit_without_calls": 0,
};

/**
 * SharedMemoryService clients by address. The sidecar makes its own rather than
 * ctx.client's, for the stream's channel options above.
 */
export class SidecarClients {
  private readonly clients = new Map<string, sidecar.SharedMemoryServiceClient>();

  get(address: string): sidecar.SharedMemoryServiceClient {
    let c = this.clients.get(address);
    if (!c) this.clients.set(address, (c = new sidecar.SharedMemoryServiceClient(address, credentials.createInsecure(), CLIENT_OPTIONS)));
    return c;
  }

  closeAll(): void {
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }
}

/** Opens ReceivePages on `client`; `who` names the destination in errors. */
export function openPageStream(client: sidecar.SharedMemoryServiceClient, who: string, stallMs = STALL_TIMEOUT_MS): PageSink {
  let failed: Error | null = null;
  let answer: sidecar.ReceivePagesResponse | null = null;
  let settle: (() => void) | null = null;
  const ended = new Promise<void>((resolve) => (settle = resolve));
  const stream = client.receivePages(new Metadata(), {}, (err: ServiceError | null, res?: sidecar.ReceivePagesResponse) => {
    if (err) failed ??= new Error(`${who} answered ${Status[err.code] ?? err.code}: ${err.details || err.message}`);
    else answer = res ?? { pages: 0, bytes: 0 };
    settle?.();
  });
  // Errors arrive through the callback; an unhandled 'error' event must not kill the process.
  stream.on("error", () => {});

  const stalled = <T>(what: string, p: Promise<T>): Promise<T> => {
    let timer: NodeJS.Timeout | undefined;
    const t = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        failed ??= new Error(`${who} made no progress for ${stallMs} ms (${what}); stream cancelled`);
        stream.cancel();
        reject(failed);
      }, stallMs);
    });
    return Promise.race([p, t]).finally(() => clearTimeout(timer));
  };

  return {
    write: (batch) => stream.write(batch),
    waitDrain: () =>
      stalled(
        "waiting for flow control",
        Promise.race([new Promise<void>((resolve) => stream.once("drain", () => resolve())), ended]),
      ).catch(() => undefined),
    failure: () => failed,
    async finish() {
      stream.end();
      await stalled("waiting for its answer", ended);
      if (failed) throw failed;
      return answer!;
    },
    cancel() {
      failed ??= new Error(`stream to ${who} cancelled`);
      stream.cancel();
    },
  };
}
