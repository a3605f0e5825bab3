// VIRTMESH_IOBAND_DEVICES: ioband devices to create at start, so the blkio-cgroup control
// plane can be used (and tested) before the data path registers its own backends.
//
//   VIRTMESH_IOBAND_DEVICES="ioband1:weight,ioband2:range-bw,ioband3:weight@ioband1"
//
// Each entry is `<device>:<policy>[@<share>]`: a dm-ioband device (the name blkio.settings
// uses) over a share (struct ioband_device, the name blkio.devices lists first). Without
// `@<share>` the device gets a share of its own with the same name; entries naming the same
// share are devices over one shared backend and must agree on the policy.
import { ConfigError } from "@virtmesh/config";
import { IOBAND_NAME_MAX, POLICY_NAMES, type PolicyName } from "@virtmesh/ioband";

export const IOBAND_DEVICES_ENV = "VIRTMESH_IOBAND_DEVICES";

/** A dm device / share name: one word, at most IOBAND_NAME_MAX characters (g_name[IOBAND_NAME_MAX + 1]). */
export const IOBAND_NAME_RE = new RegExp(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,${IOBAND_NAME_MAX - 1}}$`);

export interface IobandDeviceSpec {
  device: string;
  share: string;
  policy: PolicyName;
}

const ENTRY_RE = /^([^:@\s]+):([^:@\s]+)(?:@([^:@\s]+))?$/;

/** Parses the variable; undefined or "" means no devices. Throws ConfigError with one line. */
export function parseIobandDevices(value: string | undefined): IobandDeviceSpec[] {
  if (value === undefined || value.trim() === "") return [];
  const bad = (why: string) => new ConfigError(`${IOBAND_DEVICES_ENV}=${value}: ${why}`);
  const specs: IobandDeviceSpec[] = [];
  const policyOf = new Map<string, PolicyName>();
  const devices = new Set<string>();
  for (const raw of value.split(",")) {
    const entry = raw.trim();
    const m = ENTRY_RE.exec(entry);
    if (!m) throw bad(`entry '${entry}' is not <device>:<policy>[@<share>] (e.g. ioband1:weight)`);
    const [, device, policy, shareArg] = m as unknown as [string, string, string, string | undefined];
    const share = shareArg ?? device;
    for (const [what, name] of [["device", device], ["share", share]] as const) {
      if (!IOBAND_NAME_RE.test(name)) throw bad(`${what} name '${name}' must be 1-${IOBAND_NAME_MAX} letters, digits, '_', '.' or '-', starting with a letter or digit`);
    }
    if (!(POLICY_NAMES as readonly string[]).includes(policy)) throw bad(`policy '${policy}' of ${device} is not one of ${POLICY_NAMES.join(", ")}`);
    if (devices.has(device)) throw bad(`device '${device}' is named twice`);
    const prev = policyOf.get(share);
    if (prev !== undefined && prev !== policy) throw bad(`share '${share}' is given policies ${prev} and ${policy}`);
    devices.add(device);
    policyOf.set(share, policy as PolicyName);
    specs.push({ device, share, policy: policy as PolicyName });
  }
  // A name is a share or a device, never both, except a device over its own same-named share.
  for (const s of specs) {
    if (policyOf.has(s.device) && s.share !== s.device) throw bad(`'${s.device}' is used both as a device (over ${s.share}) and as a share`);
  }
  return specs;
}
