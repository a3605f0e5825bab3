// Save and restore of a vhost-blk device: one encoding for both the crash-recovery state
// file (a restarted worker serves the device again) and the migration device state
// (SaveDeviceState / LoadDeviceState, vhost-user's SET_DEVICE_STATE_FD in phase STOPPED).
//
// The device state is small and binary-framed: magic, version, payload length, a JSON
// payload, and a crc32c over all of it. It names no host file except the disk image:
// doorbells, the dirty log and the memory file are the loading host's. Loading never
// assigns fields: applySetup runs the ioctl setters, so it checks exactly what they check.
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { crc32c, VIRTIO_BLK_ID_BYTES } from "@virtmesh/virtio-blk";
import type { BackendSpec } from "./backend";
import { VhostError } from "./errors";
import type { CompletionMode } from "./queue";

/** "VHBS" little-endian: a vhost-blk device state. */
export const DEVICE_STATE_MAGIC = 0x53424856;
export const DEVICE_STATE_VERSION = 1;
const HEADER_BYTES = 12;
/** A state is a few hundred bytes; anything far above is not one. */
export const MAX_DEVICE_STATE_BYTES = 64 * 1024;

/** Everything the ioctls set that a device needs to serve again (host files excluded). */
export interface DeviceSetup {
  features: bigint;
  num: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  /** SET_VRING_ADDR flags (VHOST_VRING_F_LOG) and log_guest_addr. */
  addrFlags: number;
  logGuestAddr: number;
  /** last_avail_idx: what GET_VRING_BASE returned (or SET_VRING_BASE set). */
  base: number;
  backend: BackendSpec;
  mode: CompletionMode;
  cgroup: string;
  /** The GET_ID serial the guest saw (VIRTIO_BLK_ID_BYTES). */
  serial: Uint8Array;
}

/** Which check refused a device state (LoadDeviceState answers INVALID_ARGUMENT naming it). */
export type DeviceStateFault = "format" | "version" | "checksum";

export class DeviceStateError extends VhostError {
  constructor(
    readonly fault: DeviceStateFault,
    message: string,
  ) {
    super("EINVAL", `device state ${fault}: ${message}`);
  }
}

interface Payload {
  features: string;
  num: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  addrFlags: number;
  logGuestAddr: number;
  base: number;
  backend: BackendSpec;
  mode: CompletionMode;
  cgroup: string;
  serial: string;
}

export function encodeDeviceState(s: DeviceSetup): Uint8Array {
  const p: Payload = {
    features: s.features.toString(16),
    num: s.num,
    descAddr: s.descAddr,
    availAddr: s.availAddr,
    usedAddr: s.usedAddr,
    addrFlags: s.addrFlags,
    logGuestAddr: s.logGuestAddr,
    base: s.base,
    backend: { kind: s.backend.kind, path: s.backend.path, capacityBytes: s.backend.capacityBytes },
    mode: s.mode,
    cgroup: s.cgroup,
    serial: Buffer.from(s.serial).toString("hex"),
  };
  const json = Buffer.from(JSON.stringify(p), "utf8");
  const out = new Uint8Array(HEADER_BYTES + json.length + 4);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, DEVICE_STATE_MAGIC, true);
  dv.setUint16(4, DEVICE_STATE_VERSION, true);
  dv.setUint16(6, 0, true);
  dv.setUint32(8, json.length, true);
  out.set(json, HEADER_BYTES);
  dv.setUint32(HEADER_BYTES + json.length, crc32c(out, 0, HEADER_BYTES + json.length), true);
  return out;
}

const isUint = (v: unknown, max = Number.MAX_SAFE_INTEGER): v is number => typeof v === "number" && Number.isSafeInteger(v) && v >= 0 && v <= max;

/** Decodes and checks the framing (magic, version, crc32c) and the payload's shapes; the values are checked by the setters. */
export function decodeDeviceState(bytes: Uint8Array): DeviceSetup {
  if (bytes.length < HEADER_BYTES + 4 || bytes.length > MAX_DEVICE_STATE_BYTES) throw new DeviceStateError("format", `${bytes.length} bytes is not a device state`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const magic = dv.getUint32(0, true);
  if (magic !== DEVICE_STATE_MAGIC) throw new DeviceStateError("format", `magic 0x${magic.toString(16)} is not a vhost-blk device state`);
  const version = dv.getUint16(4, true);
  if (version !== DEVICE_STATE_VERSION) throw new DeviceStateError("version", `unknown version ${version} (this worker reads ${DEVICE_STATE_VERSION})`);
  const len = dv.getUint32(8, true);
  if (HEADER_BYTES + len + 4 !== bytes.length) throw new DeviceStateError("format", `payload length ${len} does not match ${bytes.length} bytes`);
  const stored = dv.getUint32(HEADER_BYTES + len, true);
  const computed = crc32c(bytes, 0, HEADER_BYTES + len);
  if (stored !== computed) throw new DeviceStateError("checksum", `crc32c 0x${stored.toString(16)} stored, 0x${computed.toString(16)} computed`);
  let p: Partial<Payload>;
  try {
    p = JSON.parse(Buffer.from(bytes.subarray(HEADER_BYTES, HEADER_BYTES + len)).toString("utf8")) as Partial<Payload>;
  } catch {
    throw new DeviceStateError("format", "payload is not JSON");
  }
  const bad = (field: string): never => {
    throw new DeviceStateError("format", `field ${field} is missing or malformed`);
  };
  if (typeof p !== "object" || p === null) bad("payload");
  if (typeof p.features !== "string" || !/^[0-9a-f]{1,16}$/.test(p.features)) bad("features");
  for (const k of ["num", "descAddr", "availAddr", "usedAddr", "addrFlags", "logGuestAddr", "base"] as const) if (!isUint(p[k])) bad(k);
  const b = p.backend;
  if (typeof b !== "object" || b === null || !["file", "null", "memory"].includes(b.kind) || typeof b.path !== "string" || !isUint(b.capacityBytes)) bad("backend");
  if (p.mode !== "parallel" && p.mode !== "serialized") bad("mode");
  if (typeof p.cgroup !== "string") bad("cgroup");
  if (typeof p.serial !== "string" || !new RegExp(`^[0-9a-f]{${2 * VIRTIO_BLK_ID_BYTES}}$`).test(p.serial)) bad("serial");
  const q = p as Payload;
  return {
    features: BigInt(`0x${q.features}`),
    num: q.num,
    descAddr: q.descAddr,
    availAddr: q.availAddr,
    usedAddr: q.usedAddr,
    addrFlags: q.addrFlags,
    logGuestAddr: q.logGuestAddr,
    base: q.base,
    backend: { kind: q.backend.kind, path: q.backend.path, capacityBytes: q.backend.capacityBytes },
    mode: q.mode,
    cgroup: q.cgroup,
    serial: Uint8Array.from(Buffer.from(q.serial, "hex")),
  };
}

/** This host's files for a device: they never travel in the device state. */
export interface HostFiles {
  kickPath: string;
  callPath: string;
  logPath: string;
}

/** The setters a device state is applied through (VhostBlkDevice). */
export interface DeviceSetters {
  setFeatures(f: bigint): void;
  setVringNum(num: number): void;
  setVringAddr(desc: number, avail: number, used: number, flags: number, logGuestAddr: number): void;
  setVringBase(num: number): void;
  setVringKick(path: string): void;
  setVringCall(path: string): void;
  setLogBase(path: string): void;
}

/**
 * The ioctl sequence a VMM runs to start a device (SET_FEATURES, SET_VRING_NUM / ADDR /
 * BASE, KICK, CALL, LOG_BASE), each with its own checks. BLK_SET_BACKEND is the caller's
 * (it opens the backend through the one factory).
 */
export function applySetup(dev: DeviceSetters, s: DeviceSetup, files: HostFiles): void {
  dev.setFeatures(s.features);
  dev.setVringNum(s.num);
  dev.setVringAddr(s.descAddr, s.availAddr, s.usedAddr, s.addrFlags, s.logGuestAddr);
  dev.setVringBase(s.base);
  if (!files.kickPath) throw new VhostError("EFAULT", "no kick doorbell (kick_path is required)");
  dev.setVringKick(files.kickPath);
  if (files.callPath) dev.setVringCall(files.callPath);
  if (files.logPath) dev.setLogBase(files.logPath);
}

/** `<shmDir>/vhost-blk.<vm>.<device>.dev.json`: what a restarted worker needs to serve the device again. */
export function deviceStateFileName(vm: string, device: string): string {
  return `vhost-blk.${vm}.${device}.dev.json`;
}

export interface PersistedDevice extends HostFiles {
  vm: string;
  device: string;
  memoryPath: string;
  memoryBytes: number;
  setup: DeviceSetup;
}

interface StateFile extends HostFiles {
  vm: string;
  device: string;
  memoryPath: string;
  memoryBytes: number;
  /** base64 of encodeDeviceState(setup). */
  state: string;
}

/** Writes the state file atomically (a crash leaves the old one or the new one). */
export function writeStateFile(path: string, d: PersistedDevice): void {
  const f: StateFile = { vm: d.vm, device: d.device, memoryPath: d.memoryPath, memoryBytes: d.memoryBytes, kickPath: d.kickPath, callPath: d.callPath, logPath: d.logPath, state: Buffer.from(encodeDeviceState(d.setup)).toString("base64") };
  const tmp = `${path}.tmp`;
  writeFileSync(tmp, JSON.stringify(f), { mode: 0o600 });
  renameSync(tmp, path);
}

/** Reads and checks a state file (its device state through decodeDeviceState). */
export function readStateFile(path: string): PersistedDevice {
  const f = JSON.parse(readFileSync(path, "utf8")) as Partial<StateFile>;
  for (const k of ["vm", "device", "memoryPath", "kickPath", "callPath", "logPath", "state"] as const) {
    if (typeof f[k] !== "string") throw new Error(`state file ${path}: field ${k} is missing`);
  }
  if (!isUint(f.memoryBytes)) throw new Error(`state file ${path}: field memoryBytes is missing`);
  const s = f as StateFile;
  return { vm: s.vm, device: s.device, memoryPath: s.memoryPath, memoryBytes: s.memoryBytes, kickPath: s.kickPath, callPath: s.callPath, logPath: s.logPath, setup: decodeDeviceState(Uint8Array.from(Buffer.from(s.state, "base64"))) };
}
