// The probe: a request that walks a route of (service, host, transport) hops, each
// service forwarding it to the next over gRPC or NATS. `virtmesh demo` uses it to show
// one trace crossing every service over both transports. Every hop is checked: the
// request crossed a boundary.
import { status as Status, Metadata, type ServiceError } from "@grpc/grpc-js";
import { trace } from "@opentelemetry/api";
import { headers as natsHeaders, type Msg, type Subscription } from "@nats-io/transport-node";
import { NAME_RE } from "@virtmesh/config";
import { serviceSubject } from "@virtmesh/nats";
import { probe } from "@virtmesh/proto";
import { tracedRequest, withConsumerSpan } from "@virtmesh/telemetry";
import type { ServiceContext } from "./service";

const MAX_HOPS = 32;
const ERROR_HEADER = "Virtmesh-Error";
const CODE_HEADER = "Virtmesh-Code";

/** A probe failure carries the gRPC status it is answered with. */
export { GrpcError as ProbeError } from "./grpc";
import { GrpcError as ProbeError } from "./grpc";

export function checkRoute(route: probe.ProbeHop[]): void {
  if (route.length > MAX_HOPS) throw new ProbeError(Status.INVALID_ARGUMENT, `route has ${route.length} hops (at most ${MAX_HOPS})`);
  route.forEach((h, i) => {
    if (!NAME_RE.test(h.service)) throw new ProbeError(Status.INVALID_ARGUMENT, `hop ${i}: service '${h.service}' is not a valid name`);
    if (!NAME_RE.test(h.host)) throw new ProbeError(Status.INVALID_ARGUMENT, `hop ${i}: host '${h.host}' is not a valid name`);
    if (h.transport !== probe.Transport.TRANSPORT_GRPC && h.transport !== probe.Transport.TRANSPORT_NATS) {
      throw new ProbeError(Status.INVALID_ARGUMENT, `hop ${i}: transport must be TRANSPORT_GRPC or TRANSPORT_NATS`);
    }
  });
}

export class ProbeRouter {
  constructor(private readonly ctx: ServiceContext) {}

  async handle(req: probe.ProbeRequest, arrivedBy: probe.Transport): Promise<probe.ProbeResponse> {
    checkRoute(req.route);
    const sc = trace.getActiveSpan()?.spanContext();
    const me: probe.ProbeVisit = {
      service: this.ctx.instance,
      host: this.ctx.config.host,
      arrivedBy,
      pid: process.pid,
      traceId: sc?.traceId ?? "",
      spanId: sc?.spanId ?? "",
    };
    const [next, ...rest] = req.route;
    if (!next) return { visits: [me] };
    const fwd: probe.ProbeRequest = { route: rest, payload: req.payload };
    let downstream: probe.ProbeResponse;
    if (next.transport === probe.Transport.TRANSPORT_GRPC) {
      const client = await this.ctx.client(next.host, next.service, probe.ProbeServiceClient);
      downstream = await new Promise((resolve, reject) =>
        client.probe(fwd, new Metadata(), { deadline: Date.now() + 10_000 }, (err: ServiceError | null, res?: probe.ProbeResponse) =>
          err ? reject(new ProbeError(err.code ?? Status.UNKNOWN, `${next.service}@${next.host}: ${err.details || err.message}`)) : resolve(res!),
        ),
      );
    } else {
      let reply: Msg;
      try {
        reply = await tracedRequest(this.ctx.nc, serviceSubject(next.host, next.service, "probe"), probe.ProbeRequest.encode(fwd).finish(), {
          timeout: 10_000,
        });
      } catch (e) {
        throw new ProbeError(Status.UNAVAILABLE, `${next.service}@${next.host} over NATS: ${(e as Error).message}`);
      }
      const err = reply.headers?.get(ERROR_HEADER);
      if (err) throw new ProbeError(Number(reply.headers?.get(CODE_HEADER) || Status.UNKNOWN), err);
      try {
        downstream = probe.ProbeResponse.decode(reply.data);
      } catch (e) {
        throw new ProbeError(Status.INTERNAL, `${next.service}@${next.host} sent an undecodable probe reply: ${(e as Error).message}`);
      }
    }
    return { visits: [me, ...downstream.visits] };
  }

  readonly grpcServer: probe.ProbeServiceServer = {
    probe: (call, cb) => {
      this.handle(call.request, probe.Transport.TRANSPORT_GRPC).then(
        (res) => cb(null, res),
        (e: unknown) => cb({ code: e instanceof ProbeError ? e.code : Status.INTERNAL, details: (e as Error).message }),
      );
    },
  };

  subscribeNats(): Subscription {
    const subject = serviceSubject(this.ctx.config.host, this.ctx.instance, "probe");
    return this.ctx.nc.subscribe(subject, {
      callback: (err, msg) => {
        if (err) return;
        void withConsumerSpan(msg, async () => {
          let req: probe.ProbeRequest;
          try {
            req = probe.ProbeRequest.decode(msg.data);
          } catch (e) {
            throw new ProbeError(Status.INVALID_ARGUMENT, `undecodable probe request: ${(e as Error).message}`);
          }
          const res = await this.handle(req, probe.Transport.TRANSPORT_NATS);
          msg.respond(probe.ProbeResponse.encode(res).finish());
        }).catch((e: unknown) => {
          const h = natsHeaders();
          h.set(ERROR_HEADER, (e as Error).message.replace(/[\r\n]+/g, " "));
          h.set(CODE_HEADER, String(e instanceof ProbeError ? e.code : Status.INTERNAL));
          msg.respond(new Uint8Array(0), { headers: h });
        });
      },
    });
  }
}
