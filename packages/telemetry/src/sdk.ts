// Starts the OpenTelemetry Node SDK from the standard OTEL_* environment variables.
// Spans are exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise
// they are still created and sampled (so trace ids appear in logs and propagate), but
// go nowhere. gRPC client and server spans come from instrumentation-grpc, which must
// be registered before @grpc/grpc-js is first required: services load this through
// the preload flag (`--require @virtmesh/telemetry/register`), never from handlers.
import { NodeSDK } from "@opentelemetry/sdk-node";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { GrpcInstrumentation } from "@opentelemetry/instrumentation-grpc";
import { BatchSpanProcessor, NoopSpanProcessor, type SpanProcessor } from "@opentelemetry/sdk-trace-base";
import { resourceFromAttributes } from "@opentelemetry/resources";

let sdk: NodeSDK | undefined;

export interface TelemetryOptions {
  serviceName?: string;
  attributes?: Record<string, string>;
}

export function telemetryStarted(): boolean {
  return sdk !== undefined;
}

export function startTelemetry(opts: TelemetryOptions = {}): void {
  if (sdk) return;
  // The SDK would otherwise configure log and metric exporters from defaults that point
  // at a collector that may not exist.
  process.env.OTEL_LOGS_EXPORTER ??= "none";
  process.env.OTEL_METRICS_EXPORTER ??= "none";
  const endpoint = process.env.OTEL_EXPORTER_OTLP_ENDPOINT || process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
  const processor: SpanProcessor = endpoint ? new BatchSpanProcessor(new OTLPTraceExporter()) : new NoopSpanProcessor();
  const serviceName = opts.serviceName ?? process.env.OTEL_SERVICE_NAME ?? "virtmesh";
  sdk = new NodeSDK({
    serviceName,
    resource: resourceFromAttributes({
      "service.name": serviceName,
      "service.namespace": "virtmesh",
      ...(process.env.VIRTMESH_HOST ? { "virtmesh.host": process.env.VIRTMESH_HOST } : {}),
      ...opts.attributes,
    }),
    spanProcessors: [processor],
    logRecordProcessors: [],
    instrumentations: [new GrpcInstrumentation()],
  });
  sdk.start();
}

/** Flushes and stops the SDK; safe to call more than once. */
export async function shutdownTelemetry(): Promise<void> {
  const s = sdk;
  sdk = undefined;
  if (s) {
    try {
      await s.shutdown();
    } catch {
      // The collector may be gone at shutdown; losing the last batch must not fail the exit.
    }
  }
}
