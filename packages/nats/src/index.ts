export { connectNats, drainNats, NatsUnreachableError } from "./connection";
export { serviceSubject, vmSubject, clusterSubject, ALL_HEARTBEATS, ROOT } from "./subjects";
export {
  Registry,
  RegistryError,
  REGISTRY_BUCKET,
  parseServiceEntry,
  parseVmPlacement,
  type ServiceEntry,
  type VmPlacement,
} from "./registry";
export { startNatsServer, findNatsServer, freePort, type NatsServerHandle, NatsServerMissingError } from "./server";
