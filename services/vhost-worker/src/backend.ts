// vhost-blk backends: where a device's sectors live. A raw image file does real
// positional I/O straight into and out of guest memory (the guest memory mapping
// is the buffer handed to the kernel: no copy); null and memory backends are for
// benchmarks. Every method takes a per-head callback allocated once at setup.
import { closeSync, fstatSync, fsync, openSync, read, realpathSync, write, writeSync, constants as fsConstants } from "node:fs";
import { createHash } from "node:crypto";
import { ConfigError } from "@virtmesh/config";
import { VIRTIO_BLK_ID_BYTES } from "@virtmesh/virtio-blk";

export type IoCallback = (err: NodeJS.ErrnoException | null, bytes: number) => void;

export interface BlkBackend {
  readonly kind: "file" | "null" | "memory";
  readonly capacityBytes: number;
  /** The 20-byte GET_ID serial (§5.2.6: VIRTIO_BLK_ID_BYTES). */
  readonly serial: Uint8Array;
  /** Reads [pos, pos+len) of the disk into buf[off, off+len). */
  read(buf: Uint8Array, off: number, len: number, pos: number, cb: IoCallback): void;
  /** Writes buf[off, off+len) to [pos, pos+len) of the disk. */
  write(buf: Uint8Array, off: number, len: number, pos: number, cb: IoCallback): void;
  flush(cb: IoCallback): void;
  /** Zeroes [pos, pos+len) (DISCARD, WRITE_ZEROES). Synchronous; callers bound len. */
  zeroSync(pos: number, len: number): void;
  close(): void;
}

function serialBytes(s: string): Uint8Array {
  const out = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  out.set(new TextEncoder().encode(s).subarray(0, VIRTIO_BLK_ID_BYTES));
  return out;
}

const ZEROES = new Uint8Array(1 << 20);

/** A raw image file, opened O_RDWR; FLUSH is fsync (the seed's vfs_fsync). */
/** VIRTMESH_BLK_CACHE: how file images are opened (QEMU's cache= modes). */
export type BlkCacheMode = "writeback" | "writethrough";
export const BLK_CACHE_ENV = "VIRTMESH_BLK_CACHE";

/** writeback (default: the page cache absorbs writes) or writethrough (O_DSYNC). Throws on a bad value. */
export function blkCacheMode(env: NodeJS.ProcessEnv = process.env): BlkCacheMode {
  const v = env[BLK_CACHE_ENV] || "writeback";
  if (v !== "writeback" && v !== "writethrough") throw new ConfigError(`${BLK_CACHE_ENV}=${v} must be writeback or writethrough`);
  return v;
}

export class FileBackend implements BlkBackend {
  readonly kind = "file";
  readonly capacityBytes: number;
  readonly serial: Uint8Array;
  private fd: number;

  constructor(
    readonly path: string,
    readonly cache: BlkCacheMode = blkCacheMode(),
  ) {
    // Node opens every fd O_CLOEXEC. writethrough: QEMU's cache=writethrough, every
    // write reaches the disk before it completes (O_DSYNC).
    this.fd = openSync(path, fsConstants.O_RDWR | (cache === "writethrough" ? fsConstants.O_DSYNC : 0));
    try {
      const st = fstatSync(this.fd, { bigint: true });
      if (!st.isFile()) throw new Error(`${path} is not a regular file`);
      this.capacityBytes = Number(st.size) - (Number(st.size) % 512);
      // A real serial for GET_ID (the seed returned the constant "VHOST-BLK-DISK"
      // with a TODO): stable for the image (device, inode, real path), different
      // for every image, so a guest can tell its disks apart across restarts.
      const h = createHash("sha256").update(`${st.dev}:${st.ino}:${realpathSync(path)}`).digest("hex");
      this.serial = serialBytes(`VMBLK-${h.slice(0, 14)}`);
    } catch (e) {
      closeSync(this.fd);
      throw e;
    }
  }
  read(buf: Uint8Array, off: number, len: number, pos: number, cb: IoCallback): void {
    read(this.fd, buf, off, len, pos, cb);
  }
  write(buf: Uint8Array, off: number, len: number, pos: number, cb: IoCallback): void {
    write(this.fd, buf, off, len, pos, cb);
  }
  flush(cb: IoCallback): void {
    fsync(this.fd, (err) => cb(err, 0));
  }
  zeroSync(pos: number, len: number): void {
    while (len > 0) {
      const n = Math.min(len, ZEROES.length);
      writeSync(this.fd, ZEROES, 0, n, pos);
      pos += n;
      len -= n;
    }
  }
  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}

/** Completes without I/O (reads return whatever the guest buffer held). */
export class NullBackend implements BlkBackend {
  readonly kind = "null";
  readonly serial: Uint8Array;
  constructor(readonly capacityBytes: number, name: string) {
    this.serial = serialBytes(`VMNULL-${name}`);
  }
  read(_b: Uint8Array, _o: number, len: number, _p: number, cb: IoCallback): void {
    queueMicrotask(() => cb(null, len));
  }
  write(_b: Uint8Array, _o: number, len: number, _p: number, cb: IoCallback): void {
    queueMicrotask(() => cb(null, len));
  }
  flush(cb: IoCallback): void {
    queueMicrotask(() => cb(null, 0));
  }
  zeroSync(): void {}
  close(): void {}
}

/** An in-memory disk (copies, but no syscall). */
export class MemoryBackend implements BlkBackend {
  readonly kind = "memory";
  readonly serial: Uint8Array;
  private readonly disk: Uint8Array;
  constructor(readonly capacityBytes: number, name: string) {
    this.disk = new Uint8Array(capacityBytes);
    this.serial = serialBytes(`VMMEM-${name}`);
  }
  read(buf: Uint8Array, off: number, len: number, pos: number, cb: IoCallback): void {
    buf.set(this.disk.subarray(pos, pos + len), off);
    queueMicrotask(() => cb(null, len));
  }
  write(buf: Uint8Array, off: number, len: number, pos: number, cb: IoCallback): void {
    this.disk.set(buf.subarray(off, off + len), pos);
    queueMicrotask(() => cb(null, len));
  }
  flush(cb: IoCallback): void {
    queueMicrotask(() => cb(null, 0));
  }
  zeroSync(pos: number, len: number): void {
    this.disk.fill(0, pos, pos + len);
  }
  close(): void {}
}
