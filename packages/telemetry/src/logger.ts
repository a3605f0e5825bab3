// JSON logs (pino) that carry the active span's trace_id and span_id.
import pino, { type Logger } from "pino";
import { trace } from "@opentelemetry/api";

export type { Logger };

export function createLogger(bindings: Record<string, string | number> = {}): Logger {
  return pino({
    level: process.env.VIRTMESH_LOG_LEVEL ?? "info",
    base: { pid: process.pid, ...bindings },
    timestamp: pino.stdTimeFunctions.isoTime,
    mixin() {
      const span = trace.getActiveSpan();
      if (!span) return {};
      const c = span.spanContext();
      return { trace_id: c.traceId, span_id: c.spanId };
    },
  });
}
