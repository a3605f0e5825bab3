// startSpanWithId: a span recorded after the fact under the id a worker thread
// already handed on reaches the collector with that id, its parent and its times.
import { test } from "node:test";
import assert from "node:assert/strict";
import { context, trace } from "@opentelemetry/api";
import { OtlpReceiver } from "./receiver";
import { shutdownTelemetry, startSpanWithId, startTelemetry } from "./sdk";

test("a span can be recorded under a preset span id", async () => {
  const rx = new OtlpReceiver();
  const url = await rx.start();
  process.env.OTEL_EXPORTER_OTLP_ENDPOINT = url;
  try {
    startTelemetry({ serviceName: "span-id-test" });
    const parent = trace.getTracer("t").startSpan("parent");
    const ctx = trace.setSpan(context.active(), parent);
    const t0 = Date.now() - 50;
    const child = startSpanWithId("00f067aa0ba902b7", "virtio-blk IN", { startTime: t0, attributes: { "fio.job": 3 } }, ctx);
    child.end(t0 + 10);
    // The id generator is back to random ids.
    const other = trace.getTracer("t").startSpan("other", {}, ctx);
    assert.notEqual(other.spanContext().spanId, "00f067aa0ba902b7");
    other.end();
    parent.end();
    assert.throws(() => startSpanWithId("xyz", "bad", {}, ctx), /16 lower-case hex digits/);
    assert.throws(() => startSpanWithId("0000000000000000", "bad", {}, ctx), /16 lower-case hex digits/);
    await shutdownTelemetry();
    const got = rx.spans.find((s) => s.spanId === "00f067aa0ba902b7");
    assert.ok(got, "the span arrived under its preset id");
    assert.equal(got.parentSpanId, parent.spanContext().spanId);
    assert.equal(got.traceId, parent.spanContext().traceId);
    assert.equal(got.attributes["fio.job"], 3);
    assert.equal(Number((got.endNs - got.startNs) / 1_000_000n), 10);
  } finally {
    delete process.env.OTEL_EXPORTER_OTLP_ENDPOINT;
    await shutdownTelemetry();
    await rx.stop();
  }
});
