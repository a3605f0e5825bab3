// Starts OpenTelemetry tracing for Node from the standard OTEL_* environment variables:
// OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (resource), OTEL_TRACES_SAMPLER[_ARG],
// OTEL_BSP_* (batching) and OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT. Spans are exported over
// OTLP/HTTP when an endpoint is set; otherwise they are still created and sampled (trace
// ids appear in logs and propagate) but go nowhere. gRPC client and server spans come from
// instrumentation-grpc, which must be registered before @grpc/grpc-js is first required:
// services load this through the preload flag (`--require @virtmesh/telemetry/register`).
//
// This composes the Node SDK's parts (sdk-trace-node, the OTLP exporter, the W3C
// propagator) rather than @opentelemetry/sdk-node, whose loading of every exporter costs
// about a second of CPU per process, and a host runs a dozen processes.
import { trace, type Context, type Span, type SpanOptions } from "@opentelemetry/api";
import { NodeTracerProvider, BatchSpanProcessor, NoopSpanProcessor, RandomIdGenerator, type IdGenerator, type SpanProcessor } from "@opentelemetry/sdk-trace-node";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { GrpcInstrumentation } from "@opentelemetry/instrumentation-grpc";
import { registerInstrumentations } from "@opentelemetry/instrumentation";
import { detectResources, envDetector, resourceFromAttributes } from "@opentelemetry/resources";

let provider: NodeTracerProvider | undefined;

/**
 * Random ids, except that the next span id can be given: a span begun in a
 * thread without a tracer (a guest vCPU worker) has already handed its id on as
 * the parent of host spans, and is recorded here afterwards under that id.
 */
class PresetIdGenerator implements IdGenerator {
  private readonly random = new RandomIdGenerator();
  nextSpanId: string | null = null;
  generateTraceId(): string {
    return this.random.generateTraceId();
  }
  generateSpanId(): string {
    const id = this.nextSpanId;
    if (id !== null) {
      this.nextSpanId = null;
      return id;
    }
    return this.random.generateSpanId();
  }
}
const ids = new PresetIdGenerator();
const SPAN_ID_RE = /^(?!0{16})[0-9a-f]{16}$/;

/**
 * Starts a span with a span id chosen elsewhere (16 lower-case hex digits, not
 * all zero). Give startTime in options to record a span that already happened.
 * Without startTelemetry() the span is the API's no-op span.
 */
export function startSpanWithId(spanId: string, name: string, options: SpanOptions, parent: Context): Span {
  if (!SPAN_ID_RE.test(spanId)) throw new RangeError(`span id ${JSON.stringify(spanId)} is not 16 lower-case hex digits`);
  ids.nextSpanId = spanId;
  try {
    return trace.getTracer("virtmesh").startSpan(name, options, parent);
  } finally {
    ids.nextSpanId = null;
  }
}
let unregister: (() => void) | undefined;

export interface TelemetryOptions {
  serviceName?: string;
  attributes?: Record<string, string>;
}

export function telemetryStarted(): boolean {
  return provider !== undefined;
}

export function startTelemetry(opts: TelemetryOptions = {}): void {
  if (provider) return;
  const endpoint = process.env.OTEL_EXPORTER_OTLP_ENDPOINT || process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
  const processor: SpanProcessor = endpoint ? new BatchSpanProcessor(new OTLPTraceExporter()) : new NoopSpanProcessor();
  const serviceName = opts.serviceName ?? process.env.OTEL_SERVICE_NAME ?? "virtmesh";
  const resource = detectResources({ detectors: [envDetector] }).merge(
    resourceFromAttributes({
      "service.name": serviceName,
      "service.namespace": "virtmesh",
      "process.pid": process.pid,
      ...(process.env.VIRTMESH_HOST ? { "virtmesh.host": process.env.VIRTMESH_HOST } : {}),
      ...opts.attributes,
    }),
  );
  provider = new NodeTracerProvider({ resource, spanProcessors: [processor], idGenerator: ids });
  // Registers the provider, AsyncLocalStorage context and the W3C trace-context propagator.
  provider.register();
  unregister = registerInstrumentations({ tracerProvider: provider, instrumentations: [new GrpcInstrumentation()] });
}

/** Flushes and stops tracing; safe to call more than once. */
export async function shutdownTelemetry(): Promise<void> {
  const p = provider;
  provider = undefined;
  if (p) {
    try {
      await p.shutdown();
    } catch {
      // The collector may be gone at shutdown; losing the last batch must not fail the exit.
    }
    unregister?.();
  }
}
