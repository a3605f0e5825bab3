// The vhost-worker's blkio-cgroup / dm-ioband control plane (seed 001): IobandService on
// the worker's gRPC server, change events on NATS, and the IobandHost the data path uses.
// See README.md beside this file for the contract with the data path.
import { ConfigError } from "@virtmesh/config";
import { vmSubject } from "@virtmesh/nats";
import { ioband } from "@virtmesh/proto";
import type { ServiceContext } from "@virtmesh/runtime";
import { tracedPublish } from "@virtmesh/telemetry";
import { IOBAND_DEVICES_ENV, parseIobandDevices } from "./config";
import { IobandHost, IobandHostError, type IobandHostEvent } from "./host";
import { iobandService } from "./service";

export { IobandHost, IobandHostError, type IobandBinding, type IobandBackendOptions, type IobandHostEvent, type IobandHostOptions } from "./host";
export { parseIobandDevices, IOBAND_DEVICES_ENV, type IobandDeviceSpec } from "./config";
export { iobandService, checkCgroupPath, checkLine } from "./service";

/** The NATS topic: `virtmesh.<host>.vhost-worker.ioband` (and `virtmesh.vm.<vm>.ioband` for VM devices). */
export const IOBAND_TOPIC = "ioband";

/** Creates the devices VIRTMESH_IOBAND_DEVICES names; a bad value is a ConfigError (one line at start). */
export function configureIobandDevices(host: IobandHost, value: string | undefined): void {
  try {
    const specs = parseIobandDevices(value);
    for (const s of specs) if (!host.share(s.share)) host.addBackend(s.share, { policy: s.policy });
    for (const s of specs) host.addDevice(s.share, s.device);
  } catch (e) {
    if (e instanceof IobandHostError) throw new ConfigError(`${IOBAND_DEVICES_ENV}=${value}: ${e.message}`);
    throw e;
  }
}

/**
 * Adds IobandService to the worker's gRPC server (call it in `setup`, before it returns)
 * and returns the host's IobandHost for the data path. Every change is published on
 * NATS with the caller's trace context.
 */
export function registerIoband(ctx: ServiceContext, env: NodeJS.ProcessEnv = process.env): IobandHost {
  const hostName = ctx.config.host;
  const publish = (event: IobandHostEvent) => {
    const body = { host: hostName, at: new Date().toISOString(), ...event };
    ctx.publish(IOBAND_TOPIC, body);
    if (event.kind === "vm-device" || event.kind === "binding") {
      tracedPublish(ctx.nc, vmSubject(event.vm, IOBAND_TOPIC), JSON.stringify(body));
    }
    ctx.logger.info({ ioband: event }, `ioband ${event.kind} change`);
  };
  const host = new IobandHost({ publish });
  configureIobandDevices(host, env[IOBAND_DEVICES_ENV]);
  ctx.addService("virtmesh.ioband.v1.IobandService", ioband.IobandServiceService, iobandService(host));
  return host;
}
