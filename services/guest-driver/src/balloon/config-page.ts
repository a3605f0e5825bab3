// Guest view of the balloon device's config page and queue layout. Must match
// services/balloon-host/src/config-page.ts (e2e/balloon.test.ts checks it):
// one page of the VM's reserved region, the pseudo-queue `balloon-config.0`,
// le32 words accessed with Atomics:
//   0 num_pages (device), 1 actual (driver), 2 config_generation (device),
//   4..7 refused[inflate, deflate, stats, reporting] (device, virtmesh extension),
//   8 attached marker, 9 negotiated features (device).
// The `.call` doorbell of that pseudo-queue is the configuration change
// notification (virtio 1.2 §4.1.4.3), `.kick` tells the device `actual` moved.

import type { BalloonQueue } from "@virtmesh/balloon";
import type { sidecar } from "@virtmesh/proto";

export const BALLOON_DEVICE = "balloon";
export const BALLOON_CONFIG_DEVICE = "balloon-config";
export const BALLOON_QUEUE_INDEX: Readonly<Record<BalloonQueue, number>> = { inflate: 0, deflate: 1, stats: 2, reporting: 3 };

export const CFG_NUM_PAGES = 0;
export const CFG_ACTUAL = 1;
export const CFG_GENERATION = 2;
export const CFG_REFUSED = 4;
/** Device-owned (attached marker, negotiated features for a restarted device); the driver never writes them. */
export const CFG_ATTACHED = 8;
export const CFG_FEATURES = 9;
export const CONFIG_WORDS = 12;

/**
 * The queues the VM must ask the shm-sidecar for at CreateVm so that it has a
 * balloon: inflate, deflate, stats, reporting and the config page. Append to
 * CreateVmRequest.queues (any order, with the VM's other devices).
 */
export function balloonQueueSpecs(queueSize = 64): sidecar.QueueSpec[] {
  return [
    { device: BALLOON_DEVICE, index: BALLOON_QUEUE_INDEX.inflate, size: queueSize },
    { device: BALLOON_DEVICE, index: BALLOON_QUEUE_INDEX.deflate, size: queueSize },
    { device: BALLOON_DEVICE, index: BALLOON_QUEUE_INDEX.stats, size: queueSize },
    { device: BALLOON_DEVICE, index: BALLOON_QUEUE_INDEX.reporting, size: queueSize },
    { device: BALLOON_CONFIG_DEVICE, index: 0, size: 1 },
  ];
}

export class GuestBalloonConfig {
  readonly words: Uint32Array;

  constructor(buffer: ArrayBufferLike, byteOffset: number) {
    this.words = new Uint32Array(buffer, byteOffset, CONFIG_WORDS);
  }

  get numPages(): number {
    return Atomics.load(this.words, CFG_NUM_PAGES);
  }
  get generation(): number {
    return Atomics.load(this.words, CFG_GENERATION);
  }
  get actual(): number {
    return Atomics.load(this.words, CFG_ACTUAL);
  }
  set actual(v: number) {
    Atomics.store(this.words, CFG_ACTUAL, v);
  }
  refused(queue: BalloonQueue): number {
    return Atomics.load(this.words, CFG_REFUSED + BALLOON_QUEUE_INDEX[queue]);
  }

  /**
   * num_pages read consistently (virtio 1.2 §4.1.4.3.1: read config_generation
   * before and after, retry if it changed).
   */
  readTarget(): { target: number; generation: number } {
    for (;;) {
      const g = this.generation;
      const target = this.numPages;
      if (this.generation === g) return { target, generation: g };
    }
  }
}
