// migration-manager: the cluster's migration controller. Serves MigrationService; the
// engine (engine.ts) drives each migration over the hosts' gRPC APIs; records live in the
// JetStream KV bucket `virtmesh-migrations` and every change goes out on NATS
// `virtmesh.vm.<vm>.migration`.
import { status as Status, type ServerWritableStream } from "@grpc/grpc-js";
import { trace } from "@opentelemetry/api";
import { Kvm, type KV } from "@nats-io/kv";
import { vmSubject } from "@virtmesh/nats";
import { migration } from "@virtmesh/proto";
import { GrpcError, runService, unary } from "@virtmesh/runtime";
import { tracedPublish } from "@virtmesh/telemetry";
import { GrpcPeers } from "./grpc-peers";
import { MigrationManager, type ClusterView, type MigrationStore } from "./manager";

export const MIGRATIONS_BUCKET = "virtmesh-migrations";
const enc = new TextEncoder();
const dec = new TextDecoder();

/** Migration records as MigrationStatus JSON, one key per migration id. */
class KvMigrationStore implements MigrationStore {
  constructor(private readonly kv: KV) {}

  static async open(kvm: Kvm): Promise<KvMigrationStore> {
    return new KvMigrationStore(await kvm.create(MIGRATIONS_BUCKET, { history: 1 }));
  }

  async put(s: migration.MigrationStatus): Promise<void> {
    await this.kv.put(s.id, enc.encode(JSON.stringify(migration.MigrationStatus.toJSON(s))));
  }

  async get(id: string): Promise<migration.MigrationStatus | undefined> {
    if (!/^[A-Za-z0-9_=.-]+$/.test(id)) return undefined;
    const e = await this.kv.get(id);
    if (!e || e.operation !== "PUT") return undefined;
    try {
      return migration.MigrationStatus.fromJSON(JSON.parse(dec.decode(e.value)));
    } catch {
      return undefined;
    }
  }

  async list(): Promise<migration.MigrationStatus[]> {
    const keys: string[] = [];
    for await (const k of await this.kv.keys()) keys.push(k);
    const out: migration.MigrationStatus[] = [];
    for (const k of keys) {
      const s = await this.get(k);
      if (s) out.push(s);
    }
    return out;
  }
}

void runService({
  name: "migration-manager",
  hostScoped: false,
  async setup(ctx) {
    const store = await KvMigrationStore.open(new Kvm(ctx.nc));
    const peers = new GrpcPeers(ctx.registry);
    const cluster: ClusterView = {
      vmHost: async (vm) => (await ctx.registry.getVm(vm))?.host,
      hosts: () => ctx.registry.knownHosts(),
      registered: async (host, instance) => (await ctx.registry.getService(host, instance)) !== undefined,
    };
    const manager = new MigrationManager({
      peers,
      store,
      cluster,
      logger: ctx.logger,
      publish: (s) => tracedPublish(ctx.nc, vmSubject(s.vm, "migration"), JSON.stringify(migration.MigrationStatus.toJSON(s))),
    });
    // Migrations a killed manager left behind: failed (or finished) cleanly, in the background.
    const recovered = await manager.recover();
    if (recovered.stale.length) ctx.logger.warn({ migrations: recovered.stale }, "unfinished migrations from a previous manager: rolling them back");
    void recovered.done.catch((e: unknown) => ctx.logger.warn({ err: (e as Error).message }, "migration recovery failed"));

    const impl: migration.MigrationServiceServer = {
      startMigration: unary((req: migration.StartMigrationRequest) => {
        const sc = trace.getActiveSpan()?.spanContext();
        return manager.start(req, sc && trace.isSpanContextValid(sc) ? [{ context: sc }] : []);
      }),
      getMigration: unary((req: migration.MigrationRef) => manager.get(req.id)),
      cancelMigration: unary((req: migration.MigrationRef) => manager.cancel(req.id)),
      listMigrations: unary(async () => ({ migrations: await manager.list() })),
      watchMigration: (call: ServerWritableStream<migration.MigrationRef, migration.MigrationStatus>) => {
        let stop: (() => void) | undefined;
        let ended = false;
        const end = () => {
          ended = true;
          stop?.();
        };
        call.on("cancelled", end);
        call.on("close", end);
        manager
          .watch(call.request.id, (s, final) => {
            if (ended) return;
            call.write(s);
            if (final) {
              ended = true;
              call.end();
            }
          })
          .then(
            (unsubscribe) => {
              stop = unsubscribe;
              if (ended) unsubscribe();
            },
            (e: unknown) => {
              ended = true;
              const code = e instanceof GrpcError ? e.code : Status.INTERNAL;
              call.emit("error", { code, details: (e as Error).message });
            },
          );
      },
    };
    ctx.addService("virtmesh.migration.v1.MigrationService", migration.MigrationServiceService, impl);

    return {
      quiesce() {
        for (const r of manager.active()) {
          try {
            r.requestCancel();
          } catch {
            /* the destination is resuming: let it finish */
          }
        }
      },
      async stop() {
        await manager.stopAll(20_000);
        peers.close();
      },
    };
  },
});
