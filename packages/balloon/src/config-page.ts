// The balloon device's config space in guest shared memory, and the queue
// layout balloon-host expects in the shm-sidecar's VmLayout.
//
// virtio-balloon's config (virtio 1.2 §5.5.4, struct virtio_balloon_config) is
// le32 num_pages (device writes the target) and le32 actual (driver writes).
// virtmesh keeps it in one page of the VM's reserved region, the page of a
// pseudo-queue `balloon-config.0` (size 1) that the VM asks the shm-sidecar for
// at CreateVm, so it also gets two doorbells: `.call` is the configuration
// change notification (device -> driver, virtio 1.2 §2.5.2 / §4.1.4.3) and
// `.kick` tells the device the driver updated `actual`.
//
// Words (le32, accessed with Atomics: the page is 4 KiB aligned):
//   0 num_pages          target, written by the device (SetTarget)
//   1 actual             pages in the balloon, written by the driver
//   2 config_generation  bumped by the device after every change (§4.1.4.3.1:
//                        the driver re-reads until it is stable)
//   3 reserved
//   4..7 refused[queue]  virtmesh extension: requests the device refused on
//                        inflate, deflate, stats, reporting. Written before the
//                        used entry, so a driver that sees its buffer used can
//                        tell a refusal from an acknowledgement (legacy balloon
//                        buffers have no status byte).
//   8 device_attached    ATTACHED_MAGIC once a device accepted AttachVm; a
//                        restarted balloon-host resumes every VM that has it
//   9 features           the negotiated features (bits 0..31), for that resume
//                        (re-checked against what the device offers: the page
//                        is guest-writable)
//
// The guest's driver (guest-driver) and the device (balloon-host) both use this
// module: it is the device's ABI, as struct virtio_balloon_config is.

import type { BalloonQueue } from "./device";

export const BALLOON_DEVICE = "balloon";
export const BALLOON_CONFIG_DEVICE = "balloon-config";

/** Queue index within device "balloon" (virtio 1.2 §5.5.2: inflateq 0, deflateq 1, statsq 2; reporting fixed at 3 here). */
export const BALLOON_QUEUE_INDEX: Readonly<Record<BalloonQueue, number>> = { inflate: 0, deflate: 1, stats: 2, reporting: 3 };
export const BALLOON_QUEUES: readonly BalloonQueue[] = ["inflate", "deflate", "stats", "reporting"];

export const CFG_NUM_PAGES = 0;
export const CFG_ACTUAL = 1;
export const CFG_GENERATION = 2;
export const CFG_REFUSED = 4;
export const CFG_ATTACHED = 8;
export const CFG_FEATURES = 9;
export const CONFIG_WORDS = 12;
/** "BALN": a balloon device is attached to this config page. */
export const ATTACHED_MAGIC = 0x4e4c4142;
export const CONFIG_BYTES = CONFIG_WORDS * 4;

/** Atomics over the config words (they are shared with the guest process). */
export class BalloonConfigPage {
  readonly words: Uint32Array;

  constructor(buffer: ArrayBufferLike, byteOffset: number) {
    if (byteOffset % 4 !== 0) throw new RangeError(`config page offset ${byteOffset} is not 4-aligned`);
    this.words = new Uint32Array(buffer, byteOffset, CONFIG_WORDS);
  }

  get numPages(): number {
    return Atomics.load(this.words, CFG_NUM_PAGES);
  }
  get actual(): number {
    return Atomics.load(this.words, CFG_ACTUAL);
  }
  get generation(): number {
    return Atomics.load(this.words, CFG_GENERATION);
  }

  /** Driver side: pages now in the balloon. */
  set actual(v: number) {
    Atomics.store(this.words, CFG_ACTUAL, v);
  }

  /**
   * Driver side: num_pages read consistently (virtio 1.2 §4.1.4.3.1: read
   * config_generation before and after, retry if it changed).
   */
  readTarget(): { target: number; generation: number } {
    for (;;) {
      const g = this.generation;
      const target = this.numPages;
      if (this.generation === g) return { target, generation: g };
    }
  }

  /** Device side: a new target, then a new generation (the driver reads the generation last). */
  setTarget(pages: number): void {
    Atomics.store(this.words, CFG_NUM_PAGES, pages);
    Atomics.add(this.words, CFG_GENERATION, 1);
  }

  refused(queue: BalloonQueue): number {
    return Atomics.load(this.words, CFG_REFUSED + BALLOON_QUEUE_INDEX[queue]);
  }

  countRefusal(queue: BalloonQueue): void {
    Atomics.add(this.words, CFG_REFUSED + BALLOON_QUEUE_INDEX[queue], 1);
  }

  /** A fresh attachment: target 0, nothing refused; actual is the driver's. */
  reset(features: number): void {
    Atomics.store(this.words, CFG_NUM_PAGES, 0);
    for (let i = CFG_REFUSED; i < CFG_REFUSED + 4; i++) Atomics.store(this.words, i, 0);
    Atomics.store(this.words, CFG_FEATURES, features);
    Atomics.store(this.words, CFG_ATTACHED, ATTACHED_MAGIC);
    Atomics.add(this.words, CFG_GENERATION, 1);
  }

  /** The features of an earlier attachment, or null if none was made. */
  attachedFeatures(): number | null {
    return Atomics.load(this.words, CFG_ATTACHED) === ATTACHED_MAGIC ? Atomics.load(this.words, CFG_FEATURES) : null;
  }
}

/**
 * The queues a VM asks the shm-sidecar for at CreateVm so that it has a balloon:
 * inflate, deflate, stats, reporting and the config page (a sidecar QueueSpec each).
 */
export function balloonQueueSpecs(queueSize = 64): { device: string; index: number; size: number }[] {
  return [
    { device: BALLOON_DEVICE, index: BALLOON_QUEUE_INDEX.inflate, size: queueSize },
    { device: BALLOON_DEVICE, index: BALLOON_QUEUE_INDEX.deflate, size: queueSize },
    { device: BALLOON_DEVICE, index: BALLOON_QUEUE_INDEX.stats, size: queueSize },
    { device: BALLOON_DEVICE, index: BALLOON_QUEUE_INDEX.reporting, size: queueSize },
    { device: BALLOON_CONFIG_DEVICE, index: 0, size: 1 },
  ];
}
