// vhost-blk backends: where a device's sectors live. A raw image file does real
// positional I/O straight into and out of guest memory (the guest memory mapping
// is the buffer handed to the kernel: no copy); null and memory backends are for
// benchmarks. Every method takes a per-head callback allocated once at setup.
import { closeSync, fstatSync, fsync, openSync, read, realpathSync, write, writeSync, constants as fsConstants } from "node:fs";
import { createHash } from "node:crypto";
import { tmpdir, userInfo } from "node:os";
import { dirname, isAbsolute, join, resolve, sep } from "node:path";
import { ConfigError } from "@virtmesh/config";
import { VIRTIO_BLK_ID_BYTES } from "@virtmesh/virtio-blk";
import { VhostError } from "./errors";

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

/** VIRTMESH_BLK_CACHE: how file images are opened (QEMU's cache= modes). */
export type BlkCacheMode = "writeback" | "writethrough";
export const BLK_CACHE_ENV = "VIRTMESH_BLK_CACHE";

/** writeback (default: the page cache absorbs writes) or writethrough (O_DSYNC). Throws on a bad value. */
export function blkCacheMode(env: NodeJS.ProcessEnv = process.env): BlkCacheMode {
  const v = env[BLK_CACHE_ENV] || "writeback";
  if (v !== "writeback" && v !== "writethrough") throw new ConfigError(`${BLK_CACHE_ENV}=${v} must be writeback or writethrough`);
  return v;
}

/** A raw image file, opened O_RDWR; FLUSH is fsync (the seed's vfs_fsync). */
export class FileBackend implements BlkBackend {
  readonly kind = "file";
  readonly capacityBytes: number;
  serial: Uint8Array;
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
  serial: Uint8Array;
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
  serial: Uint8Array;
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

export const IMAGE_DIRS_ENV = "VIRTMESH_IMAGE_DIRS";

/**
 * VIRTMESH_IMAGE_DIRS (":"-separated absolute directories): where BLK_SET_BACKEND may
 * open FILE images (issue 16). Default: the state directory's disks/ (what the launcher
 * and guest-driver use: $VIRTMESH_STATE_DIR/disks, or $TMPDIR/virtmesh-<uid>/disks) and,
 * when VIRTMESH_DISK is set in the worker's environment, its directory.
 */
export function imageDirs(env: NodeJS.ProcessEnv = process.env): string[] {
  const v = env[IMAGE_DIRS_ENV];
  if (v !== undefined && v !== "") {
    const dirs = v.split(":").filter((d) => d !== "");
    for (const d of dirs) if (!isAbsolute(d)) throw new ConfigError(`${IMAGE_DIRS_ENV}: ${d} must be an absolute path`);
    return dirs;
  }
  const stateDir = env.VIRTMESH_STATE_DIR || join(tmpdir(), `virtmesh-${userInfo().uid}`);
  const dirs = [join(stateDir, "disks")];
  if (env.VIRTMESH_DISK && isAbsolute(env.VIRTMESH_DISK)) dirs.push(dirname(env.VIRTMESH_DISK));
  return dirs;
}

/** What BLK_SET_BACKEND names: the kind, the image (FILE) or the size (NULL / MEMORY). */
export interface BackendSpec {
  kind: BlkBackend["kind"];
  path: string;
  capacityBytes: number;
}

/** Largest in-memory backend (it lives in this process). */
export const MAX_MEMORY_BACKEND_BYTES = 4 * 2 ** 30;
/** Largest null backend (sector * 512 stays exact). */
export const MAX_NULL_BACKEND_BYTES = 2 ** 50;

export interface OpenBackendOptions {
  /** Directories FILE images must lie under (issue 16); empty or absent: any absolute path. */
  imageDirs?: readonly string[];
  /** The GET_ID serial the guest already saw (a migrated or restored device keeps it). */
  serial?: Uint8Array;
  /** FILE: the capacity the guest already saw; a different image size is refused. */
  expectCapacity?: number;
}

/** True when `path` (resolved) lies strictly under `dir` (resolved): no `..` or `/..` tricks. */
export function isUnder(dir: string, path: string): boolean {
  const d = resolve(dir);
  const p = resolve(path);
  return p.startsWith(d.endsWith(sep) ? d : d + sep);
}

/**
 * The one backend factory (BLK_SET_BACKEND, LoadDeviceState and a restarted worker's
 * restore): checks what the caller named exactly as vhost_blk_set_backend checks its fd
 * (-EINVAL on a bad one) and opens it. `name` goes into the NULL / MEMORY serials.
 */
export function openBackend(spec: BackendSpec, name: string, opts: OpenBackendOptions = {}): BlkBackend {
  const cap = spec.capacityBytes;
  const checkCap = (max: number): void => {
    if (!(Number.isSafeInteger(cap) && cap > 0 && cap % 512 === 0 && cap <= max)) throw new VhostError("EINVAL", `capacity_bytes ${cap} must be a positive multiple of 512 up to ${max}`);
  };
  let be: BlkBackend;
  switch (spec.kind) {
    case "file": {
      if (!isAbsolute(spec.path) || spec.path.includes("\0")) throw new VhostError("EINVAL", `backend path ${JSON.stringify(spec.path.slice(0, 200))} must be absolute`);
      const dirs = opts.imageDirs ?? [];
      if (dirs.length > 0 && !dirs.some((d) => isUnder(d, spec.path))) {
        throw new VhostError("EINVAL", `backend path ${JSON.stringify(spec.path.slice(0, 200))} is not under an image directory (${dirs.join(", ")}; VIRTMESH_IMAGE_DIRS)`);
      }
      be = new FileBackend(spec.path);
      if (dirs.length > 0 && !dirs.some((d) => isUnder(realpathSync(d), realpathSync(spec.path)))) {
        be.close();
        throw new VhostError("EINVAL", `backend path ${JSON.stringify(spec.path.slice(0, 200))} resolves outside the image directories`);
      }
      if (opts.expectCapacity !== undefined && be.capacityBytes !== opts.expectCapacity) {
        be.close();
        throw new VhostError("EINVAL", `image ${spec.path} has ${be.capacityBytes} bytes, the device had ${opts.expectCapacity}`);
      }
      break;
    }
    case "null":
      checkCap(MAX_NULL_BACKEND_BYTES);
      be = new NullBackend(cap, name);
      break;
    case "memory":
      checkCap(MAX_MEMORY_BACKEND_BYTES);
      be = new MemoryBackend(cap, name);
      break;
    default:
      throw new VhostError("EINVAL", `backend kind ${String(spec.kind)} is not FILE, NULL or MEMORY`);
  }
  if (opts.serial !== undefined) {
    if (opts.serial.length !== VIRTIO_BLK_ID_BYTES) {
      be.close();
      throw new VhostError("EINVAL", `serial of ${opts.serial.length} bytes, need ${VIRTIO_BLK_ID_BYTES}`);
    }
    (be as FileBackend | NullBackend | MemoryBackend).serial = opts.serial.slice();
  }
  return be;
}
