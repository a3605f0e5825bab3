// The NATS subject scheme (docs/architecture.md, "NATS subjects"). Every token is a
// checked name ([a-z0-9-], see @virtmesh/config NAME_RE), so a host, service or VM name
// can never inject a wildcard or an extra token.
import { checkName } from "@virtmesh/config";

export const ROOT = "virtmesh";

/** `virtmesh.<host>.<service>.<topic>`: per-service traffic (probe, heartbeat, lifecycle). */
export function serviceSubject(host: string, service: string, topic: string): string {
  return `${ROOT}.${checkName("host", host)}.${checkName("service", service)}.${checkName("topic", topic)}`;
}

/** `virtmesh.vm.<vm>.<topic>`: events about one VM (balloon, ioband, migration progress). */
export function vmSubject(vm: string, topic: string): string {
  return `${ROOT}.vm.${checkName("vm", vm)}.${checkName("topic", topic)}`;
}

/** `virtmesh.cluster.<topic>`: cluster-wide events. */
export function clusterSubject(topic: string): string {
  return `${ROOT}.cluster.${checkName("topic", topic)}`;
}

/** Wildcard for every heartbeat in the cluster. */
export const ALL_HEARTBEATS = `${ROOT}.*.*.heartbeat`;
