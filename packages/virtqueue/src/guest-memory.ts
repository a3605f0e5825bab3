// Guest-physical memory as seen by one side of the virtio transport, and the
// dirty logs that live-migration reads (one for vCPU writes, what KVM's
// KVM_GET_DIRTY_LOG reports, one for device writes, what vhost's
// VHOST_F_LOG_ALL / VHOST_SET_LOG_BASE log records).
//
// Guest-physical address 0 maps to `byteOffset` of the backing buffer, which can
// be a plain ArrayBuffer (tests), a SharedArrayBuffer (worker_threads) or the
// ArrayBuffer of a MAP_SHARED file mapping (@virtmesh/shm) shared between
// processes. Nothing here does I/O.

/** Dirty-log granularity: one bit per 4 KiB page, like KVM and vhost. */
export const DIRTY_PAGE_SHIFT = 12;
export const DIRTY_PAGE_SIZE = 1 << DIRTY_PAGE_SHIFT;

/**
 * Largest guest memory we accept: every address a check computes
 * (addr + len, with len < 2^32) then stays an exact double (< 2^53).
 */
export const MAX_GUEST_MEMORY = 2 ** 52;

// virtio 1.x rings are little-endian (§2.7.3 says only legacy uses guest
// endianness). Atomics work in host order, so a big-endian host would publish
// byte-swapped indexes. Node runs on little-endian hosts only; refuse anything else.
if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error("@virtmesh/virtqueue requires a little-endian host");
}

/** Thrown by accessors on an out-of-range access: a bug in the caller, since chains are validated first. */
export class GuestMemoryError extends RangeError {
  override readonly name = "GuestMemoryError";
  constructor(
    readonly addr: number,
    readonly len: number,
    readonly size: number,
  ) {
    super(`guest memory access [0x${addr.toString(16)}, +${len}) outside guest memory of ${size} bytes`);
  }
}

export interface DirtyLogOptions {
  /** Offset of the bitmap inside `buffer` (multiple of 4). Default 0. */
  byteOffset?: number;
  /** Initial state of the `enabled` switch. Default true. */
  enabled?: boolean;
}

/**
 * A dirty-page bitmap: bit (pfn % 32) of 32-bit word (pfn / 32) is page pfn, the
 * layout of KVM's and vhost's logs on a little-endian host. The bitmap lives in
 * its own buffer so it can sit in a shared file; bits are set with Atomics.or
 * and harvested with Atomics.exchange, so writers in other processes and the
 * harvester never lose a bit.
 */
export class DirtyLog {
  /** Bytes of bitmap needed for `memSize` bytes of guest memory (whole 32-bit words). */
  static byteLength(memSize: number): number {
    const pages = Math.ceil(memSize / DIRTY_PAGE_SIZE);
    return Math.ceil(pages / 32) * 4;
  }

  /** Convenience: a log in a fresh SharedArrayBuffer. */
  static create(memSize: number, enabled = true): DirtyLog {
    return new DirtyLog(new SharedArrayBuffer(Math.max(4, DirtyLog.byteLength(memSize))), memSize, { enabled });
  }

  readonly pages: number;
  readonly words: Int32Array;
  /** Logging switch (VHOST_F_LOG_ALL negotiated / KVM_MEM_LOG_DIRTY_PAGES set). Off: markRange is a no-op. */
  enabled: boolean;

  constructor(
    buffer: ArrayBufferLike,
    readonly memSize: number,
    opts: DirtyLogOptions = {},
  ) {
    const byteOffset = opts.byteOffset ?? 0;
    if (!Number.isSafeInteger(memSize) || memSize <= 0 || memSize > MAX_GUEST_MEMORY) {
      throw new RangeError(`DirtyLog: memSize ${memSize} must be an integer in (0, 2^52]`);
    }
    if (byteOffset % 4 !== 0) throw new RangeError(`DirtyLog: byteOffset ${byteOffset} must be a multiple of 4`);
    const need = DirtyLog.byteLength(memSize);
    if (byteOffset + need > buffer.byteLength) {
      throw new RangeError(`DirtyLog: need ${need} bytes at offset ${byteOffset}, buffer has ${buffer.byteLength}`);
    }
    this.pages = Math.ceil(memSize / DIRTY_PAGE_SIZE);
    this.words = new Int32Array(buffer, byteOffset, need / 4);
    this.enabled = opts.enabled ?? true;
  }

  /** Marks every page that [addr, addr+len) touches. Callers pass ranges already checked against guest memory. */
  markRange(addr: number, len: number): void {
    if (!this.enabled || len <= 0) return;
    let first = Math.floor(addr / DIRTY_PAGE_SIZE);
    let last = Math.floor((addr + len - 1) / DIRTY_PAGE_SIZE);
    if (first < 0) first = 0;
    if (last >= this.pages) last = this.pages - 1;
    if (first > last) return;
    const words = this.words;
    let w = first >>> 5;
    const lastW = last >>> 5;
    if (w === lastW) {
      Atomics.or(words, w, maskBits(first & 31, last & 31));
      return;
    }
    Atomics.or(words, w, maskBits(first & 31, 31));
    for (w++; w < lastW; w++) {
      // A racing Atomics.exchange may have just cleared this word; an or of -1
      // (all bits) is still correct, since every page in it is being written.
      Atomics.or(words, w, -1);
    }
    Atomics.or(words, lastW, maskBits(0, last & 31));
  }

  markPage(pfn: number): void {
    if (!this.enabled || pfn < 0 || pfn >= this.pages) return;
    Atomics.or(this.words, pfn >>> 5, 1 << (pfn & 31));
  }

  isDirty(pfn: number): boolean {
    if (pfn < 0 || pfn >= this.pages) return false;
    return (Atomics.load(this.words, pfn >>> 5) & (1 << (pfn & 31))) !== 0;
  }

  /**
   * Harvests and clears the log word by word (Atomics.exchange with 0), like
   * KVM_GET_DIRTY_LOG with manual-protect off: a bit set concurrently is either
   * in this harvest or stays for the next one, never lost.
   */
  fetchAndClear(into?: Uint32Array): Uint32Array {
    const n = this.words.length;
    const out = into ?? new Uint32Array(n);
    if (out.length < n) throw new RangeError(`fetchAndClear: destination has ${out.length} words, need ${n}`);
    for (let i = 0; i < n; i++) out[i] = Atomics.exchange(this.words, i, 0);
    return out;
  }

  /** Number of dirty pages (popcount of the bitmap). */
  countDirty(): number {
    let count = 0;
    for (let i = 0; i < this.words.length; i++) count += popcount32(Atomics.load(this.words, i));
    return count;
  }

  clear(): void {
    for (let i = 0; i < this.words.length; i++) Atomics.store(this.words, i, 0);
  }
}

function maskBits(lo: number, hi: number): number {
  // Bits lo..hi inclusive, as an int32 for Atomics.or.
  const width = hi - lo + 1;
  return width === 32 ? -1 : (((1 << width) - 1) << lo) | 0;
}

function popcount32(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/**
 * Bounds-checked access to guest memory on behalf of one writer (the vCPUs or
 * the device). Every write marks the writer's dirty log. All queue code goes
 * through these methods, so a test can wrap them to observe every access.
 */
export class MemoryAccessor {
  /** Where this writer's writes are logged; null when no log is attached. */
  dirtyLog: DirtyLog | null;

  constructor(
    readonly memory: GuestMemory,
    dirtyLog: DirtyLog | null,
  ) {
    this.dirtyLog = dirtyLog;
  }

  get size(): number {
    return this.memory.size;
  }

  /** True when [addr, addr+len) lies inside guest memory (integers only; no overflow since size <= 2^52). */
  inRange(addr: number, len: number): boolean {
    return Number.isSafeInteger(addr) && Number.isSafeInteger(len) && addr >= 0 && len >= 0 && addr + len <= this.memory.size;
  }

  private check(addr: number, len: number): void {
    if (!(addr >= 0 && addr + len <= this.memory.size)) throw new GuestMemoryError(addr, len, this.memory.size);
  }

  readU8(addr: number): number {
    this.check(addr, 1);
    return this.memory.view.getUint8(addr);
  }
  readU16(addr: number): number {
    this.check(addr, 2);
    return this.memory.view.getUint16(addr, true);
  }
  readU32(addr: number): number {
    this.check(addr, 4);
    return this.memory.view.getUint32(addr, true);
  }
  readU64(addr: number): bigint {
    this.check(addr, 8);
    return this.memory.view.getBigUint64(addr, true);
  }
  writeU8(addr: number, v: number): void {
    this.check(addr, 1);
    this.memory.view.setUint8(addr, v);
    this.dirtyLog?.markRange(addr, 1);
  }
  writeU16(addr: number, v: number): void {
    this.check(addr, 2);
    this.memory.view.setUint16(addr, v, true);
    this.dirtyLog?.markRange(addr, 2);
  }
  writeU32(addr: number, v: number): void {
    this.check(addr, 4);
    this.memory.view.setUint32(addr, v, true);
    this.dirtyLog?.markRange(addr, 4);
  }
  writeU64(addr: number, v: bigint): void {
    this.check(addr, 8);
    this.memory.view.setBigUint64(addr, v, true);
    this.dirtyLog?.markRange(addr, 8);
  }

  /**
   * Sequentially consistent 16-bit load (ring idx, flags, event fields). addr must be even.
   * Pairs with storeU16Atomic in the other process: see the ordering notes in split.ts.
   */
  loadU16Atomic(addr: number): number {
    this.check(addr, 2);
    if (addr & 1) throw new GuestMemoryError(addr, 2, this.memory.size);
    return Atomics.load(this.memory.u16, addr >>> 1);
  }
  /** Sequentially consistent 16-bit store; also a full fence for the accesses around it. addr must be even. */
  storeU16Atomic(addr: number, v: number): void {
    this.check(addr, 2);
    if (addr & 1) throw new GuestMemoryError(addr, 2, this.memory.size);
    Atomics.store(this.memory.u16, addr >>> 1, v);
    this.dirtyLog?.markRange(addr, 2);
  }

  /** Copies guest bytes [addr, addr+dst.length) into dst. */
  read(addr: number, dst: Uint8Array): void {
    this.check(addr, dst.length);
    dst.set(this.memory.bytes.subarray(addr, addr + dst.length));
  }
  /** Copies src into guest memory at addr. */
  write(addr: number, src: Uint8Array): void {
    this.check(addr, src.length);
    this.memory.bytes.set(src, addr);
    this.dirtyLog?.markRange(addr, src.length);
  }
  fill(addr: number, len: number, value: number): void {
    this.check(addr, len);
    this.memory.bytes.fill(value, addr, addr + len);
    this.dirtyLog?.markRange(addr, len);
  }
  /** Zero-copy view of guest bytes. If you write through it, call markDirty yourself. */
  subarray(addr: number, len: number): Uint8Array {
    this.check(addr, len);
    return this.memory.bytes.subarray(addr, addr + len);
  }
  markDirty(addr: number, len: number): void {
    this.check(addr, len);
    this.dirtyLog?.markRange(addr, len);
  }
}

export interface GuestMemoryOptions {
  /** Where guest-physical 0 sits in the buffer (multiple of 8). Default 0. */
  byteOffset?: number;
  /** Guest memory size in bytes. Default: the rest of the buffer. */
  size?: number;
  /** Log for vCPU (driver) writes: what KVM's dirty log records. */
  vcpuLog?: DirtyLog | null;
  /** Log for device writes (writable descriptors, used ring): what VHOST_F_LOG_ALL records. */
  deviceLog?: DirtyLog | null;
}

/**
 * Guest-physical memory 0..size over any ArrayBufferLike. `vcpu` and `device`
 * are the two writers; DriverQueue writes through `vcpu`, DeviceQueue through
 * `device`, so each side's writes land in its own dirty log.
 */
export class GuestMemory {
  readonly size: number;
  readonly byteOffset: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
  /** 16-bit view for Atomics on ring fields (all of which are 2-aligned, §2.7). */
  readonly u16: Uint16Array;
  readonly vcpu: MemoryAccessor;
  readonly device: MemoryAccessor;

  constructor(
    readonly buffer: ArrayBufferLike,
    opts: GuestMemoryOptions = {},
  ) {
    const byteOffset = opts.byteOffset ?? 0;
    if (!Number.isSafeInteger(byteOffset) || byteOffset < 0 || byteOffset % 8 !== 0) {
      throw new RangeError(`GuestMemory: byteOffset ${byteOffset} must be a non-negative multiple of 8`);
    }
    const size = opts.size ?? buffer.byteLength - byteOffset;
    if (!Number.isSafeInteger(size) || size <= 0 || size > MAX_GUEST_MEMORY || byteOffset + size > buffer.byteLength) {
      throw new RangeError(`GuestMemory: size ${size} at offset ${byteOffset} does not fit a buffer of ${buffer.byteLength} bytes (max 2^52)`);
    }
    this.size = size;
    this.byteOffset = byteOffset;
    this.bytes = new Uint8Array(buffer, byteOffset, size);
    this.view = new DataView(buffer, byteOffset, size);
    this.u16 = new Uint16Array(buffer, byteOffset, size >>> 1);
    this.vcpu = new MemoryAccessor(this, opts.vcpuLog ?? null);
    this.device = new MemoryAccessor(this, opts.deviceLog ?? null);
  }
}
