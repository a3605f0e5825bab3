// The guest's page allocator for a VM whose memory layout came from CreateVm.
import { BuddyAllocator, PAGE_SIZE } from "@virtmesh/balloon";
import type { sidecar } from "@virtmesh/proto";
import type { GuestMemory } from "@virtmesh/virtqueue";

/**
 * A BuddyAllocator over guest RAM [0, layout.reservedAddr) (never the queue
 * region above it), with its metadata in guest memory right after the guest's
 * fixed areas [0, usedBytes) (e.g. virtio-blk request headers and data
 * buffers), and [0, end of metadata) reserved: those pages are never handed
 * out, so the balloon never takes them. Everything above is free guest RAM.
 * attach: the metadata is already in guest memory (a migrated guest): take it as it is.
 */
export function createGuestAllocator(memory: GuestMemory, layout: sidecar.VmLayout, usedBytes = 0, attach = false): BuddyAllocator {
  if (!Number.isSafeInteger(usedBytes) || usedBytes < 0) throw new RangeError(`usedBytes must be a non-negative integer, got ${usedBytes}`);
  const ramPages = Math.floor(layout.reservedAddr / PAGE_SIZE);
  const metaOffset = Math.ceil(usedBytes / PAGE_SIZE) * PAGE_SIZE;
  const metaEnd = metaOffset + BuddyAllocator.metadataBytes(ramPages);
  const reservedPages = Math.ceil(metaEnd / PAGE_SIZE);
  if (reservedPages >= ramPages) {
    throw new RangeError(`guest RAM of ${ramPages} pages has no room for the page allocator after ${usedBytes} used bytes (metadata ends at ${metaEnd})`);
  }
  return new BuddyAllocator(ramPages, { reservedPages, metadata: { buffer: memory.buffer, byteOffset: memory.bytes.byteOffset + metaOffset }, attach });
}
