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
import { NodeTracerProvider, BatchSpanProcessor, NoopSpanProcessor, type SpanProcessor } from "@opentelemetry/sdk-trace-node";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { GrpcInstrumentation } from "@opentelemetry/instrumentation-grpc";
import { registerInstrumentations } from "@opentelemetry/instrumentation";
import { detectResources, envDetector, resourceFromAttributes } from "@opentelemetry/resources";

let provider: NodeTracerProvider | undefined;
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
  provider = new NodeTracerProvider({ resource, spanProcessors: [processor] });
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
