// Where a VM's virtqueues live. Every queue the VM asks for at CreateVm is
// placed in one reserved region at the TOP of guest memory:
//
//   0 ............................ reservedAddr ............... memoryBytes
//   | guest RAM (the guest's page   | queue 0 | queue 1 | ...   |
//   |  allocator manages this only) | desc avail . used | ...   |
//
// Each queue starts on a page, in request order: descriptor table (align 16),
// available ring right after it (align 2), used ring on the next page (the
// layout helper's usedAlign) so that device writes (the used ring) never share
// a page with driver writes and the device dirty log stays precise. Sizes and
// alignments are virtio 1.2 §2.7 (splitQueueLayout in @virtmesh/virtqueue).
// The top keeps the guest's own reserved prefix (BuddyAllocator reservedPages,
// the guest kernel's memory) where the guest wants it.
import { status as Status } from "@grpc/grpc-js";
import { NAME_RE } from "@virtmesh/config";
import type { sidecar } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { isValidQueueSize, splitQueueLayout } from "@virtmesh/virtqueue";
import { GUEST_PAGE_SIZE, MAX_QUEUES_PER_VM } from "./config";

/** virtio-pci's queue_select is 16 bits (virtio 1.2 §4.1.4.3). */
export const MAX_QUEUE_INDEX = 0xffff;

export interface PlacedQueue {
  device: string;
  index: number;
  size: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  /** Bytes of guest memory the queue's region takes (whole pages). */
  regionBytes: number;
}

export interface QueuePlacement {
  reservedAddr: number;
  reservedBytes: number;
  queues: PlacedQueue[];
}

const alignUp = (x: number, a: number): number => Math.ceil(x / a) * a;

const invalid = (msg: string): GrpcError => new GrpcError(Status.INVALID_ARGUMENT, msg);

/** The file-name stem of a queue's doorbells: '.' is not in NAME_RE, so stems never collide. */
export function queueStem(device: string, index: number): string {
  return `${device}.${index}`;
}

/** Checks CreateVm's vm name and memory size. */
export function checkVmName(field: string, vm: string): string {
  if (!NAME_RE.test(vm)) {
    throw invalid(`${field} '${vm}' is not a valid name: use 1-63 lowercase letters, digits or '-', starting with a letter or digit`);
  }
  return vm;
}

export function checkMemoryBytes(memoryBytes: number, maxVmBytes: number): number {
  if (!Number.isSafeInteger(memoryBytes) || memoryBytes <= 0) {
    throw invalid(`memory_bytes ${memoryBytes} must be a positive multiple of ${GUEST_PAGE_SIZE}`);
  }
  if (memoryBytes % GUEST_PAGE_SIZE !== 0) {
    throw invalid(`memory_bytes ${memoryBytes} is not a multiple of the ${GUEST_PAGE_SIZE}-byte page size`);
  }
  if (memoryBytes > maxVmBytes) {
    throw new GrpcError(
      Status.RESOURCE_EXHAUSTED,
      `memory_bytes ${memoryBytes} exceeds this sidecar's limit of ${maxVmBytes} bytes (VIRTMESH_MAX_VM_BYTES)`,
    );
  }
  return memoryBytes;
}

/** Validates the requested queues and places them at the top of `memoryBytes` of guest memory. */
export function placeQueues(memoryBytes: number, specs: readonly sidecar.QueueSpec[]): QueuePlacement {
  if (specs.length > MAX_QUEUES_PER_VM) {
    throw invalid(`queues has ${specs.length} entries; at most ${MAX_QUEUES_PER_VM} per VM`);
  }
  const seen = new Set<string>();
  const sized: Array<{ spec: sidecar.QueueSpec; regionBytes: number }> = [];
  let reservedBytes = 0;
  specs.forEach((q, i) => {
    if (!NAME_RE.test(q.device)) {
      throw invalid(
        `queues[${i}].device '${q.device}' is not a valid name: use 1-63 lowercase letters, digits or '-', starting with a letter or digit`,
      );
    }
    if (!Number.isInteger(q.index) || q.index < 0 || q.index > MAX_QUEUE_INDEX) {
      throw invalid(`queues[${i}].index ${q.index} must be 0..${MAX_QUEUE_INDEX} (virtio 1.2 §4.1.4.3 queue_select)`);
    }
    if (!isValidQueueSize(q.size)) {
      throw invalid(`queues[${i}].size ${q.size} is not a power of 2 in [1, 32768] (virtio 1.2 §2.7)`);
    }
    const stem = queueStem(q.device, q.index);
    if (seen.has(stem)) throw invalid(`queues[${i}]: device '${q.device}' queue ${q.index} is listed twice`);
    seen.add(stem);
    const regionBytes = alignUp(splitQueueLayout(q.size, 0, { usedAlign: GUEST_PAGE_SIZE }).bytes, GUEST_PAGE_SIZE);
    reservedBytes += regionBytes;
    sized.push({ spec: q, regionBytes });
  });
  // At least one page must stay guest RAM.
  if (reservedBytes >= memoryBytes) {
    throw invalid(
      `queues need ${reservedBytes} bytes at the top of guest memory; memory_bytes ${memoryBytes} must be larger to leave the guest at least one page`,
    );
  }
  const reservedAddr = memoryBytes - reservedBytes;
  let base = reservedAddr;
  const queues = sized.map(({ spec, regionBytes }) => {
    const l = splitQueueLayout(spec.size, base, { usedAlign: GUEST_PAGE_SIZE });
    const placed: PlacedQueue = {
      device: spec.device,
      index: spec.index,
      size: spec.size,
      descAddr: l.descAddr,
      availAddr: l.availAddr,
      usedAddr: l.usedAddr,
      regionBytes,
    };
    base += regionBytes;
    return placed;
  });
  return { reservedAddr, reservedBytes, queues };
}
