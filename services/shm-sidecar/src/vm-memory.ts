// One VM's shared memory on this host: the guest-memory file, the doorbells of
// its queues, its two dirty logs and its VFIO IOMMU container. Everything here
// is created by VmMemory.create and removed by destroy(); other processes map
// the same files MAP_SHARED after reading the layout.
//
//   <shmDir>/<vm>/                 0700
//     memory                       guest-physical memory, sparse, 0600
//     dirty-vcpu                   vCPU dirty log (KVM_GET_DIRTY_LOG), one bit per 4 KiB page
//     dirty-device                 device dirty log (VHOST_F_LOG_ALL), same layout
//     <device>.<index>.kick        doorbell driver -> device (ioeventfd)
//     <device>.<index>.call        doorbell device -> driver (irqfd)
import { status as Status } from "@grpc/grpc-js";
import { mkdirSync, rmdirSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import { sidecar } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { Doorbell, MAX_ARRAY_BUFFER_BYTES, mapFile, type SharedMapping } from "@virtmesh/shm";
import { IommuContainer, type DirtyRange } from "@virtmesh/vfio";
import { DirtyLog } from "@virtmesh/virtqueue";
import { GUEST_PAGE_SIZE } from "./config";
import { queueStem, type QueuePlacement } from "./layout";
import { GuestPages, type MigrationBitmap } from "./migration";

export const MEMORY_FILE = "memory";
export const VCPU_DIRTY_LOG_FILE = "dirty-vcpu";
export const DEVICE_DIRTY_LOG_FILE = "dirty-device";
export const MAX_IOMMU_BITMAP_BYTES = 16 << 20;

/** Bytes of a dirty-log file for `pages` pages: whole little-endian 64-bit words (the proto's bitmap, KVM's unsigned long). */
export function dirtyLogFileBytes(pages: number): number {
  return Math.max(8, Math.ceil(pages / 64) * 8);
}

export interface DirtyLogSnapshot {
  pages: number;
  dirty: number;
  bitmap: Uint8Array;
}

interface QueueFiles {
  kick: Doorbell;
  call: Doorbell;
}

/** Turns a file-system failure while building a VM into the gRPC status a caller can act on. */
function fsError(what: string, e: unknown): GrpcError {
  const err = e as NodeJS.ErrnoException;
  const msg = `${what}: ${err.message}`;
  if (err.code === "ENOSPC" || err.code === "ENOMEM" || err.code === "EMFILE" || err.code === "ENFILE") {
    return new GrpcError(Status.RESOURCE_EXHAUSTED, msg);
  }
  if (err.code === "EEXIST") return new GrpcError(Status.ALREADY_EXISTS, `${msg} (left behind by an earlier sidecar?)`);
  return new GrpcError(Status.INTERNAL, msg);
}

export class VmMemory {
  readonly pages: number;
  readonly memoryPath: string;
  readonly vcpuLogPath: string;
  readonly deviceLogPath: string;
  readonly iommu: IommuContainer;
  private readonly vcpuLog: DirtyLog;
  private readonly deviceLog: DirtyLog;
  private dirtyLogging = false;
  private ram: Uint8Array | null = null;
  private destroyed = false;
  private pagesReader: GuestPages | null = null;
  /** The migration bitmap (StartMigrationBitmap .. StopMigrationBitmap / DestroyVm). */
  migration: MigrationBitmap | null = null;

  private constructor(
    readonly name: string,
    readonly dir: string,
    readonly memoryBytes: number,
    readonly placement: QueuePlacement,
    private readonly memory: SharedMapping,
    private readonly vcpuLogMap: SharedMapping,
    private readonly deviceLogMap: SharedMapping,
    private readonly queueFiles: QueueFiles[],
    /** Created for an incoming migration: empty, waiting for ReceivePages. */
    readonly incoming: boolean,
  ) {
    this.pages = memoryBytes / GUEST_PAGE_SIZE;
    this.memoryPath = memory.path;
    this.vcpuLogPath = vcpuLogMap.path;
    this.deviceLogPath = deviceLogMap.path;
    this.vcpuLog = new DirtyLog(vcpuLogMap.buffer, memoryBytes, { enabled: true });
    this.deviceLog = new DirtyLog(deviceLogMap.buffer, memoryBytes, { enabled: true });
    // A GET_BITMAP bitmap must fit one gRPC reply (64 MiB): 16 MiB covers 512 GiB of iova.
    this.iommu = new IommuContainer({ guestMemoryBytes: memoryBytes, maxBitmapBytes: MAX_IOMMU_BITMAP_BYTES });
  }

  /**
   * Creates `<shmDir>/<name>` and every file in it. All or nothing: on failure
   * whatever was created is removed again before the error is thrown.
   */
  static create(shmDir: string, name: string, memoryBytes: number, placement: QueuePlacement, incoming = false): VmMemory {
    const dir = join(shmDir, name);
    const undo: Array<() => void> = [];
    const rollback = () => {
      for (const u of undo.reverse()) {
        try {
          u();
        } catch {
          // best effort: the first error is the one the caller sees
        }
      }
    };
    try {
      try {
        mkdirSync(dir, { mode: 0o700 });
      } catch (e) {
        throw fsError(`cannot create ${dir}`, e);
      }
      undo.push(() => rmdirSync(dir));
      const map = (file: string, bytes: number): SharedMapping => {
        const path = join(dir, file);
        let m: SharedMapping;
        try {
          m = mapFile(path, bytes, { create: true, mode: 0o600 });
        } catch (e) {
          throw fsError(`cannot create ${path}`, e);
        }
        undo.push(() => {
          m.unmap();
          unlinkSync(path);
        });
        return m;
      };
      const memory = map(MEMORY_FILE, memoryBytes);
      const logBytes = dirtyLogFileBytes(memoryBytes / GUEST_PAGE_SIZE);
      const vcpuLogMap = map(VCPU_DIRTY_LOG_FILE, logBytes);
      const deviceLogMap = map(DEVICE_DIRTY_LOG_FILE, logBytes);
      const queueFiles: QueueFiles[] = [];
      const bell = (path: string): Doorbell => {
        let d: Doorbell;
        try {
          d = Doorbell.create(path, { mode: 0o600 });
        } catch (e) {
          throw fsError(`cannot create ${path}`, e);
        }
        undo.push(() => d.close());
        return d;
      };
      for (const q of placement.queues) {
        const stem = join(dir, queueStem(q.device, q.index));
        queueFiles.push({ kick: bell(`${stem}.kick`), call: bell(`${stem}.call`) });
      }
      return new VmMemory(name, dir, memoryBytes, placement, memory, vcpuLogMap, deviceLogMap, queueFiles, incoming);
    } catch (e) {
      rollback();
      throw e;
    }
  }

  layout(host: string, shmDir: string): sidecar.VmLayout {
    return {
      vm: this.name,
      host,
      memoryPath: this.memoryPath,
      memoryBytes: this.memoryBytes,
      pageSize: GUEST_PAGE_SIZE,
      queues: this.placement.queues.map((q, i) => ({
        device: q.device,
        index: q.index,
        size: q.size,
        descAddr: q.descAddr,
        availAddr: q.availAddr,
        usedAddr: q.usedAddr,
        kickPath: this.queueFiles[i]!.kick.path,
        callPath: this.queueFiles[i]!.call.path,
      })),
      dirtyLogPath: this.vcpuLogPath,
      deviceDirtyLogPath: this.deviceLogPath,
      shmDir,
      reservedAddr: this.placement.reservedAddr,
      reservedBytes: this.placement.reservedBytes,
      dirtyLogging: this.dirtyLogging,
    };
  }

  get dirtyLoggingEnabled(): boolean {
    return this.dirtyLogging;
  }

  /**
   * KVM_MEM_LOG_DIRTY_PAGES on/off for the whole VM. Turning it on starts a
   * fresh log (both bitmaps cleared), as KVM allocates a zeroed bitmap when
   * the flag is set; the first migration round copies everything anyway.
   * Returns whether the state changed.
   */
  setDirtyLogging(enabled: boolean): boolean {
    if (enabled === this.dirtyLogging) return false;
    if (enabled) {
      this.vcpuLog.clear();
      this.deviceLog.clear();
    }
    this.dirtyLogging = enabled;
    return true;
  }

  /**
   * KVM_GET_DIRTY_LOG over the chosen log(s): word by word with
   * Atomics.exchange (clear) or Atomics.load, so a bit another process sets
   * meanwhile is in this harvest or the next, never lost.
   */
  fetchDirtyLog(kind: sidecar.DirtyLogKind, clear: boolean): DirtyLogSnapshot {
    const K = sidecar.DirtyLogKind;
    if (kind !== K.DIRTY_LOG_KIND_VCPU && kind !== K.DIRTY_LOG_KIND_DEVICE && kind !== K.DIRTY_LOG_KIND_BOTH) {
      throw new GrpcError(
        Status.INVALID_ARGUMENT,
        `kind ${kind} must be DIRTY_LOG_KIND_VCPU (1), DIRTY_LOG_KIND_DEVICE (2) or DIRTY_LOG_KIND_BOTH (3)`,
      );
    }
    if (!this.dirtyLogging) {
      // kvm_get_dirty_log returns ENOENT for a slot without a dirty bitmap.
      throw new GrpcError(
        Status.FAILED_PRECONDITION,
        `dirty logging is off for vm '${this.name}': call SetDirtyLogging(enabled=true) first`,
      );
    }
    const bytes = dirtyLogFileBytes(this.pages);
    const out = new Uint8Array(bytes);
    const words = new Uint32Array(out.buffer, 0, this.vcpuLog.words.length);
    const logs: DirtyLog[] = [];
    if (kind !== K.DIRTY_LOG_KIND_DEVICE) logs.push(this.vcpuLog);
    if (kind !== K.DIRTY_LOG_KIND_VCPU) logs.push(this.deviceLog);
    for (const log of logs) {
      const src = log.words;
      for (let i = 0; i < src.length; i++) words[i]! |= clear ? Atomics.exchange(src, i, 0) : Atomics.load(src, i);
    }
    // Another process may have set bits past the last page; they name no page.
    const tail = this.pages & 31;
    if (tail !== 0) words[words.length - 1]! &= (1 << tail) - 1;
    let dirty = 0;
    for (let i = 0; i < words.length; i++) dirty += popcount32(words[i]!);
    return { pages: this.pages, dirty, bitmap: out };
  }

  /** DMA unmap's dirty ranges (seed L208-L209: the unmap reports before the iovas go) into the device log. */
  recordDeviceDirty(ranges: readonly DirtyRange[]): void {
    for (const r of ranges) this.deviceLog.markRange(r.gpa, r.size);
  }

  /** Punches [addr, addr+len) out of the memory file; returns the file's allocated bytes afterwards. */
  releasePages(addr: number, len: number): number {
    const invalid = (m: string) => new GrpcError(Status.INVALID_ARGUMENT, m);
    if (!Number.isSafeInteger(addr) || addr % GUEST_PAGE_SIZE !== 0) {
      throw invalid(`guest_addr 0x${addr.toString(16)} is not a multiple of the ${GUEST_PAGE_SIZE}-byte page size`);
    }
    if (!Number.isSafeInteger(len) || len <= 0 || len % GUEST_PAGE_SIZE !== 0) {
      throw invalid(`length ${len} must be a positive multiple of the ${GUEST_PAGE_SIZE}-byte page size`);
    }
    if (addr + len > this.memoryBytes) {
      throw new GrpcError(
        Status.OUT_OF_RANGE,
        `[guest_addr 0x${addr.toString(16)}, +length ${len}) ends past guest memory of ${this.memoryBytes} bytes`,
      );
    }
    const { reservedAddr, reservedBytes } = this.placement;
    if (reservedBytes > 0 && addr + len > reservedAddr) {
      throw invalid(
        `[guest_addr 0x${addr.toString(16)}, +length ${len}) overlaps the virtqueue region [0x${reservedAddr.toString(16)}, +${reservedBytes}); those pages are not the guest's to release`,
      );
    }
    this.memory.releaseRange(addr, len);
    return this.memory.allocatedBytes();
  }

  allocatedBytes(): number {
    return this.memory.allocatedBytes();
  }

  /** False once destroy() ran: its buffers are detached and must not be read. */
  get alive(): boolean {
    return !this.destroyed;
  }

  /** Guest memory read page by page without allocating (SendDirty, ChecksumMemory). */
  guestPages(): GuestPages {
    this.pagesReader ??= new GuestPages(this.memoryBytes, (off, len) => this.memory.view(off, len), undefined, (off, len) => this.memory.dataSegments(off, len));
    return this.pagesReader;
  }

  /**
   * Writes migrated pages (ReceivePages): `data` holds one page per pfn, in
   * order; with `zero`, the pages are punched out instead (zeros, no memory).
   * The caller has checked pfns and data length.
   */
  writePages(pfns: readonly number[], data: Uint8Array, zero: boolean): void {
    if (zero) {
      // One hole per run of consecutive pfns.
      for (let i = 0; i < pfns.length; ) {
        let j = i + 1;
        while (j < pfns.length && pfns[j] === pfns[j - 1]! + 1) j++;
        this.memory.releaseRange(pfns[i]! * GUEST_PAGE_SIZE, (j - i) * GUEST_PAGE_SIZE);
        i = j;
      }
      return;
    }
    if (this.memoryBytes <= MAX_ARRAY_BUFFER_BYTES) {
      this.ram ??= new Uint8Array(this.memory.buffer);
      for (let i = 0; i < pfns.length; i++) {
        this.ram.set(data.subarray(i * GUEST_PAGE_SIZE, (i + 1) * GUEST_PAGE_SIZE), pfns[i]! * GUEST_PAGE_SIZE);
      }
      return;
    }
    for (let i = 0; i < pfns.length; i++) {
      new Uint8Array(this.memory.view(pfns[i]! * GUEST_PAGE_SIZE, GUEST_PAGE_SIZE)).set(
        data.subarray(i * GUEST_PAGE_SIZE, (i + 1) * GUEST_PAGE_SIZE),
      );
    }
  }

  /** Unmaps everything and removes every file and the directory. Idempotent; returns what could not be removed. */
  destroy(): string[] {
    if (this.destroyed) return [];
    this.destroyed = true;
    const problems: string[] = [];
    const attempt = (what: string, f: () => void) => {
      try {
        f();
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT") problems.push(`${what}: ${(e as Error).message}`);
      }
    };
    this.ram = null;
    this.pagesReader = null;
    this.migration = null;
    for (const q of this.queueFiles) {
      attempt(q.kick.path, () => q.kick.close());
      attempt(q.call.path, () => q.call.close());
    }
    for (const m of [this.memory, this.vcpuLogMap, this.deviceLogMap]) {
      attempt(m.path, () => m.unmap());
      attempt(m.path, () => unlinkSync(m.path));
    }
    attempt(this.dir, () => rmdirSync(this.dir));
    return problems;
  }
}

function popcount32(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}
