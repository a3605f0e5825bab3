// virtmesh demo (npm start): the main job. Brings the stack up in the foreground, sends
// one probe that crosses every service over gRPC and NATS under one trace, prints the
// report, the trace id and the span tree it received, and tears everything down.
import { OtlpReceiver, renderSpanTree, startTelemetry, shutdownTelemetry, type ReceivedSpan } from "@virtmesh/telemetry";
import type { Values } from "./main";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function demo(v: Values, _pos: string[]): Promise<number> {
  // Spans from every process come to this receiver (and on to the user's collector, if
  // OTEL_EXPORTER_OTLP_ENDPOINT is set), so the demo can print the trace it produced.
  const userCollector = process.env.OTEL_EXPORTER_OTLP_ENDPOINT || undefined;
  if (userCollector) process.env.VIRTMESH_USER_OTLP_ENDPOINT = userCollector;
  const receiver = new OtlpReceiver(userCollector);
  const url = await receiver.start();
  process.env.OTEL_EXPORTER_OTLP_ENDPOINT = url;
  process.env.OTEL_BSP_SCHEDULE_DELAY ??= "200";
  startTelemetry({ serviceName: "virtmesh-cli" });
  // gRPC is loaded only now, after the SDK has registered its instrumentation.
  const { runDemo } = require("./demo-run") as typeof import("./demo-run");
  try {
    return await runDemo(v, receiver);
  } finally {
    await shutdownTelemetry();
    await receiver.stop();
  }
}

export async function waitForTrace(receiver: OtlpReceiver, traceId: string, services: string[], timeoutMs: number): Promise<ReceivedSpan[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const spans = receiver.trace(traceId);
    const seen = new Set(spans.map((s) => s.service.split("@")[0]));
    if (services.every((s) => seen.has(s)) || Date.now() > deadline) return spans;
    await sleep(100);
  }
}

export { renderSpanTree };
