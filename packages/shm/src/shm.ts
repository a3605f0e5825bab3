// @virtmesh/shm: the host's shared-memory primitives.
//
//  - mapFile(): a file under the shm directory mapped MAP_SHARED into an
//    external ArrayBuffer, with page release (fallocate PUNCH_HOLE) and the
//    file's allocated bytes, so a balloon really gives memory back.
//  - Doorbell: a cross-process futex (no FUTEX_PRIVATE_FLAG) with a shared
//    "sleepers" count, so ring() costs one shared load unless the other side
//    really sleeps (what ioeventfd/irqfd plus EVENT_IDX/NO_NOTIFY achieve).
//
// Validation with the messages users see lives here; the addon checks again.

import { constants as bufferConstants } from "node:buffer";
import { unlinkSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

// ---------------------------------------------------------------------------
// the addon

interface NativeMapping {
  buffer(offset: number, length: number): ArrayBuffer;
  unmap(): void;
  punchHole(offset: number, length: number): void;
  allocatedBytes(): number;
  fileSize(): number;
  isMapped(): boolean;
  dataSegments(offset: number, length: number): number[];
}

/** Status codes of FutexWord.waitSync / onWake (negative: -errno). */
const WAIT_WOKEN = 0;
const WAIT_TIMED_OUT = 1;
const WAIT_VALUE_CHANGED = 2;

interface NativeFutexWord {
  wake(): number;
  waitSync(expected: number, timeoutMs: number): number;
  arm(expected: number): void;
  settle(): void;
  close(): void;
}

interface NativeAddon {
  Mapping: new (path: string, size: number, create: boolean, mode: number) => NativeMapping;
  FutexWord: new (mapping: NativeMapping, byteOffset: number, onWake: (status: number) => void) => NativeFutexWord;
  pageSize: number;
  crc32c(data: ArrayBufferLike | ArrayBufferView, offset: number, length: number, seed: number): number;
}

const addon = createRequire(__filename)(join(__dirname, "..", "build", "Release", "virtmesh_shm.node")) as NativeAddon;

/**
 * crc32c (Castagnoli, RFC 3720) of data[offset, offset + length), continuing from `seed`
 * (the crc of what came before; 0 to start): native, with SSE4.2's crc32 where the CPU
 * has it. For digests of guest memory (the migration's switchover check), not for hot paths
 * that can do without a native call per buffer.
 */
export function crc32c(data: ArrayBufferLike | ArrayBufferView, offset = 0, length?: number, seed = 0): number {
  const size = data instanceof ArrayBuffer || data instanceof SharedArrayBuffer ? data.byteLength : (data as ArrayBufferView).byteLength;
  return addon.crc32c(data, offset, length ?? size - offset, seed >>> 0);
}

/** The host page size: releaseRange() works in whole pages. */
export const PAGE_SIZE: number = addon.pageSize;

/**
 * Largest ArrayBuffer this Node can wrap around external memory (4 GiB on
 * Node 20). Bigger mappings are fine; reach them through view().
 */
export const MAX_ARRAY_BUFFER_BYTES: number = bufferConstants.MAX_LENGTH;

/** Largest mapping mapFile() accepts (128 TiB, the x86-64 user address space). */
export const MAX_MAPPING_BYTES = 2 ** 47;

// ---------------------------------------------------------------------------
// argument checks

function checkInteger(what: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number" || !Number.isInteger(value)) {
    throw new TypeError(`${what} must be an integer, got ${describe(value)}`);
  }
  if (value < min || value > max) {
    throw new RangeError(`${what} must be in [${min}, ${max}], got ${value}`);
  }
  return value;
}

function checkPath(what: string, value: unknown): string {
  if (typeof value !== "string" || value.length === 0) {
    throw new TypeError(`${what} must be a non-empty string, got ${describe(value)}`);
  }
  if (value.includes("\0")) throw new TypeError(`${what} must not contain NUL bytes`);
  return value;
}

function describe(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "number" || typeof value === "boolean" || value === null || value === undefined) {
    return String(value);
  }
  return typeof value;
}

// ---------------------------------------------------------------------------
// mapFile

export interface MapFileOptions {
  /**
   * true: create the file exclusively (O_CREAT|O_EXCL, fails with EEXIST if it
   * exists, so two hosts never silently share stale guest memory) and size it
   * sparsely with ftruncate. false (default): open an existing file, which
   * must be at least `size` bytes (touching past EOF would raise SIGBUS).
   */
  create?: boolean;
  /** File mode when creating, applied exactly (fchmod, not filtered by umask). Default 0o600. */
  mode?: number;
}

/** A file mapped MAP_SHARED, PROT_READ|PROT_WRITE. */
export class SharedMapping {
  readonly path: string;
  readonly size: number;
  private readonly native: NativeMapping;
  private whole: ArrayBuffer | null = null;

  /** @internal use mapFile() */
  constructor(path: string, size: number, native: NativeMapping) {
    this.path = path;
    this.size = size;
    this.native = native;
  }

  /**
   * The whole mapping as one external ArrayBuffer (the same object on every
   * access). Mappings above MAX_ARRAY_BUFFER_BYTES have no single buffer: use
   * view(). After unmap() the buffer is detached (byteLength 0; typed arrays
   * over it have length 0 and Atomics on them throw), so no JS code can touch
   * the unmapped memory.
   */
  get buffer(): ArrayBuffer {
    if (this.whole === null) {
      if (this.size > MAX_ARRAY_BUFFER_BYTES) {
        throw new RangeError(
          `mapping of ${this.size} bytes exceeds the ${MAX_ARRAY_BUFFER_BYTES}-byte ArrayBuffer limit of this Node; use view(offset, length)`,
        );
      }
      this.whole = this.native.buffer(0, this.size);
    }
    return this.whole;
  }

  /** An external ArrayBuffer over [offset, offset+length) of the mapping (no copy, no new mmap); detached by unmap(). */
  view(offset: number, length: number): ArrayBuffer {
    this.checkMapped("view");
    checkInteger("view: offset", offset, 0, this.size);
    checkInteger("view: length", length, 0, Math.min(this.size - offset, MAX_ARRAY_BUFFER_BYTES));
    return this.native.buffer(offset, length);
  }

  get mapped(): boolean {
    return this.native.isMapped();
  }

  /**
   * Detaches every ArrayBuffer handed out, then munmap()s and closes the file.
   * Idempotent. Throws if a Doorbell attached to this mapping is still open.
   * Does not remove the file.
   */
  unmap(): void {
    this.native.unmap();
    this.whole = null;
  }

  /**
   * Gives the pages of [offset, offset+length) back to the host:
   * fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE) on the file, so
   * allocatedBytes() drops and every process's mapping reads zeros there.
   * offset must be page-aligned; length a multiple of PAGE_SIZE, or reaching
   * the end of the mapping. On tmpfs a later access (read included) through a
   * shared mapping allocates the page again.
   */
  /**
   * The file's data in [offset, offset + length) as [start, end) byte pairs (flat), from
   * lseek(SEEK_DATA/SEEK_HOLE). The rest is holes: zeros a reader need not touch (on
   * tmpfs, reading a hole through a shared mapping allocates the page).
   */
  dataSegments(offset: number, length: number): number[] {
    this.checkMapped("dataSegments");
    return this.native.dataSegments(offset, length);
  }

  releaseRange(offset: number, length: number): void {
    this.checkMapped("releaseRange");
    checkInteger("releaseRange: offset", offset, 0, this.size);
    checkInteger("releaseRange: length", length, 0, this.size - offset);
    if (offset % PAGE_SIZE !== 0) {
      throw new RangeError(`releaseRange: offset ${offset} is not a multiple of the page size ${PAGE_SIZE}`);
    }
    if (length % PAGE_SIZE !== 0 && offset + length !== this.size) {
      throw new RangeError(
        `releaseRange: length ${length} is not a multiple of the page size ${PAGE_SIZE} and does not reach the end of the mapping`,
      );
    }
    this.native.punchHole(offset, length);
  }

  /** Bytes the file really occupies (st_blocks * 512). */
  allocatedBytes(): number {
    this.checkMapped("allocatedBytes");
    return this.native.allocatedBytes();
  }

  /** @internal */
  nativeMapping(): NativeMapping {
    return this.native;
  }

  private checkMapped(op: string): void {
    if (!this.native.isMapped()) throw new Error(`${op}: ${this.path} has been unmapped`);
  }
}

/**
 * Maps `path` MAP_SHARED. Size up to MAX_MAPPING_BYTES (sparse: nothing is
 * allocated until touched).
 */
export function mapFile(path: string, size: number, opts: MapFileOptions = {}): SharedMapping {
  checkPath("mapFile: path", path);
  checkInteger("mapFile: size", size, 1, MAX_MAPPING_BYTES);
  if (typeof opts !== "object" || opts === null) throw new TypeError("mapFile: opts must be an object");
  const create = opts.create ?? false;
  if (typeof create !== "boolean") throw new TypeError(`mapFile: opts.create must be a boolean, got ${describe(create)}`);
  const mode = checkInteger("mapFile: opts.mode", opts.mode ?? 0o600, 0, 0o7777);
  return new SharedMapping(path, size, new addon.Mapping(path, size, create, mode));
}

// ---------------------------------------------------------------------------
// Doorbell
//
// Shared layout (DOORBELL_BYTES at a 16-byte aligned offset):
//   word 0  magic "VMDB"
//   word 1  layout version
//   word 2  seq       futex word; bumped by every ring() that finds a sleeper
//   word 3  sleepers  number of waiters that published "about to sleep"
//
// Why no wake-up is lost. The producer publishes work W (a ring index
// written with Atomics.store / any Atomics RMW) and then ring() reads
// `sleepers` (with Atomics.add(.., 0): a locked RMW, a full barrier on x86
// even if the JIT emitted the publish as a plain store). A consumer that found no work reads seq (s), increments
// `sleepers` (Atomics.add), then runs check() again, which must read W with
// Atomics.load. Each side stores one location and then loads the other; all
// four accesses are sequentially consistent (JS Atomics; lock-prefixed or
// xchg/mfence on x86 in every process sharing the page), so they cannot both
// read the old value (the store-buffering outcome is forbidden under SC).
// Either the consumer's re-check sees W and it does not sleep, or the
// producer sees sleepers > 0, bumps seq and calls FUTEX_WAKE. In the second
// case the consumer's FUTEX_WAIT(seq, s) either finds seq != s (the kernel
// compares under the futex bucket lock and returns EAGAIN) or is already
// queued and is woken. A stale sleepers > 0 costs a spurious wake, never a
// lost one. A process that dies while sleeping leaves sleepers > 0: rings
// then always make the syscall (slower, still correct).

/** Bytes a doorbell occupies inside a mapping. */
export const DOORBELL_BYTES = 16;
const DOORBELL_MAGIC = 0x564d4442; // "VMDB"
const DOORBELL_VERSION = 1;
const W_MAGIC = 0;
const W_VERSION = 1;
const W_SEQ = 2;
const W_SLEEPERS = 3;
/** Size of the file Doorbell.create() makes (one page). */
const DOORBELL_FILE_BYTES = 4096;

export interface DoorbellCounters {
  /** ring() calls. */
  rings: number;
  /** ring() calls that found a sleeper and made a FUTEX_WAKE syscall. */
  wakeSyscalls: number;
  /** FUTEX_WAIT syscalls (sync, or handed to the waiter thread). */
  waitSyscalls: number;
  /** Waits that ended because the other side rang. */
  wakeups: number;
  /** Waits that ended on their timeout. */
  timeouts: number;
  /** spinThenWait calls satisfied while spinning (no syscall). */
  spinHits: number;
  /** spinThenWait calls satisfied by the re-check after publishing "sleeping" (the lost-wake-up guard). */
  recheckHits: number;
}

export interface SpinOptions {
  /** Upper bound of the adaptive spin, in microseconds (default 50). 0 disables spinning. */
  maxSpinUs?: number;
}

export interface SpinSyncOptions extends SpinOptions {
  /** Give up after this long (default: wait forever). */
  timeoutMs?: number;
}

interface PendingWait {
  resolve: (status: number) => void;
  reject: (err: Error) => void;
}

/**
 * Doorbells with an event-loop wait in flight. The addon only holds the wake
 * callback weakly (so a forgotten Doorbell can be collected), and a parked
 * `await` is otherwise reachable from nothing but itself: without this root
 * the GC could collect a doorbell, its pending promise and the awaiting code
 * while the waiter thread still sleeps for them.
 */
const parkedDoorbells = new Set<Doorbell>();

/** First non-zero spin after growing from zero, like KVM's halt_poll_ns_grow_start. */
const SPIN_GROW_START_NS = 2_000;

/**
 * A doorbell for one direction of one queue (a kick or a call). Any number of
 * processes may ring; consumers sleep on it with spinThenWait().
 */
export class Doorbell {
  readonly path: string;
  private readonly mapping: SharedMapping;
  private readonly ownsMapping: boolean;
  private readonly unlinkOnClose: boolean;
  private readonly words: Int32Array;
  private readonly futex: NativeFutexWord;
  private readonly stats: DoorbellCounters = {
    rings: 0,
    wakeSyscalls: 0,
    waitSyscalls: 0,
    wakeups: 0,
    timeouts: 0,
    spinHits: 0,
    recheckHits: 0,
  };
  private pending: PendingWait | null = null;
  private sleepingHere = 0;
  private isClosed = false;
  private spinBudgetNs = SPIN_GROW_START_NS;

  private constructor(mapping: SharedMapping, byteOffset: number, owns: boolean, unlinkOnClose: boolean) {
    this.path = mapping.path;
    this.mapping = mapping;
    this.ownsMapping = owns;
    this.unlinkOnClose = unlinkOnClose;
    this.words = new Int32Array(mapping.view(byteOffset, DOORBELL_BYTES));
    this.futex = new addon.FutexWord(mapping.nativeMapping(), byteOffset + W_SEQ * 4, this.onWake);
  }

  /** Creates a one-page doorbell file (exclusive). close() unmaps and removes it. */
  static create(path: string, opts: { mode?: number } = {}): Doorbell {
    const mapping = mapFile(path, DOORBELL_FILE_BYTES, { create: true, mode: opts.mode ?? 0o600 });
    try {
      Doorbell.init(mapping, 0);
      return new Doorbell(mapping, 0, true, true);
    } catch (err) {
      mapping.unmap();
      unlinkSync(path);
      throw err;
    }
  }

  /** Opens a doorbell file made by Doorbell.create() in any process. close() unmaps it. */
  static open(path: string): Doorbell {
    const mapping = mapFile(path, DOORBELL_FILE_BYTES);
    try {
      return Doorbell.attach(mapping, 0, false);
    } catch (err) {
      mapping.unmap();
      throw err;
    }
  }

  /**
   * A doorbell living at `byteOffset` of an existing mapping (e.g. inside a
   * virtqueue region). With init, the words are (re)initialised; otherwise
   * they must already hold an initialised doorbell. close() leaves the
   * mapping mapped; the mapping cannot be unmapped while the doorbell is open.
   */
  static attach(mapping: SharedMapping, byteOffset: number, init: boolean): Doorbell {
    if (!(mapping instanceof SharedMapping)) throw new TypeError("Doorbell.attach: mapping must be a SharedMapping");
    checkInteger("Doorbell.attach: byteOffset", byteOffset, 0, mapping.size - DOORBELL_BYTES);
    if (byteOffset % 16 !== 0) throw new RangeError(`Doorbell.attach: byteOffset ${byteOffset} is not 16-byte aligned`);
    if (init) Doorbell.init(mapping, byteOffset);
    const words = new Int32Array(mapping.view(byteOffset, DOORBELL_BYTES));
    if (Atomics.load(words, W_MAGIC) !== DOORBELL_MAGIC || Atomics.load(words, W_VERSION) !== DOORBELL_VERSION) {
      throw new Error(`Doorbell: no initialised doorbell at ${mapping.path}+${byteOffset}`);
    }
    return new Doorbell(mapping, byteOffset, false, false);
  }

  private static init(mapping: SharedMapping, byteOffset: number): void {
    const words = new Int32Array(mapping.view(byteOffset, DOORBELL_BYTES));
    Atomics.store(words, W_SEQ, 0);
    Atomics.store(words, W_SLEEPERS, 0);
    Atomics.store(words, W_VERSION, DOORBELL_VERSION);
    // Magic last: open() in another process only trusts an initialised doorbell.
    Atomics.store(words, W_MAGIC, DOORBELL_MAGIC);
  }

  /**
   * Notifies the consumer. Costs one shared load when nobody sleeps (a busy
   * consumer is never kicked); makes a FUTEX_WAKE syscall only when a
   * consumer has published that it is about to sleep. Publish the work with
   * an Atomics store or RMW before calling. Returns whether it made the syscall.
   */
  ring(): boolean {
    if (this.isClosed) throw new Error("ring: doorbell is closed");
    this.stats.rings++;
    // A locked RMW, not a plain load: it orders the caller's earlier publish
    // before this read whatever instruction the JIT chose for that publish
    // (see the memory-ordering note above).
    if (Atomics.add(this.words, W_SLEEPERS, 0) === 0) return false;
    Atomics.add(this.words, W_SEQ, 1);
    this.futex.wake();
    this.stats.wakeSyscalls++;
    return true;
  }

  /** Whether any consumer currently publishes that it sleeps (or is about to). */
  get peerSleeping(): boolean {
    return !this.isClosed && Atomics.load(this.words, W_SLEEPERS) !== 0;
  }

  /**
   * First half of a sleep: publishes "sleeping" and returns the ticket to wait
   * on. The caller must re-check its condition (with Atomics loads) after this
   * and call cancelWait() if work arrived, else waitSync(ticket) / the async
   * path. spinThenWait() does all of this.
   */
  prepareWait(): number {
    if (this.isClosed) throw new Error("wait: doorbell is closed");
    const ticket = Atomics.load(this.words, W_SEQ);
    Atomics.add(this.words, W_SLEEPERS, 1);
    this.sleepingHere++;
    return ticket;
  }

  /** Withdraws the "sleeping" published by prepareWait(). */
  cancelWait(): void {
    if (this.sleepingHere === 0) return;
    this.sleepingHere--;
    Atomics.sub(this.words, W_SLEEPERS, 1);
  }

  /**
   * Blocks the calling thread until a ring() after prepareWait() returned
   * `ticket`, or the timeout. Returns false on timeout. Withdraws "sleeping".
   * For worker threads and dedicated consumer processes: it blocks the event loop.
   */
  sleepSync(ticket: number, timeoutMs = -1): boolean {
    try {
      this.stats.waitSyscalls++;
      const st = this.futex.waitSync(ticket, timeoutMs);
      if (st === WAIT_TIMED_OUT) {
        this.stats.timeouts++;
        return false;
      }
      if (st === WAIT_WOKEN || st === WAIT_VALUE_CHANGED) this.stats.wakeups++;
      return true;
    } finally {
      this.cancelWait();
    }
  }

  /** Like sleepSync, on the native waiter thread: never blocks the event loop. Withdraws "sleeping". */
  async sleep(ticket: number): Promise<void> {
    try {
      const st = await new Promise<number>((resolve, reject) => {
        if (this.pending !== null) {
          reject(new Error("wait: this Doorbell already has an event-loop waiter"));
          return;
        }
        this.pending = { resolve, reject };
        this.stats.waitSyscalls++;
        parkedDoorbells.add(this);
        try {
          this.futex.arm(ticket);
        } catch (err) {
          this.pending = null;
          parkedDoorbells.delete(this);
          throw err;
        }
      });
      if (st === WAIT_WOKEN || st === WAIT_VALUE_CHANGED) this.stats.wakeups++;
      else if (st < 0) throw new Error(`wait: futex wait failed (errno ${-st})`);
    } finally {
      this.cancelWait();
    }
  }

  /**
   * Resolves after the next ring() made after this call. It does not see a
   * ring that came earlier; to wait for a condition, use spinThenWait().
   */
  async wait(): Promise<void> {
    return this.sleep(this.prepareWait());
  }

  /** Blocking wait() for worker threads; false on timeout. */
  waitSync(timeoutMs = -1): boolean {
    checkTimeout("waitSync", timeoutMs);
    return this.sleepSync(this.prepareWait(), timeoutMs);
  }

  /**
   * Resolves once check() is true: polls it for an adaptive time (grows when
   * the wait would have been short, shrinks when it was long, as KVM's halt
   * polling does), then publishes "sleeping", re-checks (lost-wake-up guard)
   * and sleeps on the waiter thread. check() must read the shared state with
   * Atomics loads.
   */
  async spinThenWait(check: () => boolean, opts: SpinOptions = {}): Promise<void> {
    const maxSpinNs = spinLimitNs(opts);
    if (check()) return;
    if (this.spin(check, maxSpinNs)) return;
    for (;;) {
      const ticket = this.prepareWait();
      if (check()) {
        this.cancelWait();
        this.stats.recheckHits++;
        return;
      }
      const t0 = performance.now();
      await this.sleep(ticket);
      this.adapt((performance.now() - t0) * 1e6, maxSpinNs);
      if (check()) return;
    }
  }

  /** spinThenWait() blocking the calling thread; false if timeoutMs passed first. */
  spinThenWaitSync(check: () => boolean, opts: SpinSyncOptions = {}): boolean {
    const maxSpinNs = spinLimitNs(opts);
    const timeoutMs = opts.timeoutMs ?? -1;
    checkTimeout("spinThenWaitSync: opts.timeoutMs", timeoutMs);
    const deadline = timeoutMs < 0 ? Infinity : performance.now() + timeoutMs;
    if (check()) return true;
    if (this.spin(check, maxSpinNs)) return true;
    for (;;) {
      const ticket = this.prepareWait();
      if (check()) {
        this.cancelWait();
        this.stats.recheckHits++;
        return true;
      }
      const t0 = performance.now();
      const left = deadline === Infinity ? -1 : Math.max(0, deadline - t0);
      this.sleepSync(ticket, left);
      this.adapt((performance.now() - t0) * 1e6, maxSpinNs);
      if (check()) return true;
      if (performance.now() >= deadline) return false;
    }
  }

  /** Current adaptive spin budget in nanoseconds. */
  get spinNs(): number {
    return this.spinBudgetNs;
  }

  /** A snapshot of this process's counters for this doorbell. */
  get counters(): DoorbellCounters {
    return { ...this.stats };
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /**
   * Stops and joins the waiter thread, rejects a pending event-loop wait,
   * withdraws this process's "sleeping", unmaps the doorbell's own file (and
   * removes it if this side created it). Idempotent.
   */
  close(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.futex.close();
    while (this.sleepingHere > 0) this.cancelWait();
    const p = this.pending;
    this.pending = null;
    parkedDoorbells.delete(this);
    if (this.ownsMapping) {
      this.mapping.unmap();
      if (this.unlinkOnClose) {
        try {
          unlinkSync(this.path);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
        }
      }
    }
    p?.reject(new Error("wait: doorbell closed"));
  }

  private spin(check: () => boolean, maxSpinNs: number): boolean {
    const budget = Math.min(this.spinBudgetNs, maxSpinNs);
    if (budget <= 0) return false;
    const deadline = performance.now() + budget / 1e6;
    for (let i = 1; ; i++) {
      if (check()) {
        this.stats.spinHits++;
        return true;
      }
      if ((i & 63) === 0 && performance.now() >= deadline) return false;
    }
  }

  private adapt(sleptNs: number, maxSpinNs: number): void {
    if (sleptNs > maxSpinNs) {
      // Spinning could not have caught this one: spend less next time.
      this.spinBudgetNs = this.spinBudgetNs / 2 < SPIN_GROW_START_NS ? 0 : this.spinBudgetNs / 2;
    } else if (sleptNs > this.spinBudgetNs) {
      // A slightly longer spin would have avoided two syscalls.
      this.spinBudgetNs = Math.min(maxSpinNs, Math.max(SPIN_GROW_START_NS, this.spinBudgetNs * 2));
    }
  }

  // Called on the JS thread by the addon's thread-safe function.
  private readonly onWake = (status: number): void => {
    if (!this.isClosed) this.futex.settle();
    parkedDoorbells.delete(this);
    const p = this.pending;
    this.pending = null;
    p?.resolve(status);
  };
}

function spinLimitNs(opts: SpinOptions): number {
  if (typeof opts !== "object" || opts === null) throw new TypeError("spin options must be an object");
  return checkInteger("opts.maxSpinUs", opts.maxSpinUs ?? 50, 0, 1_000_000) * 1000;
}

function checkTimeout(what: string, timeoutMs: number): void {
  if (typeof timeoutMs !== "number" || Number.isNaN(timeoutMs)) {
    throw new TypeError(`${what} must be a number of milliseconds (negative: no timeout)`);
  }
}

