// Finding a VM's running guest-driver. A VM has a guest-driver on every host of the stack
// (the one that runs it, and the incoming side of a migration on each other host): the
// registry's vm.<vm> entry says which host runs it now.
import { credentials } from "@grpc/grpc-js";
import { ConfigError, checkName } from "@virtmesh/config";
import { connectNats, drainNats, Registry } from "@virtmesh/nats";
import { guest } from "@virtmesh/proto";
import { CliError, UsageError } from "./errors";
import { defaultStateDir, pidAlive, readState } from "./state";

export interface GuestHandle {
  vm: string;
  host: string;
  client: guest.GuestServiceClient;
  close(): void;
}

export function vmName(arg: string | undefined, usage: string): string {
  if (!arg) throw new UsageError(usage);
  try {
    return checkName("vm", arg);
  } catch (e) {
    if (e instanceof ConfigError) throw new UsageError(e.message);
    throw e;
  }
}

/** The NATS URL of the running stack (state.json), else NATS_URL. */
export function stackNatsUrl(stateDir: string | undefined): string {
  const dir = stateDir ?? defaultStateDir();
  const s = readState(dir);
  if (s && pidAlive(s.supervisorPid)) return s.nats.url;
  if (process.env.NATS_URL) return process.env.NATS_URL;
  throw new CliError(`no virtmesh stack is running (state dir ${dir}) and NATS_URL is not set; run 'virtmesh up' first`);
}

/** The guest-driver that runs `vm` now, found through the registry. */
export async function openGuest(vm: string, stateDir: string | undefined): Promise<GuestHandle> {
  const nc = await connectNats(stackNatsUrl(stateDir), "virtmesh-cli-guest", 5000);
  try {
    const registry = await Registry.open(nc);
    const placement = await registry.getVm(vm);
    if (!placement) throw new CliError(`vm '${vm}' is not registered (is its guest-driver running?)`);
    const svc = await registry.getService(placement.host, `guest-driver-${vm}`);
    if (!svc) throw new CliError(`vm '${vm}' is placed on host ${placement.host}, where no guest-driver-${vm} is registered`);
    const client = new guest.GuestServiceClient(svc.grpc, credentials.createInsecure());
    return { vm, host: placement.host, client, close: () => client.close() };
  } finally {
    await drainNats(nc);
  }
}
