// Refusals through a real gRPC server on loopback: a handler that echoes a caller's
// 300 KB name in its error answers at once with a short message (uncapped, the status does
// not fit the trailers and the call hangs until its deadline), each refusal is logged once,
// answers that succeed and server streams pass untouched.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { credentials, Metadata, Server, ServerCredentials, status as Status, type ServiceError } from "@grpc/grpc-js";
import { probe } from "@virtmesh/proto";
import { capDetails, guardRefusals, MAX_DETAILS } from "./refusals";
import { GrpcError, unary } from "./grpc";

const server = new Server();
let client: probe.ProbeServiceClient;
const logged: { method: string; code: number; message: string }[] = [];

before(async () => {
  const impl: probe.ProbeServiceServer = {
    probe: unary((req: probe.ProbeRequest): probe.ProbeResponse => {
      if (req.payload.length > 16) throw new GrpcError(Status.INVALID_ARGUMENT, `payload '${req.payload}' is longer than 16 characters`);
      return { visits: [{ service: req.payload, host: "", pid: 0, arrivedBy: 0, traceId: "", spanId: "" }] };
    }),
  };
  server.addService(probe.ProbeServiceService, guardRefusals(probe.ProbeServiceService, impl, (f, message) => logged.push({ method: f.method, code: f.code, message })));
  const port = await new Promise<number>((resolve, reject) => server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  client = new probe.ProbeServiceClient(`127.0.0.1:${port}`, credentials.createInsecure());
});

after(() => {
  client.close();
  server.forceShutdown();
});

const call = (payload: string) =>
  new Promise<{ err: ServiceError | null; res?: probe.ProbeResponse }>((resolve) =>
    client.probe({ route: [], payload }, new Metadata(), { deadline: Date.now() + 10_000 }, (err, res) => resolve({ err, res })),
  );

test("capDetails keeps short messages and cuts long ones to a prefix that says how long they were", () => {
  assert.equal(capDetails("short"), "short");
  const cut = capDetails("x".repeat(300_000));
  assert.ok(cut.length <= MAX_DETAILS);
  assert.match(cut, /… \(300\d{3} characters, cut\)$/);
});

test("a refusal that would echo 300 KB answers INVALID_ARGUMENT at once with a short message, logged once", async () => {
  const r = await call("n".repeat(300_000));
  assert.ok(r.err, "refused");
  assert.equal(r.err.code, Status.INVALID_ARGUMENT, r.err.details);
  assert.ok(r.err.details.length <= MAX_DETAILS);
  assert.match(r.err.details, /^payload 'nnn/);
  assert.deepEqual(logged.map((l) => [l.method, l.code]), [["/virtmesh.common.v1.ProbeService/Probe", Status.INVALID_ARGUMENT]]);
  // The server keeps serving: a good call goes through, and is not logged.
  const ok = await call("fine");
  assert.equal(ok.err, null);
  assert.equal(ok.res?.visits[0]?.service, "fine");
  assert.equal(logged.length, 1);
});
