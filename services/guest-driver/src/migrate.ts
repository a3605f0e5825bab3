// The VM's state outside guest memory as one envelope (GuestService.SaveState /
// LoadState): every device's saved state, the guest kernel's own memory and the
// front ends' bookkeeping, the workloads' positions. QEMU's vmstate stream in
// miniature (migration/savevm.c qemu_savevm_state_complete_precopy(): one section
// per device, each with its name and version, and the destination refuses a
// section or version it does not know).
//
// The envelope is @virtmesh/migration's device-state format (versioned, a crc32c per
// section and one over everything); this module names the guest-driver's sections and
// turns the package's refusals into EnvelopeError (LoadState: INVALID_ARGUMENT).
import { DEVICE_STATE_VERSION, DeviceStateError, decodeDeviceState, encodeDeviceState } from "@virtmesh/migration";

/** A saved state the destination must refuse (bad magic, version, checksum, truncation, a missing section). */
export class EnvelopeError extends Error {
  override readonly name = "EnvelopeError";
}

export type Sections = Map<string, Uint8Array>;

export function encodeEnvelope(sections: Sections, version = DEVICE_STATE_VERSION): Uint8Array {
  return encodeDeviceState(sections, version);
}

/** Decodes and checks an envelope; the sections share the input's memory. */
export function decodeEnvelope(bytes: Uint8Array): Sections {
  try {
    return new Map(decodeDeviceState(bytes).sections);
  } catch (e) {
    if (e instanceof DeviceStateError) throw new EnvelopeError(e.message);
    throw e;
  }
}

export function need(sections: Sections, name: string): Uint8Array {
  const s = sections.get(name);
  if (!s) throw new EnvelopeError(`VM state has no ${name} section`);
  return s;
}

export const jsonSection = (v: unknown): Uint8Array => new Uint8Array(Buffer.from(JSON.stringify(v)));

export function parseJsonSection<T>(sections: Sections, name: string): T {
  try {
    return JSON.parse(Buffer.from(need(sections, name)).toString("utf8")) as T;
  } catch (e) {
    if (e instanceof EnvelopeError) throw e;
    throw new EnvelopeError(`VM state section ${name} is not valid JSON`);
  }
}

// Section names.
export const S_GUEST = "guest"; // JSON GuestSection
export const S_BLK_DEVICE = "vhost.blk0"; // vhost-worker SaveDeviceState
export const S_KERNEL = "guest.kernel"; // the guest kernel's SharedArrayBuffer bytes
export const S_BALLOON_DEVICE = "balloon"; // balloon-host SaveState
export const S_WORKLOADS = "guest.workloads"; // GuestVcpus.saveWorkloads()

/** The guest-driver's own bookkeeping (JSON). */
export interface GuestSection {
  vm: string;
  sourceHost: string;
  serial: string;
  blk: import("./boot").BlkGuestState;
  /** The balloon driver's pages (vb_dev_info->pages) as [pfn, order] blocks. */
  balloonBlocks: Array<[number, number]>;
  balloonFeatures: number;
  balloonBufPfn: number;
  /** The dirtying workload's working set, if any. */
  workingSet: import("./working-set").WorkingSet | null;
  /** A fio run in flight (its run id), "" none. */
  fioRun: string;
}
