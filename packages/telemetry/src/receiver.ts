// A minimal OTLP/HTTP (JSON) trace receiver. `virtmesh demo` runs one to print the span
// tree it saw, and e2e tests run one to assert parent->child edges between services.
// When `forwardTo` is set (a user's Jaeger or collector), every payload is passed on.
import { createServer, type Server } from "node:http";

export interface ReceivedSpan {
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  kind: number;
  service: string;
  startNs: bigint;
  endNs: bigint;
  attributes: Record<string, string | number | boolean>;
}

interface OtlpAnyValue {
  stringValue?: string;
  intValue?: string | number;
  doubleValue?: number;
  boolValue?: boolean;
}
interface OtlpKeyValue {
  key: string;
  value?: OtlpAnyValue;
}
interface OtlpSpan {
  traceId?: string;
  spanId?: string;
  parentSpanId?: string;
  name?: string;
  kind?: number;
  startTimeUnixNano?: string | number;
  endTimeUnixNano?: string | number;
  attributes?: OtlpKeyValue[];
}
interface OtlpRequest {
  resourceSpans?: { resource?: { attributes?: OtlpKeyValue[] }; scopeSpans?: { spans?: OtlpSpan[] }[] }[];
}

function value(v: OtlpAnyValue | undefined): string | number | boolean {
  if (!v) return "";
  if (v.stringValue !== undefined) return v.stringValue;
  if (v.intValue !== undefined) return Number(v.intValue);
  if (v.doubleValue !== undefined) return v.doubleValue;
  if (v.boolValue !== undefined) return v.boolValue;
  return "";
}

function attrs(list: OtlpKeyValue[] | undefined): Record<string, string | number | boolean> {
  const out: Record<string, string | number | boolean> = {};
  for (const kv of list ?? []) out[kv.key] = value(kv.value);
  return out;
}

export function parseOtlpJson(body: string): ReceivedSpan[] {
  const req = JSON.parse(body) as OtlpRequest;
  const out: ReceivedSpan[] = [];
  for (const rs of req.resourceSpans ?? []) {
    const res = attrs(rs.resource?.attributes);
    const host = res["virtmesh.host"];
    const service = `${String(res["service.name"] ?? "unknown")}${host ? `@${String(host)}` : ""}`;
    for (const ss of rs.scopeSpans ?? []) {
      for (const s of ss.spans ?? []) {
        out.push({
          traceId: s.traceId ?? "",
          spanId: s.spanId ?? "",
          parentSpanId: s.parentSpanId ?? "",
          name: s.name ?? "",
          kind: s.kind ?? 0,
          service,
          startNs: BigInt(s.startTimeUnixNano ?? 0),
          endNs: BigInt(s.endTimeUnixNano ?? 0),
          attributes: attrs(s.attributes),
        });
      }
    }
  }
  return out;
}

export class OtlpReceiver {
  readonly spans: ReceivedSpan[] = [];
  private server: Server | undefined;
  url = "";

  constructor(private readonly forwardTo?: string) {}

  async start(): Promise<string> {
    this.server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        const body = Buffer.concat(chunks);
        if (req.method === "POST" && req.url === "/v1/traces") {
          try {
            this.spans.push(...parseOtlpJson(body.toString("utf8")));
          } catch {
            res.writeHead(400).end('{"error":"expected OTLP/HTTP JSON"}');
            return;
          }
          if (this.forwardTo) {
            void fetch(`${this.forwardTo.replace(/\/$/, "")}/v1/traces`, {
              method: "POST",
              headers: { "content-type": "application/json" },
              body,
            }).catch(() => undefined);
          }
          res.writeHead(200, { "content-type": "application/json" }).end("{}");
          return;
        }
        res.writeHead(404).end();
      });
    });
    await new Promise<void>((r) => this.server!.listen(0, "127.0.0.1", r));
    const a = this.server.address();
    this.url = `http://127.0.0.1:${typeof a === "object" && a ? a.port : 0}`;
    return this.url;
  }

  trace(traceId: string): ReceivedSpan[] {
    return this.spans.filter((s) => s.traceId === traceId);
  }

  async stop(): Promise<void> {
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }
}

/** Renders a trace as an indented tree: name [kind] service. */
export function renderSpanTree(spans: ReceivedSpan[]): string {
  const kinds = ["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"];
  const byParent = new Map<string, ReceivedSpan[]>();
  const ids = new Set(spans.map((s) => s.spanId));
  for (const s of spans) {
    const p = s.parentSpanId && ids.has(s.parentSpanId) ? s.parentSpanId : "";
    let l = byParent.get(p);
    if (!l) byParent.set(p, (l = []));
    l.push(s);
  }
  for (const l of byParent.values()) l.sort((a, b) => (a.startNs < b.startNs ? -1 : a.startNs > b.startNs ? 1 : 0));
  const lines: string[] = [];
  const walk = (parent: string, prefix: string) => {
    const kids = byParent.get(parent) ?? [];
    kids.forEach((s, i) => {
      const last = i === kids.length - 1;
      const ms = Number(s.endNs - s.startNs) / 1e6;
      lines.push(`${prefix}${last ? "└─ " : "├─ "}${s.name} [${kinds[s.kind] ?? s.kind}] ${s.service} ${ms.toFixed(1)} ms`);
      walk(s.spanId, prefix + (last ? "   " : "│  "));
    });
  };
  walk("", "");
  return lines.join("\n");
}
