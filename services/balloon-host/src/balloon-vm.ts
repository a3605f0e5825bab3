// One VM's virtio-balloon device on this host: the guest memory file mapped
// MAP_SHARED, a DeviceQueue per balloon queue, the config page, and the
// BalloonDevice (packages/balloon) that validates and applies every buffer.
//
// Per queue, a loop on the event loop: sleep on the queue's kick doorbell until
// the avail ring has entries, pop every chain (DeviceQueue checks each one,
// virtio 1.2 §2.7.5), copy its device-readable bytes into one preallocated
// scratch buffer, hand them to BalloonDevice.handle(), return the chain on the
// used ring and ring the call doorbell if the driver wants it (§2.7.7.2).
// Copying first means the guest cannot change a buffer between the check and
// the use (a double fetch); nothing is released unless the whole request passed
// (device.ts decodes everything before touching a page).

import { statSync } from "node:fs";
import {
  BalloonDevice,
  type BalloonMode,
  type BalloonQueue,
  type BalloonRequestError,
  PAGE_BITMAP_BUFFER_SIZE,
  PAGE_SIZE,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  VIRTIO_BALLOON_F_MUST_TELL_HOST,
  VIRTIO_BALLOON_F_PAGE_BITMAP,
  VIRTIO_BALLOON_F_REPORTING,
  VIRTIO_BALLOON_F_STATS_VQ,
  balloonModeFor,
  featureBit,
  hasFeature,
} from "@virtmesh/balloon";
import type { sidecar } from "@virtmesh/proto";
import { Doorbell, MAX_ARRAY_BUFFER_BYTES, mapFile, type SharedMapping } from "@virtmesh/shm";
import { ChainError, DeviceQueue, GuestMemory, type DescriptorChain } from "@virtmesh/virtqueue";
import { BALLOON_CONFIG_DEVICE, BALLOON_DEVICE, BALLOON_QUEUE_INDEX, BalloonConfigPage } from "./config-page";

/** A refused request: the device's check, or the descriptor chain walker's. */
export interface Refusal {
  queue: BalloonQueue;
  kind: string;
  message: string;
  /** Fatal chain errors put the queue in NEEDS_RESET (§2.1.2). */
  needsReset: boolean;
}

export interface BalloonVmEvents {
  /** The ballooned-pages bitmap changed (called at most once per drained batch). */
  ballooned(vm: BalloonVm): void;
  refused(vm: BalloonVm, r: Refusal): void;
  /** A queue loop died unexpectedly (a bug, not guest input). */
  failed(vm: BalloonVm, queue: BalloonQueue, err: Error): void;
}

export class AttachError extends Error {
  constructor(
    readonly reason: "not-found" | "bad-layout" | "too-large",
    message: string,
  ) {
    super(message);
  }
}

interface QueueRunner {
  name: BalloonQueue;
  q: DeviceQueue;
  chain: DescriptorChain;
  kick: Doorbell;
  call: Doorbell;
  done: Promise<void>;
}

export class BalloonVm {
  readonly vm: string;
  readonly memoryBytes: number;
  readonly guestPages: number;
  readonly configAddr: number;
  readonly deviceFeatures: number;
  readonly features: number;
  readonly mode: BalloonMode;
  readonly device: BalloonDevice;
  readonly config: BalloonConfigPage;
  /** Every refusal, including those the chain walker made before the device saw anything. */
  refusedRequests = 0;
  readonly refusedByKind = new Map<string, number>();
  lastRefusal: Refusal | null = null;

  private readonly mapping: SharedMapping;
  /** Inode of the memory file we mapped: tells a stale vm-destroyed event from ours. */
  private readonly inode: number;
  private readonly runners: QueueRunner[] = [];
  private readonly configKick: Doorbell;
  private readonly configCall: Doorbell;
  private readonly scratch = new Uint8Array(PAGE_BITMAP_BUFFER_SIZE);
  private heldStats = -1;
  private statsWaiters: Array<() => void> = [];
  private stopped = false;

  /**
   * Maps `layout.memory_path` and starts serving its balloon queues.
   * The layout comes from the shm-sidecar (DescribeVm); the guest never names
   * addresses itself.
   */
  /**
   * The features an earlier balloon-host negotiated for this VM (the config
   * page's attached marker), or null: a restarted balloon-host resumes those VMs.
   */
  static storedFeatures(layout: sidecar.VmLayout): number | null {
    const cfg = layout.queues.find((q) => q.device === BALLOON_CONFIG_DEVICE && q.index === 0);
    if (!cfg || layout.memoryBytes > MAX_ARRAY_BUFFER_BYTES || cfg.descAddr + PAGE_SIZE > layout.memoryBytes) return null;
    const m = mapFile(layout.memoryPath, layout.memoryBytes);
    try {
      return new BalloonConfigPage(m.buffer, cfg.descAddr).attachedFeatures();
    } finally {
      m.unmap();
    }
  }

  /**
   * @param resume a restarted device taking over a running guest: keep the
   *   config page (target, refused counters) and continue each queue from its
   *   used->idx (balloon queues complete in order, so every chain not yet used
   *   is popped again).
   */
  constructor(
    layout: sidecar.VmLayout,
    driverFeatures: number,
    private readonly events: BalloonVmEvents,
    opts: { resume?: boolean } = {},
  ) {
    this.vm = layout.vm;
    this.memoryBytes = layout.memoryBytes;
    if (layout.pageSize !== PAGE_SIZE) throw new AttachError("bad-layout", `vm ${layout.vm}: page size ${layout.pageSize}, the balloon needs ${PAGE_SIZE}`);
    if (layout.memoryBytes > MAX_ARRAY_BUFFER_BYTES) {
      throw new AttachError("too-large", `vm ${layout.vm}: ${layout.memoryBytes} bytes of guest memory; balloon-host maps at most ${MAX_ARRAY_BUFFER_BYTES} in one view`);
    }
    const find = (device: string, index: number) => layout.queues.find((q) => q.device === device && q.index === index);
    const cfgRegion = find(BALLOON_CONFIG_DEVICE, 0);
    const inflate = find(BALLOON_DEVICE, BALLOON_QUEUE_INDEX.inflate);
    const deflate = find(BALLOON_DEVICE, BALLOON_QUEUE_INDEX.deflate);
    if (!cfgRegion || !inflate || !deflate) {
      throw new AttachError(
        "bad-layout",
        `vm ${layout.vm} has no balloon device: its CreateVm must ask for queues ${BALLOON_DEVICE}.0 (inflate), ${BALLOON_DEVICE}.1 (deflate) and ${BALLOON_CONFIG_DEVICE}.0 (config page, size 1)`,
      );
    }
    // Guest RAM ends where the reserved queue region starts; a PFN at or past it
    // is "beyond guest memory" for the balloon (the guest's allocator never owns it).
    this.guestPages = Math.floor(layout.reservedAddr / PAGE_SIZE);
    if (this.guestPages <= 0) throw new AttachError("bad-layout", `vm ${layout.vm}: no guest RAM below the reserved region`);
    this.configAddr = cfgRegion.descAddr;

    // What the device offers: the queue-bound features only if the queue exists.
    let offered = featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST) + featureBit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) + featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP);
    if (find(BALLOON_DEVICE, BALLOON_QUEUE_INDEX.stats)) offered += featureBit(VIRTIO_BALLOON_F_STATS_VQ);
    if (find(BALLOON_DEVICE, BALLOON_QUEUE_INDEX.reporting)) offered += featureBit(VIRTIO_BALLOON_F_REPORTING);
    this.deviceFeatures = offered;
    this.features = intersect(driverFeatures, offered);
    this.mode = balloonModeFor(this.features);

    this.mapping = mapFile(layout.memoryPath, layout.memoryBytes);
    this.inode = statSync(layout.memoryPath).ino;
    const opened: Doorbell[] = [];
    try {
      const mem = new GuestMemory(this.mapping.buffer);
      this.config = new BalloonConfigPage(this.mapping.buffer, this.configAddr);
      if (!opts.resume) this.config.reset(this.features);
      this.configKick = Doorbell.open(cfgRegion.kickPath);
      opened.push(this.configKick);
      this.configCall = Doorbell.open(cfgRegion.callPath);
      opened.push(this.configCall);
      const mapping = this.mapping;
      this.device = new BalloonDevice({
        guestPages: this.guestPages,
        features: this.features,
        // Stage d: punch the pages out of the memory file (fallocate PUNCH_HOLE).
        release: (offset, length) => mapping.releaseRange(offset, length),
      });
      const wanted: Array<[BalloonQueue, sidecar.QueueRegion | undefined]> = [
        ["inflate", inflate],
        ["deflate", deflate],
        ["stats", hasFeature(this.features, VIRTIO_BALLOON_F_STATS_VQ) ? find(BALLOON_DEVICE, BALLOON_QUEUE_INDEX.stats) : undefined],
        ["reporting", hasFeature(this.features, VIRTIO_BALLOON_F_REPORTING) ? find(BALLOON_DEVICE, BALLOON_QUEUE_INDEX.reporting) : undefined],
      ];
      const pending: Array<Omit<QueueRunner, "done">> = [];
      for (const [name, region] of wanted) {
        if (!region) continue;
        // checkQueueAddresses runs in the constructor (QueueConfigError if misplaced).
        const q = new DeviceQueue(mem, { size: region.size, descAddr: region.descAddr, availAddr: region.availAddr, usedAddr: region.usedAddr });
        const kick = Doorbell.open(region.kickPath);
        opened.push(kick);
        const call = Doorbell.open(region.callPath);
        opened.push(call);
        pending.push({ name, q, chain: q.newChain(), kick, call });
      }
      for (const r of pending) {
        const runner = r as QueueRunner;
        runner.done = this.serve(runner);
        this.runners.push(runner);
      }
    } catch (e) {
      for (const d of opened) d.close();
      this.mapping.unmap();
      if (e instanceof AttachError) throw e;
      throw new AttachError("bad-layout", `vm ${layout.vm}: ${(e as Error).message}`);
    }
  }

  get queues(): BalloonQueue[] {
    return this.runners.map((r) => r.name);
  }

  /**
   * Whether the memory file we serve is gone or replaced (the VM was destroyed;
   * a vm-destroyed event for an earlier VM of the same name, arriving after it
   * was created again, is not about us).
   */
  memoryReplaced(): boolean {
    try {
      return statSync(this.mapping.path).ino !== this.inode;
    } catch {
      return true;
    }
  }

  allocatedBytes(): number {
    return this.mapping.allocatedBytes();
  }

  /** SetTarget: write num_pages, bump config_generation, send the configuration change notification. */
  setTarget(pages: number): void {
    if (!Number.isInteger(pages) || pages < 0 || pages > this.guestPages) throw new RangeError(`target must be 0..${this.guestPages} pages, got ${pages}`);
    this.config.setTarget(pages);
    this.configCall.ring();
  }

  /**
   * Fresh guest stats (virtio 1.2 §5.5.6.3): give the held stats buffer back,
   * which asks the driver to refill it; wait for the refilled buffer up to
   * timeoutMs. Returns false if the driver did not answer (stale stats remain).
   */
  async refreshStats(timeoutMs: number): Promise<boolean> {
    const r = this.runners.find((x) => x.name === "stats");
    if (!r || this.heldStats < 0) return false;
    const arrived = new Promise<boolean>((resolve) => {
      const t = setTimeout(() => {
        this.statsWaiters = this.statsWaiters.filter((w) => w !== done);
        resolve(false);
      }, timeoutMs);
      const done = () => {
        clearTimeout(t);
        resolve(true);
      };
      this.statsWaiters.push(done);
    });
    const head = this.heldStats;
    this.heldStats = -1;
    r.q.addUsed(head, 0);
    if (r.q.needsInterrupt()) r.call.ring();
    return arrived;
  }

  /** Stops the queue loops, closes the doorbells and unmaps guest memory. The file stays (the sidecar owns it). */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    for (const r of this.runners) {
      r.kick.close();
      r.call.close();
    }
    await Promise.all(this.runners.map((r) => r.done));
    this.configKick.close();
    this.configCall.close();
    for (const w of this.statsWaiters) w();
    this.statsWaiters = [];
    this.mapping.unmap();
  }

  private async serve(r: QueueRunner): Promise<void> {
    const check = () => this.stopped || r.q.hasPending();
    try {
      while (!this.stopped) {
        if (r.q.needsReset) return;
        this.drain(r);
        if (r.q.needsReset) return;
        await r.kick.spinThenWait(check);
      }
    } catch (e) {
      if (this.stopped) return; // close() rejects the pending wait
      this.events.failed(this, r.name, e as Error);
    }
  }

  private drain(r: QueueRunner): void {
    const before = this.device.counters.inflatedPages + this.device.counters.deflatedPages;
    let used = false;
    for (;;) {
      const c = r.q.pop(r.chain);
      if (c === null) break;
      if (c instanceof ChainError) {
        // A malformed chain never reaches the device; give it back (len 0) if
        // its head is valid, else the queue is in NEEDS_RESET (§2.1.2).
        const fatal = !r.q.discard(c);
        if (!fatal) used = true;
        this.refuse(r.name, c.code, c.message, fatal);
        continue;
      }
      let err: BalloonRequestError | { kind: string; message: string } | null = null;
      if (c.readableBytes > this.scratch.length) {
        err = { kind: "bad-length", message: `${r.name} buffer of ${c.readableBytes} bytes exceeds the ${this.scratch.length}-byte maximum (resp_hdr + BALLOON_BMAP_SIZE)` };
      } else {
        const n = r.q.readChain(c, this.scratch);
        try {
          err = this.device.handle(r.name, this.scratch, n);
        } catch (e) {
          // Not the guest's fault (e.g. fallocate failed): refuse, keep serving.
          err = { kind: "internal", message: `${r.name} buffer could not be applied: ${(e as Error).message}` };
        }
      }
      if (err) this.refuse(r.name, err.kind, err.message, false);
      if (r.name === "stats" && !err) {
        // §5.5.6.3: the device keeps the stats buffer until it wants new figures.
        if (this.heldStats >= 0) r.q.addUsed(this.heldStats, 0);
        this.heldStats = c.head;
        const ws = this.statsWaiters;
        this.statsWaiters = [];
        for (const w of ws) w();
      } else {
        r.q.addUsed(c.head, 0);
      }
      used = true;
    }
    if (used && r.q.needsInterrupt()) r.call.ring();
    if (this.device.counters.inflatedPages + this.device.counters.deflatedPages !== before) this.events.ballooned(this);
  }

  private refuse(queue: BalloonQueue, kind: string, message: string, needsReset: boolean): void {
    // Before the used entry: the driver reads refused[queue] once it sees its buffer used.
    this.config.countRefusal(queue);
    this.refusedRequests++;
    this.refusedByKind.set(kind, (this.refusedByKind.get(kind) ?? 0) + 1);
    const r: Refusal = { queue, kind, message, needsReset };
    this.lastRefusal = r;
    this.events.refused(this, r);
  }
}

/** Bitwise AND of two feature sets below 2^53 (JS bit operators are 32-bit). */
function intersect(a: number, b: number): number {
  const lo = (a % 0x1_0000_0000 & b % 0x1_0000_0000) >>> 0;
  const hi = (Math.floor(a / 0x1_0000_0000) & Math.floor(b / 0x1_0000_0000)) >>> 0;
  return hi * 0x1_0000_0000 + lo;
}
