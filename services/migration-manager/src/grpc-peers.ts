// MigrationPeers over gRPC, each service found in the registry. Clients are built here
// rather than with ctx.client: that cache keys on the generated class's name, which is
// ServiceClientImpl for every API, so two APIs at one address would share one client.
// Keyed by address and API here; a service that restarted on a new port gets a new one.
import { credentials, status as Status, type Client, type ServiceError } from "@grpc/grpc-js";
import type { Registry } from "@virtmesh/nats";
import { balloon, callUnary, guest, sidecar, type UnaryMethod } from "@virtmesh/proto";
import { PeerError, type BalloonCalls, type GuestCalls, type MigrationPeers, type SidecarCalls } from "./peers";

const CALL_MS = 30_000;
const STATE_MS = 120_000;
/** The device state (guest kernel memory included) goes through LoadState in one message. */
const CLIENT_OPTIONS = { "grpc.max_receive_message_length": 512 << 20, "grpc.max_send_message_length": 512 << 20 };

function asPeerError(e: unknown): PeerError {
  const se = e as ServiceError;
  const code = typeof se.code === "number" ? se.code : Status.UNKNOWN;
  return new PeerError(`${Status[code] ?? code}: ${se.details || se.message}`, code);
}

function unary<Req, Res>(client: object, method: UnaryMethod<Req, Res>, req: Req, timeoutMs = CALL_MS): Promise<Res> {
  return callUnary(client, method, req, timeoutMs).catch((e: unknown) => {
    throw asPeerError(e);
  });
}

type Ctor<C> = new (address: string, creds: ReturnType<typeof credentials.createInsecure>, options?: object) => C;

export class GrpcPeers implements MigrationPeers {
  private readonly clients = new Map<string, Client>();

  constructor(private readonly registry: Registry) {}

  private async client<C extends Client>(host: string, instance: string, api: string, ctor: Ctor<C>): Promise<C> {
    const e = await this.registry.getService(host, instance);
    if (!e) throw new PeerError(`${instance}@${host} is not registered`, Status.UNAVAILABLE);
    const key = `${e.grpc}/${api}`;
    let c = this.clients.get(key);
    if (!c) this.clients.set(key, (c = new ctor(e.grpc, credentials.createInsecure(), CLIENT_OPTIONS)));
    return c as C;
  }

  async sidecar(host: string): Promise<SidecarCalls> {
    const c = await this.client(host, "shm-sidecar", "sidecar", sidecar.SharedMemoryServiceClient);
    return {
      describeVm: (r) => unary(c, c.describeVm, r),
      createVm: (r) => unary(c, c.createVm, r),
      destroyVm: (r) => unary(c, c.destroyVm, r),
      setDirtyLogging: (r) => unary(c, c.setDirtyLogging, r),
      iommuInfo: (r) => unary(c, c.iommuInfo, r),
      dirtyPages: (r) => unary(c, c.dirtyPages, r),
      startMigrationBitmap: (r) => unary(c, c.startMigrationBitmap, r),
      syncDirty: (r) => unary(c, c.syncDirty, r),
      sendDirty: (r, timeoutMs) => unary(c, c.sendDirty, r, timeoutMs),
      stopMigrationBitmap: (r) => unary(c, c.stopMigrationBitmap, r),
      checksumMemory: (r) => unary(c, c.checksumMemory, r, STATE_MS),
    };
  }

  async guest(host: string, vm: string): Promise<GuestCalls> {
    const c = await this.client(host, `guest-driver-${vm}`, "guest", guest.GuestServiceClient);
    const empty: guest.Empty = {};
    return {
      getState: () => unary(c, c.getState, empty),
      pause: () => unary(c, c.pause, empty),
      resume: () => unary(c, c.resume, empty, STATE_MS),
      setThrottle: (r) => unary(c, c.setThrottle, r),
      getFreePageHint: () => unary(c, c.getFreePageHint, empty),
      saveState: (r) => unary(c, c.saveState, r, STATE_MS),
      loadState: (r) => unary(c, c.loadState, r, STATE_MS),
      release: (r) => unary(c, c.release, r, STATE_MS),
      abortIncoming: () => unary(c, c.abortIncoming, empty, STATE_MS),
    };
  }

  async balloon(host: string): Promise<BalloonCalls> {
    const c = await this.client(host, "balloon-host", "balloon", balloon.BalloonServiceClient);
    return { getBalloonedPages: (r) => unary(c, c.getBalloonedPages, r) };
  }

  close(): void {
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }
}
