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
  BalloonedPages,
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
import { ChainError, DeviceQueue, GuestMemory, type ChainErrorCode, type DescriptorChain } from "@virtmesh/virtqueue";
import { BALLOON_CONFIG_DEVICE, BALLOON_DEVICE, BALLOON_QUEUE_INDEX, BALLOON_QUEUES, BalloonConfigPage, CFG_ACTUAL, CFG_ATTACHED, CFG_FEATURES, CFG_NUM_PAGES, CFG_REFUSED, ATTACHED_MAGIC } from "./config-page";
import type { BalloonVmState, SavedQueue } from "./state";

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
  /**
   * An inflate or deflate buffer was applied and is about to be returned on the
   * used ring: the moment to persist the state (a restarted device must know the
   * page the guest is told about).
   */
  changed?(vm: BalloonVm): void;
}

/** Every VIRTIO_BALLOON_F_* bit this device knows (virtio 1.2 §5.5.3, plus the seed's PAGE_BITMAP). */
export const KNOWN_FEATURES =
  featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST) +
  featureBit(VIRTIO_BALLOON_F_STATS_VQ) +
  featureBit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) +
  featureBit(VIRTIO_BALLOON_F_PAGE_BITMAP) +
  featureBit(VIRTIO_BALLOON_F_REPORTING);

/** The bits of `features` (below 2^53) that are not VIRTIO_BALLOON_F_* bits this device knows, ascending. */
export function unknownFeatureBits(features: number): number[] {
  const out: number[] = [];
  let x = features;
  for (let b = 0; x > 0 && b < 53; b++, x = Math.floor(x / 2)) {
    if (x % 2 === 1 && !hasFeature(KNOWN_FEATURES, b)) out.push(b);
  }
  return out;
}

/** Attach from a saved state: after a migration (indexes and held buffers from the state) or after a restart of balloon-host (indexes from guest memory). */
export interface RestoreFrom {
  state: BalloonVmState;
  mode: "migrate" | "restart";
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
  /** SaveState ran: the queues are not served (the guest is paused) until thaw() or stop(). */
  private frozen = false;

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
    opts: { resume?: boolean; restore?: RestoreFrom } = {},
  ) {
    const restore = opts.restore;
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
    if (restore) checkRestore(layout, restore.state, this, find);

    this.mapping = mapFile(layout.memoryPath, layout.memoryBytes);
    this.inode = statSync(layout.memoryPath).ino;
    const opened: Doorbell[] = [];
    try {
      const mem = new GuestMemory(this.mapping.buffer);
      this.config = new BalloonConfigPage(this.mapping.buffer, this.configAddr);
      if (restore) this.restoreConfig(restore);
      else if (!opts.resume) this.config.reset(this.features);
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
        ...(restore ? { balloonedStorage: BalloonedPages.fromBytes(this.guestPages, restore.state.ballooned).words } : {}),
      });
      if (restore) {
        const st = restore.state;
        Object.assign(this.device.counters, pickCounters(st.counters, this.device.counters));
        this.device.guestStats = st.guestStats ? { ...st.guestStats } : null;
        this.refusedRequests = st.refusedRequests;
        for (const [k, n] of Object.entries(st.refusedByKind)) this.refusedByKind.set(k, n);
        if (restore.mode === "migrate") {
          this.heldStats = st.heldStats;
          // The incoming memory never received the ballooned pages (the migration
          // skips them), so they are holes already; punch them anyway: a page that
          // did arrive (a migration without skip_ballooned) is released here too.
          this.device.ballooned.forEachRange((start, count) => mapping.releaseRange(start * PAGE_SIZE, count * PAGE_SIZE));
        }
      }
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
        const saved = restore?.mode === "migrate" ? restore.state.queues.find((x) => x.name === name) : undefined;
        const q = new DeviceQueue(
          mem,
          { size: region.size, descAddr: region.descAddr, availAddr: region.availAddr, usedAddr: region.usedAddr },
          // After a migration the queue resumes at the saved indexes (QEMU virtio_load: last_avail_idx);
          // after a restart it continues from used->idx (balloon queues complete in order).
          saved ? { lastAvailIdx: saved.lastAvailIdx, usedIdx: saved.usedIdx } : {},
        );
        if (saved && saved.needsReset !== "") q.enterNeedsReset(new ChainError(saved.needsReset as ChainErrorCode, 0, -1, false, true, "restored from the saved state"));
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

  get isFrozen(): boolean {
    return this.frozen;
  }

  /**
   * SaveState's first half: stop taking buffers. The queue loops end; what the
   * (paused) guest already made available is applied first, so the state holds
   * every buffer the guest published (QEMU stops the device at vm_stop before
   * saving it).
   */
  async quiesce(): Promise<void> {
    if (this.frozen || this.stopped) return;
    this.frozen = true;
    for (const r of this.runners) r.kick.ring();
    await Promise.all(this.runners.map((r) => r.done));
    for (const r of this.runners) if (!r.q.needsReset) this.drain(r);
  }

  /** Serve the queues again after quiesce() (a migration that failed before the destination ran). */
  thaw(): void {
    if (!this.frozen || this.stopped) return;
    this.frozen = false;
    for (const r of this.runners) r.done = this.serve(r);
  }

  /** The device's state outside guest memory (with quiesce() first: a consistent one). */
  snapshot(): BalloonVmState {
    const c = this.device.counters;
    return {
      vm: this.vm,
      memoryBytes: this.memoryBytes,
      guestPages: this.guestPages,
      configAddr: this.configAddr,
      features: this.features,
      mode: this.mode,
      targetPages: this.config.numPages,
      actualPages: this.config.actual,
      refusedByQueue: BALLOON_QUEUES.map((q) => this.config.refused(q)),
      queues: this.runners.map(
        (r): SavedQueue => ({
          name: r.name,
          size: r.q.size,
          descAddr: r.q.descAddr,
          availAddr: r.q.availAddr,
          usedAddr: r.q.usedAddr,
          lastAvailIdx: r.q.lastAvailIdx,
          usedIdx: r.q.usedIdx,
          needsReset: r.q.needsReset?.code ?? "",
        }),
      ),
      heldStats: this.heldStats,
      refusedRequests: this.refusedRequests,
      refusedByKind: Object.fromEntries(this.refusedByKind),
      counters: { ...c },
      guestStats: this.device.guestStats ? { ...this.device.guestStats } : null,
      memoryIno: this.inode,
      ballooned: this.device.ballooned.toBytes().slice(),
    };
  }

  /**
   * The config page from the state. The page is guest-writable, so the saved target
   * wins over what the page says after a restart; after a migration the device's words
   * (target, refused counters, features, marker) and the driver's actual are the source's.
   */
  private restoreConfig(restore: RestoreFrom): void {
    const st = restore.state;
    const w = this.config.words;
    if (restore.mode === "migrate") {
      Atomics.store(w, CFG_ACTUAL, st.actualPages);
      for (let i = 0; i < 4; i++) Atomics.store(w, CFG_REFUSED + i, st.refusedByQueue[i]!);
    }
    Atomics.store(w, CFG_FEATURES, this.features);
    Atomics.store(w, CFG_ATTACHED, ATTACHED_MAGIC);
    // A changed target is a configuration change (the driver re-reads it); an unchanged one is not.
    if (Atomics.load(w, CFG_NUM_PAGES) !== st.targetPages) this.config.setTarget(st.targetPages);
  }

  /** SetTarget: write num_pages, bump config_generation, send the configuration change notification. */
  setTarget(pages: number): void {
    if (!Number.isInteger(pages) || pages < 0 || pages > this.guestPages) throw new RangeError(`target must be 0..${this.guestPages} pages, got ${pages}`);
    if (this.frozen) throw new RangeError(`vm ${this.vm}'s balloon is saved for a migration (SaveState): no new target`);
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
    // Frozen: the held buffer is part of the saved state; the last figures stand.
    if (!r || this.heldStats < 0 || this.frozen) return false;
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
    const check = () => this.stopped || this.frozen || r.q.hasPending();
    try {
      while (!this.stopped && !this.frozen) {
        if (r.q.needsReset) return;
        this.drain(r);
        if (r.q.needsReset) return;
        if (this.frozen) return;
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
          if (!err && (r.name === "inflate" || r.name === "deflate")) this.events.changed?.(this);
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

/** LoadState's checks: the saved device must fit the layout this host's sidecar holds. */
function checkRestore(
  layout: sidecar.VmLayout,
  st: BalloonVmState,
  v: { deviceFeatures: number; guestPages: number; configAddr: number },
  find: (device: string, index: number) => sidecar.QueueRegion | undefined,
): void {
  const bad = (msg: string) => new AttachError("bad-layout", `vm ${layout.vm}: the saved balloon state does not fit this host's VM: ${msg}`);
  if (st.memoryBytes !== layout.memoryBytes) throw bad(`memory of ${st.memoryBytes} bytes, here ${layout.memoryBytes}`);
  if (st.guestPages !== v.guestPages) throw bad(`${st.guestPages} guest pages, here ${v.guestPages}`);
  if (st.configAddr !== v.configAddr) throw bad(`config page at ${st.configAddr}, here ${v.configAddr}`);
  if (intersect(st.features, v.deviceFeatures) !== st.features) throw bad(`features 0x${st.features.toString(16)} are not all offered here (0x${v.deviceFeatures.toString(16)})`);
  if (balloonModeFor(st.features) !== st.mode) throw bad(`mode ${st.mode} does not follow from features 0x${st.features.toString(16)}`);
  for (const q of st.queues) {
    const r = find(BALLOON_DEVICE, BALLOON_QUEUE_INDEX[q.name]);
    if (!r || r.size !== q.size || r.descAddr !== q.descAddr || r.availAddr !== q.availAddr || r.usedAddr !== q.usedAddr) throw bad(`${q.name} queue is placed differently`);
    if (((q.usedIdx - q.lastAvailIdx) & 0xffff) !== 0 && ((q.lastAvailIdx - q.usedIdx) & 0xffff) > q.size) throw bad(`${q.name} queue: last_avail_idx ${q.lastAvailIdx} is more than ${q.size} ahead of used idx ${q.usedIdx}`);
  }
  if (st.heldStats >= 0 && !st.queues.some((q) => q.name === "stats" && st.heldStats < q.size)) throw bad(`held stats buffer ${st.heldStats} is not a stats queue head`);
}

/** The saved counters this device has (a state from another version may have more or fewer). */
function pickCounters(saved: Record<string, number>, into: object): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of Object.keys(into)) if (typeof saved[k] === "number") out[k] = saved[k];
  return out;
}
