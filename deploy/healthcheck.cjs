#!/usr/bin/env node
// Container health probe for every virtmesh service: calls grpc.health.v1.Health/Check
// (service "") on the service's own gRPC port and exits 0 only for SERVING.
// Plain node:http2 (gRPC is HTTP/2 + 5-byte message framing), no dependency and no tsx,
// so it runs the same in the tsx image and in a compiled one; a TCP connect alone (the
// old probe) says "healthy" while a service is still waiting for NATS or its sidecar.
// Usage: node deploy/healthcheck.cjs [port] [host]  (defaults: $VIRTMESH_GRPC_PORT,
// $VIRTMESH_GRPC_BIND unless it is 0.0.0.0, else 127.0.0.1). Exit 0 SERVING, 1 otherwise.
"use strict";
const http2 = require("node:http2");

const port = Number(process.argv[2] || process.env.VIRTMESH_GRPC_PORT || 0);
const bind = process.env.VIRTMESH_GRPC_BIND;
const host = process.argv[3] || (bind && bind !== "0.0.0.0" && bind !== "::" ? bind : "127.0.0.1");
const timeoutMs = Number(process.env.HEALTHCHECK_TIMEOUT_MS || 2000);

function fail(why) {
  process.stderr.write(`healthcheck ${host}:${port}: ${why}\n`);
  process.exit(1);
}

if (!Number.isInteger(port) || port <= 0 || port > 65535) fail("no gRPC port (VIRTMESH_GRPC_PORT unset or 0: give the port as the first argument)");

const timer = setTimeout(() => fail(`no answer within ${timeoutMs} ms`), timeoutMs);
const session = http2.connect(`http://${host.includes(":") ? `[${host}]` : host}:${port}`);
session.on("error", (e) => fail(e.message));
const req = session.request({
  ":method": "POST",
  ":path": "/grpc.health.v1.Health/Check",
  "content-type": "application/grpc",
  te: "trailers",
});
// HealthCheckRequest{service: ""} encodes to zero bytes: one uncompressed frame of length 0.
req.end(Buffer.alloc(5));
const chunks = [];
let grpcStatus;
req.on("response", (h) => {
  if (h["grpc-status"] !== undefined) grpcStatus = String(h["grpc-status"]);
});
req.on("trailers", (t) => {
  if (t["grpc-status"] !== undefined) grpcStatus = String(t["grpc-status"]);
});
req.on("data", (c) => chunks.push(c));
req.on("error", (e) => fail(e.message));
req.on("end", () => {
  clearTimeout(timer);
  session.close();
  if (grpcStatus !== "0") fail(`grpc-status ${grpcStatus}`);
  const body = Buffer.concat(chunks);
  // HealthCheckResponse: field 1 (status, varint) = tag 0x08; SERVING = 1. The enum is
  // small, so one varint byte; an absent field means UNKNOWN (0).
  const msg = body.subarray(5, 5 + (body.length >= 5 ? body.readUInt32BE(1) : 0));
  let status = 0;
  for (let i = 0; i < msg.length; ) {
    const tag = msg[i++];
    if (tag === 0x08) status = msg[i++];
    else break;
  }
  if (status !== 1) fail(`status ${["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"][status] ?? status}`);
  process.exit(0);
});
