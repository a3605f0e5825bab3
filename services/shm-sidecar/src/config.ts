// The sidecar's own settings, read from the environment like every other
// service's (a bad value stops the service at start with one line).
import { ConfigError, int } from "@virtmesh/config";
import { MAX_MAPPING_BYTES } from "@virtmesh/shm";

/** Guest page size: the dirty logs and the IOMMU's minimum page (KVM and VFIO on x86). */
export const GUEST_PAGE_SIZE = 4096;
export const DEFAULT_MAX_VM_BYTES = 64 * 2 ** 30;
/** Queues one VM may ask for: bounds the doorbell files a single request creates. */
export const MAX_QUEUES_PER_VM = 1024;

export interface SidecarConfig {
  /** Largest guest memory a CreateVm may ask for (VIRTMESH_MAX_VM_BYTES). */
  maxVmBytes: number;
}

export function sidecarConfig(env: Record<string, string | undefined> = process.env): SidecarConfig {
  const maxVmBytes = int(env, "VIRTMESH_MAX_VM_BYTES", DEFAULT_MAX_VM_BYTES, GUEST_PAGE_SIZE, MAX_MAPPING_BYTES);
  if (maxVmBytes % GUEST_PAGE_SIZE !== 0) {
    throw new ConfigError(`VIRTMESH_MAX_VM_BYTES=${maxVmBytes} is not a multiple of the ${GUEST_PAGE_SIZE}-byte page size`);
  }
  return { maxVmBytes };
}
