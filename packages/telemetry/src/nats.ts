// NATS has no official OpenTelemetry instrumentation: W3C trace context is injected
// into message headers by the publisher (PRODUCER span) and extracted by the consumer
// (CONSUMER span), with messaging.system=nats.
import { context, propagation, trace, SpanKind, SpanStatusCode, type Span, type Context } from "@opentelemetry/api";
import { headers as natsHeaders, type MsgHdrs, type Msg, type NatsConnection, type RequestOptions } from "@nats-io/transport-node";

const tracer = () => trace.getTracer("virtmesh.nats");

const setter = { set: (h: MsgHdrs, k: string, v: string) => h.set(k, v) };
const getter = {
  get: (h: MsgHdrs | undefined, k: string) => h?.get(k) || undefined,
  keys: (h: MsgHdrs | undefined) => (h ? [...h.keys()] : []),
};

function attrs(subject: string, op: string, size: number) {
  return {
    "messaging.system": "nats",
    "messaging.destination.name": subject,
    "messaging.operation.type": op,
    "messaging.message.body.size": size,
  };
}

/** A PRODUCER span for a message to `subject`, and headers carrying its context. */
function producerSpan(subject: string, size: number): { span: Span; h: MsgHdrs } {
  const span = tracer().startSpan(`send ${subject}`, { kind: SpanKind.PRODUCER, attributes: attrs(subject, "send", size) });
  const h = natsHeaders();
  propagation.inject(trace.setSpan(context.active(), span), h, setter);
  return { span, h };
}

function failSpan(span: Span, e: unknown): void {
  span.recordException(e as Error);
  span.setStatus({ code: SpanStatusCode.ERROR, message: (e as Error).message });
}

/** Publishes with a PRODUCER span and the trace context in the headers. */
export function tracedPublish(nc: NatsConnection, subject: string, data: Uint8Array | string): void {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const { span, h } = producerSpan(subject, bytes.length);
  try {
    nc.publish(subject, bytes, { headers: h });
  } finally {
    span.end();
  }
}

/** Request/reply with a PRODUCER span around the round trip. */
export async function tracedRequest(
  nc: NatsConnection,
  subject: string,
  data: Uint8Array,
  opts: Partial<RequestOptions> = {},
): Promise<Msg> {
  const { span, h } = producerSpan(subject, data.length);
  try {
    return await nc.request(subject, data, { timeout: 5000, ...opts, headers: h });
  } catch (e) {
    failSpan(span, e);
    throw e;
  } finally {
    span.end();
  }
}

/** The context carried by a received message's headers. */
export function extractContext(msg: Msg): Context {
  return propagation.extract(context.active(), msg.headers, getter);
}

/**
 * Runs `fn` inside a CONSUMER span whose parent is the context in the message headers.
 * Errors are recorded on the span and rethrown.
 */
export async function withConsumerSpan<T>(msg: Msg, fn: (span: Span) => Promise<T> | T): Promise<T> {
  const parent = extractContext(msg);
  const span = tracer().startSpan(
    `process ${msg.subject}`,
    { kind: SpanKind.CONSUMER, attributes: attrs(msg.subject, "process", msg.data.length) },
    parent,
  );
  try {
    return await context.with(trace.setSpan(parent, span), () => fn(span));
  } catch (e) {
    failSpan(span, e);
    throw e;
  } finally {
    span.end();
  }
}
