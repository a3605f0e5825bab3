// The cluster registry: a JetStream KV bucket saying which service of which host listens
// where, and which VM runs on which host. Services find each other through it, never
// through hard-coded ports. nats-server 2.9 has no per-key TTL, so liveness is not
// inferred from the registry: services delete their entry on clean shutdown, and a
// crashed one is detected by its missing heartbeats or a failing gRPC health check.
import { Kvm, type KV } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import { checkName, NAME_RE } from "@virtmesh/config";

export const REGISTRY_BUCKET = "virtmesh-registry";

export interface ServiceEntry {
  service: string;
  host: string;
  /** host:port of the gRPC server. */
  grpc: string;
  pid: number;
  startedAt: string;
  /** Optional extra facts (e.g. the shm directory of a sidecar, the VM of a guest-driver). */
  meta: Record<string, string>;
}

export interface VmPlacement {
  vm: string;
  host: string;
  state: string;
  updatedAt: string;
}

export class RegistryError extends Error {
  override readonly name = "RegistryError";
}

const enc = new TextEncoder();
const dec = new TextDecoder();

function isRecordOfStrings(v: unknown): v is Record<string, string> {
  return typeof v === "object" && v !== null && Object.values(v).every((x) => typeof x === "string");
}

/** A JSON object from a registry value, or undefined for anything else. */
function parseObject(raw: Uint8Array): Record<string, unknown> | undefined {
  try {
    const v: unknown = JSON.parse(dec.decode(raw));
    return typeof v === "object" && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/** Parses and checks a registry value: it crossed a boundary and may be anything. */
export function parseServiceEntry(raw: Uint8Array): ServiceEntry | undefined {
  const o = parseObject(raw);
  if (!o) return undefined;
  if (typeof o.service !== "string" || !NAME_RE.test(o.service)) return undefined;
  if (typeof o.host !== "string" || !NAME_RE.test(o.host)) return undefined;
  if (typeof o.grpc !== "string" || !/^[^\s:]+:\d{1,5}$/.test(o.grpc)) return undefined;
  if (typeof o.pid !== "number" || !Number.isInteger(o.pid)) return undefined;
  return {
    service: o.service,
    host: o.host,
    grpc: o.grpc,
    pid: o.pid,
    startedAt: typeof o.startedAt === "string" ? o.startedAt : "",
    meta: isRecordOfStrings(o.meta) ? o.meta : {},
  };
}

export function parseVmPlacement(raw: Uint8Array): VmPlacement | undefined {
  const o = parseObject(raw);
  if (!o) return undefined;
  if (typeof o.vm !== "string" || !NAME_RE.test(o.vm)) return undefined;
  if (typeof o.host !== "string" || !NAME_RE.test(o.host)) return undefined;
  return { vm: o.vm, host: o.host, state: typeof o.state === "string" ? o.state : "", updatedAt: typeof o.updatedAt === "string" ? o.updatedAt : "" };
}

const svcKey = (host: string, service: string) => `svc.${checkName("host", host)}.${checkName("service", service)}`;
const vmKey = (vm: string) => `vm.${checkName("vm", vm)}`;

export class Registry {
  private constructor(readonly kv: KV) {}

  static async open(nc: NatsConnection): Promise<Registry> {
    try {
      const kv = await new Kvm(nc).create(REGISTRY_BUCKET, { history: 1 });
      return new Registry(kv);
    } catch (e) {
      throw new RegistryError(
        `cannot open the registry bucket '${REGISTRY_BUCKET}': ${(e as Error).message} (is JetStream enabled? start nats-server with -js)`,
      );
    }
  }

  async putService(entry: ServiceEntry): Promise<void> {
    await this.kv.put(svcKey(entry.host, entry.service), enc.encode(JSON.stringify(entry)));
  }

  async deleteService(host: string, service: string): Promise<void> {
    await this.kv.delete(svcKey(host, service));
  }

  async getService(host: string, service: string): Promise<ServiceEntry | undefined> {
    const e = await this.kv.get(svcKey(host, service));
    if (!e || e.operation !== "PUT") return undefined;
    return parseServiceEntry(e.value);
  }

  async listServices(): Promise<ServiceEntry[]> {
    const out: ServiceEntry[] = [];
    const keys: string[] = [];
    for await (const k of await this.kv.keys("svc.>")) keys.push(k);
    for (const k of keys) {
      const e = await this.kv.get(k);
      if (!e || e.operation !== "PUT") continue;
      const parsed = parseServiceEntry(e.value);
      if (parsed) out.push(parsed);
    }
    return out.sort((a, b) => (a.host + a.service).localeCompare(b.host + b.service));
  }

  /** Hosts known to the cluster: those whose shm-sidecar has registered. */
  async knownHosts(): Promise<string[]> {
    const s = await this.listServices();
    return [...new Set(s.filter((e) => e.service === "shm-sidecar").map((e) => e.host))].sort();
  }

  /**
   * Waits until `service` on `host` is registered. Throws a RegistryError naming the
   * known hosts when the host never appears (an unknown host name is a configuration
   * error, not something to wait for forever).
   */
  async waitForService(host: string, service: string, timeoutMs: number): Promise<ServiceEntry> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const e = await this.getService(host, service);
      if (e) return e;
      if (Date.now() >= deadline) {
        const hosts = await this.knownHosts();
        if (!hosts.includes(host)) {
          throw new RegistryError(
            `unknown host '${host}': no shm-sidecar has registered it (known hosts: ${hosts.length ? hosts.join(", ") : "none"})`,
          );
        }
        throw new RegistryError(`${service} on host '${host}' did not register within ${timeoutMs} ms`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  async putVm(p: Omit<VmPlacement, "updatedAt">): Promise<void> {
    const v: VmPlacement = { ...p, updatedAt: new Date().toISOString() };
    await this.kv.put(vmKey(p.vm), enc.encode(JSON.stringify(v)));
  }

  async getVm(vm: string): Promise<VmPlacement | undefined> {
    const e = await this.kv.get(vmKey(vm));
    if (!e || e.operation !== "PUT") return undefined;
    return parseVmPlacement(e.value);
  }

  async deleteVm(vm: string): Promise<void> {
    await this.kv.delete(vmKey(vm));
  }
}
