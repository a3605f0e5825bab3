// The skeleton every virtmesh service runs on: configuration from the environment,
// NATS and the registry, a gRPC server with grpc.health.v1 and the probe API, heartbeats,
// and a clean shutdown on SIGTERM/SIGINT (stop accepting, drain, deregister, exit 0).
// Services stay thin: they add their own gRPC API and start their own work in `setup`.
import {
  Server,
  ServerCredentials,
  status as Status,
  type ServiceDefinition,
  type UntypedServiceImplementation,
  type Client,
} from "@grpc/grpc-js";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { ConfigError, checkName, serviceConfig, type ServiceConfig } from "@virtmesh/config";
import { connectNats, drainNats, Registry, serviceSubject, type ServiceEntry } from "@virtmesh/nats";
import { createLogger, shutdownTelemetry, tracedPublish, type Logger } from "@virtmesh/telemetry";
import { health, probe } from "@virtmesh/proto";
import { HealthImplementation } from "./health";
import { ProbeRouter } from "./probe";
import { GrpcError } from "./grpc";
import { guardRefusals } from "./refusals";
import { ClientCache, type ClientCtor } from "./clients";

export type { ClientCtor };

export interface ServiceContext {
  config: ServiceConfig;
  /** Registry name of this instance: the service name, or e.g. `guest-driver-vm1`. */
  instance: string;
  logger: Logger;
  nc: NatsConnection;
  registry: Registry;
  server: Server;
  health: HealthImplementation;
  /** Adds a gRPC API and marks it SERVING in the health service once the server is up. */
  addService<I extends UntypedServiceImplementation>(name: string, def: ServiceDefinition<I>, impl: I): void;
  /** A gRPC client for `instance` on `host`, resolved through the registry (cached per client class and address). */
  client<C extends Client>(host: string, instance: string, ctor: ClientCtor<C>): Promise<C>;
  /** Publishes a JSON event on `virtmesh.<host>.<instance>.<topic>` with trace context. */
  publish(topic: string, body: unknown): void;
  /** Extra registry facts, e.g. the sidecar's shm directory. Set before `setup` returns. */
  meta: Record<string, string>;
}

export interface ServiceHooks {
  /**
   * Called first on SIGTERM/SIGINT, while calls in flight still have a few
   * seconds to answer: ask long-running ones to wrap up now.
   */
  quiesce?(): void;
  /** Called on SIGTERM/SIGINT after the server stopped accepting: finish or hand back work. */
  stop?(): Promise<void>;
}

export interface ServiceDefinitionOptions {
  name: string;
  /** False for cluster services (migration-manager): no host sidecar to wait for. */
  hostScoped: boolean;
  /** Instance name; defaults to `name`. */
  instance?: (env: NodeJS.ProcessEnv) => string;
  setup(ctx: ServiceContext): Promise<ServiceHooks | void> | ServiceHooks | void;
}

/** Ends the process with one line on stderr: what failed and why. */
export function die(prefix: string, message: string, code = 2): never {
  process.stderr.write(`${prefix}: ${message.replace(/\s*\n\s*/g, " ")}\n`);
  process.exit(code);
}

async function bind(server: Server, address: string): Promise<number> {
  return new Promise((resolve, reject) => {
    server.bindAsync(address, ServerCredentials.createInsecure(), (err, port) => (err ? reject(err) : resolve(port)));
  });
}

export async function runService(def: ServiceDefinitionOptions): Promise<void> {
  let config: ServiceConfig;
  let instance = def.name;
  try {
    config = serviceConfig(def.name, def.hostScoped ? process.env : { VIRTMESH_HOST: "cluster", ...process.env });
    if (def.instance) instance = checkName("instance", def.instance(process.env));
  } catch (e) {
    if (e instanceof ConfigError) die(def.name, `bad configuration: ${e.message}`);
    throw e;
  }
  const who = `${instance}@${config.host}`;
  const logger = createLogger({ service: def.name, instance, host: config.host });

  let nc: NatsConnection;
  let registry: Registry;
  try {
    nc = await connectNats(config.natsUrl, who, config.startTimeoutMs);
    registry = await Registry.open(nc);
    if (def.hostScoped && def.name !== "shm-sidecar") {
      await registry.waitForService(config.host, "shm-sidecar", config.startTimeoutMs);
    }
  } catch (e) {
    die(who, (e as Error).message);
  }

  const server = new Server({ "grpc.max_receive_message_length": 64 << 20, "grpc.max_send_message_length": 64 << 20 });
  const healthImpl = new HealthImplementation();
  server.addService(health.HealthService, healthImpl.server);
  const apis: string[] = [];
  const clients = new ClientCache();
  const ctx: ServiceContext = {
    config,
    instance,
    logger,
    nc,
    registry,
    server,
    health: healthImpl,
    meta: {},
    addService(name, d, impl) {
      // Every refusal: a short status message, logged once at warn with the trace id.
      server.addService(d, guardRefusals(d, impl, (f, msg) => logger.warn(f, `refused ${f.method}: ${f.codeName}: ${msg}`)));
      apis.push(name);
    },
    async client(host, inst, ctor) {
      const e = await registry.getService(host, inst);
      if (!e) throw new GrpcError(Status.UNAVAILABLE, `${inst}@${host} is not registered`);
      return clients.get(e.grpc, ctor);
    },
    publish(topic, body) {
      tracedPublish(nc, serviceSubject(config.host, instance, topic), JSON.stringify(body));
    },
  };
  const router = new ProbeRouter(ctx);
  ctx.addService("virtmesh.common.v1.ProbeService", probe.ProbeServiceService, router.grpcServer);

  let hooks: ServiceHooks | void;
  try {
    hooks = await def.setup(ctx);
  } catch (e) {
    if (e instanceof ConfigError) die(who, `bad configuration: ${e.message}`);
    die(who, `setup failed: ${(e as Error).message}`);
  }

  let port: number;
  const address = `${config.grpcBind}:${config.grpcPort}`;
  try {
    port = await bind(server, address);
  } catch (e) {
    die(who, `cannot listen for gRPC on ${address}: ${(e as Error).message}`);
  }
  healthImpl.setStatus("", health.HealthCheckResponse_ServingStatus.SERVING);
  for (const a of apis) healthImpl.setStatus(a, health.HealthCheckResponse_ServingStatus.SERVING);

  const probeSub: Subscription = router.subscribeNats();
  const entry: ServiceEntry = {
    service: def.name,
    host: config.host,
    grpc: `${config.advertise}:${port}`,
    pid: process.pid,
    startedAt: new Date().toISOString(),
    meta: ctx.meta,
  };
  await registry.putService({ ...entry, service: instance });
  ctx.publish("lifecycle", { event: "started", service: def.name, instance, host: config.host, grpc: entry.grpc, pid: process.pid });
  const hbSubject = serviceSubject(config.host, instance, "heartbeat");
  const heartbeat = setInterval(() => {
    nc.publish(hbSubject, JSON.stringify({ instance, host: config.host, pid: process.pid, at: Date.now() }));
  }, 1000);
  heartbeat.unref();
  logger.info({ grpc: entry.grpc, apis }, `${who} serving`);

  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, `${who} shutting down`);
    const force = setTimeout(() => {
      process.stderr.write(`${who}: shutdown did not finish in 15 s, exiting\n`);
      process.exit(1);
    }, 15_000);
    force.unref();
    clearInterval(heartbeat);
    healthImpl.setAllNotServing();
    try {
      hooks?.quiesce?.();
    } catch (e) {
      logger.error({ err: (e as Error).message }, "quiesce hook failed");
    }
    try {
      await registry.deleteService(config.host, instance);
    } catch (e) {
      logger.warn({ err: (e as Error).message }, "could not deregister");
    }
    ctx.publish("lifecycle", { event: "stopping", service: def.name, instance, host: config.host, pid: process.pid });
    probeSub.unsubscribe();
    // Stop accepting new calls, let in-flight ones finish, then hand work back.
    await new Promise<void>((resolve) => {
      const t = setTimeout(() => {
        server.forceShutdown();
        resolve();
      }, 5000);
      server.tryShutdown(() => {
        clearTimeout(t);
        resolve();
      });
    });
    healthImpl.endWatches();
    try {
      if (hooks && hooks.stop) await hooks.stop();
    } catch (e) {
      logger.error({ err: (e as Error).message }, "stop hook failed");
    }
    clients.closeAll();
    await drainNats(nc);
    logger.info(`${who} stopped`);
    await shutdownTelemetry();
    process.exit(0);
  };
  process.on("SIGTERM", () => void shutdown("SIGTERM"));
  // A launcher that dies without stopping its services must not leave them orphaned.
  const parent = Number(process.env.VIRTMESH_PARENT_PID || 0);
  if (parent > 0) {
    const watch = setInterval(() => {
      if (process.ppid !== parent) void shutdown("parent-exit");
    }, 1000);
    watch.unref();
  }
  process.on("SIGINT", () => void shutdown("SIGINT"));
}
