import { connect, type NatsConnection } from "@nats-io/transport-node";

export class NatsUnreachableError extends Error {
  override readonly name = "NatsUnreachableError";
}

/**
 * Connects to NATS for a service. The first connection must succeed within `timeoutMs`
 * (a service without its control plane is useless, so it fails fast with one line);
 * after that the client reconnects forever and buffers publishes while disconnected.
 */
export async function connectNats(url: string, name: string, timeoutMs = 5000): Promise<NatsConnection> {
  const servers = url.split(",").map((s) => s.trim());
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      return await connect({
        servers,
        name,
        timeout: Math.max(200, Math.min(2000, deadline - Date.now())),
        maxReconnectAttempts: -1,
        reconnectTimeWait: 250,
        pingInterval: 5000,
      });
    } catch (e) {
      last = e;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  const why = last instanceof Error ? last.message : String(last);
  throw new NatsUnreachableError(`cannot reach NATS at ${url} within ${timeoutMs} ms: ${why}`);
}

/** Drains subscriptions and flushes pending publishes, then closes. Never throws. */
export async function drainNats(nc: NatsConnection | undefined): Promise<void> {
  if (!nc || nc.isClosed()) return;
  try {
    await nc.drain();
  } catch {
    try {
      await nc.close();
    } catch {
      /* already closed */
    }
  }
}
