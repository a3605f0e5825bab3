// Environment configuration. Every service is configured by environment variables
// only (the same names as docker-compose.yml); a bad value stops the service at start
// with one line that names the variable, the value and what is expected.

export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

type Env = Record<string, string | undefined>;

/** Host, VM and service names: one NATS subject token, one path component. */
export const NAME_RE = /^[a-z0-9][a-z0-9-]{0,62}$/;

export function checkName(kind: string, value: string): string {
  if (!NAME_RE.test(value)) {
    throw new ConfigError(
      `${kind} '${value}' is not a valid name: use 1-63 lowercase letters, digits or '-', starting with a letter or digit`,
    );
  }
  return value;
}

export function str(env: Env, key: string, fallback?: string): string {
  const v = env[key];
  if (v === undefined || v === "") {
    if (fallback !== undefined) return fallback;
    throw new ConfigError(`${key} is not set`);
  }
  return v;
}

export function optStr(env: Env, key: string): string | undefined {
  const v = env[key];
  return v === undefined || v === "" ? undefined : v;
}

export function int(env: Env, key: string, fallback: number, min: number, max: number): number {
  const v = env[key];
  if (v === undefined || v === "") return fallback;
  if (!/^-?\d+$/.test(v.trim())) throw new ConfigError(`${key}=${v} is not an integer (expected ${min}..${max})`);
  const n = Number(v);
  if (n < min || n > max) throw new ConfigError(`${key}=${v} is out of range (expected ${min}..${max})`);
  return n;
}

export function port(env: Env, key: string, fallback = 0): number {
  const v = env[key];
  if (v === undefined || v === "") return fallback;
  if (!/^\d+$/.test(v.trim()) || Number(v) > 65535) {
    throw new ConfigError(`${key}=${v} is not a TCP port (expected 0..65535, 0 picks a free port)`);
  }
  return Number(v);
}

export function natsUrl(env: Env): string {
  const v = str(env, "NATS_URL");
  for (const part of v.split(",")) {
    let u: URL;
    try {
      u = new URL(part.includes("://") ? part : `nats://${part}`);
    } catch {
      throw new ConfigError(`NATS_URL=${v} is not a URL (expected nats://host:port)`);
    }
    if (!["nats:", "tls:", "ws:", "wss:"].includes(u.protocol)) {
      throw new ConfigError(`NATS_URL=${v} has scheme ${u.protocol} (expected nats://host:port)`);
    }
    if (u.port !== "" && (Number(u.port) < 1 || Number(u.port) > 65535)) {
      throw new ConfigError(`NATS_URL=${v} has a bad port`);
    }
  }
  return v;
}

/** The settings every virtmesh service reads. */
export interface ServiceConfig {
  service: string;
  host: string;
  natsUrl: string;
  grpcBind: string;
  grpcPort: number;
  /** Host name or address other services use to reach this one (registered in the registry). */
  advertise: string;
  shmDir: string;
  /** How long to wait for NATS (and for the host's sidecar) at start, ms. */
  startTimeoutMs: number;
}

export function serviceConfig(service: string, env: Env = process.env): ServiceConfig {
  const host = checkName("VIRTMESH_HOST", str(env, "VIRTMESH_HOST"));
  const shmDir = str(env, "VIRTMESH_SHM_DIR", `/dev/shm/virtmesh-${host}`);
  if (!shmDir.startsWith("/")) throw new ConfigError(`VIRTMESH_SHM_DIR=${shmDir} must be an absolute path`);
  return {
    service,
    host,
    natsUrl: natsUrl(env),
    grpcBind: str(env, "VIRTMESH_GRPC_BIND", "127.0.0.1"),
    advertise: str(env, "VIRTMESH_ADVERTISE_ADDR", env.VIRTMESH_GRPC_BIND && env.VIRTMESH_GRPC_BIND !== "0.0.0.0" ? env.VIRTMESH_GRPC_BIND : "127.0.0.1"),
    grpcPort: port(env, "VIRTMESH_GRPC_PORT", 0),
    shmDir,
    startTimeoutMs: int(env, "VIRTMESH_START_TIMEOUT_MS", 10_000, 100, 600_000),
  };
}
