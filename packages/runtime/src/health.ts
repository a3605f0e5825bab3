// grpc.health.v1 (https://github.com/grpc/grpc/blob/master/doc/health-checking.md):
// "" is the whole server; each API registers its fully-qualified service name.
import { status as Status, type ServerWritableStream } from "@grpc/grpc-js";
import { health } from "@virtmesh/proto";

const S = health.HealthCheckResponse_ServingStatus;
type ServingStatus = health.HealthCheckResponse_ServingStatus;

export class HealthImplementation {
  private readonly statuses = new Map<string, ServingStatus>();
  private readonly watchers = new Map<string, Set<ServerWritableStream<health.HealthCheckRequest, health.HealthCheckResponse>>>();

  setStatus(service: string, status: ServingStatus): void {
    this.statuses.set(service, status);
    for (const w of this.watchers.get(service) ?? []) w.write({ status });
  }

  /** Marks every registered service NOT_SERVING (first step of a graceful shutdown). */
  setAllNotServing(): void {
    for (const k of this.statuses.keys()) this.setStatus(k, S.NOT_SERVING);
  }

  readonly server: health.HealthServer = {
    check: (call, cb) => {
      const st = this.statuses.get(call.request.service);
      if (st === undefined) {
        cb({ code: Status.NOT_FOUND, details: `unknown service '${call.request.service}'` });
        return;
      }
      cb(null, { status: st });
    },
    watch: (call) => {
      const name = call.request.service;
      call.write({ status: this.statuses.get(name) ?? S.SERVICE_UNKNOWN });
      let set = this.watchers.get(name);
      if (!set) this.watchers.set(name, (set = new Set()));
      set.add(call);
      call.on("cancelled", () => set.delete(call));
      call.on("close", () => set.delete(call));
    },
  };

  endWatches(): void {
    for (const set of this.watchers.values()) for (const w of set) w.end();
    this.watchers.clear();
  }
}
