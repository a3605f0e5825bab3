// Stand-in for Jaeger where there is no Jaeger image (deploy/compose.hostnet.yml): the
// project's own OtlpReceiver (@virtmesh/telemetry) behind a fixed address, because the
// receiver itself listens on an ephemeral 127.0.0.1 port. Every OTLP/HTTP JSON payload
// posted to /v1/traces is passed to it; tests read what it kept:
//   GET /v1/spans[?traceId=<hex>]  -> JSON array of spans (times as decimal strings)
//   GET /v1/tree?traceId=<hex>     -> the trace as an indented text tree
//   GET /healthz                   -> 200
// Run: node --require tsx/cjs deploy/otlp-receiver.ts
// Env: OTLP_RECEIVER_BIND (127.0.0.1), OTLP_RECEIVER_PORT (4318),
//      OTLP_RECEIVER_FORWARD (an OTLP/HTTP endpoint to pass every payload on to; optional).
import { createServer } from "node:http";
import { OtlpReceiver, renderSpanTree, type ReceivedSpan } from "@virtmesh/telemetry";

const bind = process.env.OTLP_RECEIVER_BIND || "127.0.0.1";
const port = Number(process.env.OTLP_RECEIVER_PORT || 4318);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write(`otlp-receiver: bad configuration: OTLP_RECEIVER_PORT=${process.env.OTLP_RECEIVER_PORT} is not a TCP port\n`);
  process.exit(2);
}

const json = (spans: ReceivedSpan[]) =>
  JSON.stringify(spans, (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : v));

async function main(): Promise<void> {
  const rx = new OtlpReceiver(process.env.OTLP_RECEIVER_FORWARD || undefined);
  const inner = await rx.start();
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? "/", "http://receiver");
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      if (req.method === "POST" && url.pathname === "/v1/traces") {
        fetch(`${inner}/v1/traces`, { method: "POST", headers: { "content-type": "application/json" }, body: Buffer.concat(chunks) })
          .then(async (r) => res.writeHead(r.status, { "content-type": "application/json" }).end(await r.text()))
          .catch((e: Error) => res.writeHead(502).end(JSON.stringify({ error: e.message })));
        return;
      }
      if (req.method === "GET" && url.pathname === "/healthz") {
        res.writeHead(200).end("ok");
        return;
      }
      const traceId = url.searchParams.get("traceId");
      const spans = traceId ? rx.trace(traceId) : rx.spans;
      if (req.method === "GET" && url.pathname === "/v1/spans") {
        res.writeHead(200, { "content-type": "application/json" }).end(json(spans));
        return;
      }
      if (req.method === "GET" && url.pathname === "/v1/tree") {
        res.writeHead(200, { "content-type": "text/plain; charset=utf-8" }).end(renderSpanTree(spans) + "\n");
        return;
      }
      res.writeHead(404).end();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, bind, resolve);
  });
  process.stdout.write(`otlp-receiver: OTLP/HTTP on http://${bind}:${port}/v1/traces (spans: GET /v1/spans)\n`);
  const stop = () => {
    server.close();
    void rx.stop().then(() => process.exit(0));
  };
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
}

main().catch((e: Error) => {
  process.stderr.write(`otlp-receiver: ${e.message}\n`);
  process.exit(1);
});
