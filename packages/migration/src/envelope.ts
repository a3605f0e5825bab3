// The device-state envelope: everything of a VM that lives outside guest memory
// (virtqueues through vhost-worker, the balloon, VFIO mappings, the guest kernel's own
// state, its workloads) travels as named sections in one versioned, checksummed blob,
// as QEMU's vmstate stream does (migration/savevm.c: QEMU_VM_FILE_MAGIC, a version the
// destination checks, then one section per device). The destination refuses a version
// it does not know and any checksum that does not match, and says which.
//
// Layout, little-endian:
//   magic "VMST" (4) | version u16 | flags u16 (0) | section count u32
//   per section: name length u8 | name (ASCII) | data length u32 | crc32c(data) u32 | data
//   crc32c of everything above u32
import { crc32c } from "./crc32c";

export const DEVICE_STATE_MAGIC = 0x54534d56; // "VMST" read as a little-endian u32
export const DEVICE_STATE_VERSION = 1;
/** The versions this build can decode. */
export const DEVICE_STATE_VERSIONS: readonly number[] = [1];

const HEADER_BYTES = 12;
const TRAILER_BYTES = 4;
const SECTION_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/;

export type DeviceStateErrorKind =
  | "truncated"
  | "bad-magic"
  | "bad-checksum"
  | "unknown-version"
  | "bad-section-checksum"
  | "malformed"
  | "duplicate-section"
  | "missing-section";

/** Why a device-state envelope was refused; `section` names the section at fault. */
export class DeviceStateError extends Error {
  override readonly name = "DeviceStateError";
  constructor(
    readonly kind: DeviceStateErrorKind,
    message: string,
    readonly section?: string,
    readonly version?: number,
  ) {
    super(message);
  }
}

export interface DeviceStateSection {
  name: string;
  data: Uint8Array;
}

/** A decoded envelope. Section data are views into the decoded buffer (no copy). */
export class DeviceState {
  constructor(
    readonly version: number,
    readonly sections: ReadonlyMap<string, Uint8Array>,
  ) {}

  has(name: string): boolean {
    return this.sections.has(name);
  }

  /** The section's bytes; throws DeviceStateError("missing-section") when absent. */
  get(name: string): Uint8Array {
    const d = this.sections.get(name);
    if (!d) throw new DeviceStateError("missing-section", `device state has no section '${name}' (has: ${[...this.sections.keys()].join(", ") || "none"})`, name, this.version);
    return d;
  }

  names(): string[] {
    return [...this.sections.keys()];
  }
}

export type DeviceStateInput = Iterable<DeviceStateSection> | ReadonlyMap<string, Uint8Array> | Readonly<Record<string, Uint8Array>>;

function toSections(input: DeviceStateInput): DeviceStateSection[] {
  if (input instanceof Map) return [...(input as ReadonlyMap<string, Uint8Array>)].map(([name, data]) => ({ name, data }));
  if (Symbol.iterator in input) return [...(input as Iterable<DeviceStateSection>)];
  return Object.entries(input as Record<string, Uint8Array>).map(([name, data]) => ({ name, data }));
}

/** Serializes sections, in the order given, into one envelope. */
export function encodeDeviceState(
  input: DeviceStateInput,
  version: number = DEVICE_STATE_VERSION,
): Uint8Array {
  if (!Number.isInteger(version) || version < 0 || version > 0xffff) throw new RangeError(`device-state version ${version} is not a u16`);
  const sections = toSections(input);
  const seen = new Set<string>();
  let size = HEADER_BYTES + TRAILER_BYTES;
  for (const s of sections) {
    if (!SECTION_NAME_RE.test(s.name)) throw new RangeError(`device-state section name ${JSON.stringify(s.name)} is not 1-128 of [A-Za-z0-9._:/-]`);
    if (seen.has(s.name)) throw new RangeError(`device-state section '${s.name}' given twice`);
    if (s.data.length > 0xffffffff) throw new RangeError(`device-state section '${s.name}' is over 4 GiB`);
    seen.add(s.name);
    size += 1 + s.name.length + 8 + s.data.length;
  }
  const out = new Uint8Array(size);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, DEVICE_STATE_MAGIC, true);
  dv.setUint16(4, version, true);
  dv.setUint16(6, 0, true);
  dv.setUint32(8, sections.length, true);
  let o = HEADER_BYTES;
  for (const s of sections) {
    out[o++] = s.name.length;
    for (let i = 0; i < s.name.length; i++) out[o++] = s.name.charCodeAt(i);
    dv.setUint32(o, s.data.length, true);
    dv.setUint32(o + 4, crc32c(s.data), true);
    o += 8;
    out.set(s.data, o);
    o += s.data.length;
  }
  dv.setUint32(o, crc32c(out, 0, o), true);
  return out;
}

export interface DecodeOptions {
  /** Versions accepted; default DEVICE_STATE_VERSIONS. */
  versions?: readonly number[];
}

/**
 * Decodes and checks an envelope that crossed a boundary: magic, the overall crc32c,
 * the version, then every section's bounds, name and crc32c. Throws DeviceStateError
 * naming what was wrong (and the section, for a section's fault).
 */
export function decodeDeviceState(bytes: Uint8Array, opts: DecodeOptions = {}): DeviceState {
  const versions = opts.versions ?? DEVICE_STATE_VERSIONS;
  if (bytes.length < HEADER_BYTES + TRAILER_BYTES) {
    throw new DeviceStateError("truncated", `device state is ${bytes.length} bytes, shorter than its ${HEADER_BYTES + TRAILER_BYTES}-byte header and trailer`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const magic = dv.getUint32(0, true);
  if (magic !== DEVICE_STATE_MAGIC) throw new DeviceStateError("bad-magic", `device state has magic 0x${magic.toString(16).padStart(8, "0")}, not "VMST"`);
  const bodyEnd = bytes.length - TRAILER_BYTES;
  const want = dv.getUint32(bodyEnd, true);
  const got = crc32c(bytes, 0, bodyEnd);
  if (want !== got) {
    throw new DeviceStateError("bad-checksum", `device state checksum mismatch: crc32c 0x${got.toString(16).padStart(8, "0")}, envelope says 0x${want.toString(16).padStart(8, "0")}`);
  }
  // The version is checked after the overall checksum: a corrupted version field is a bad
  // checksum, a well-formed envelope from another build is an unknown version.
  const version = dv.getUint16(4, true);
  if (!versions.includes(version)) {
    throw new DeviceStateError("unknown-version", `device state version ${version} is not one this build knows (${versions.join(", ")})`, undefined, version);
  }
  const count = dv.getUint32(8, true);
  const sections = new Map<string, Uint8Array>();
  let o = HEADER_BYTES;
  for (let k = 0; k < count; k++) {
    if (o + 1 > bodyEnd) throw new DeviceStateError("truncated", `device state ends before section ${k} of ${count}`, undefined, version);
    const nameLen = bytes[o]!;
    if (o + 1 + nameLen + 8 > bodyEnd) throw new DeviceStateError("truncated", `device state ends inside section ${k}'s header`, undefined, version);
    let name = "";
    for (let i = 0; i < nameLen; i++) name += String.fromCharCode(bytes[o + 1 + i]!);
    if (!SECTION_NAME_RE.test(name)) throw new DeviceStateError("malformed", `device state section ${k} has an invalid name ${JSON.stringify(name)}`, undefined, version);
    o += 1 + nameLen;
    const len = dv.getUint32(o, true);
    const crc = dv.getUint32(o + 4, true);
    o += 8;
    if (len > bodyEnd - o) throw new DeviceStateError("truncated", `device state section '${name}' says ${len} bytes, ${bodyEnd - o} remain`, name, version);
    const data = bytes.subarray(o, o + len);
    if (crc32c(data) !== crc) throw new DeviceStateError("bad-section-checksum", `device state section '${name}' fails its crc32c`, name, version);
    if (sections.has(name)) throw new DeviceStateError("duplicate-section", `device state has section '${name}' twice`, name, version);
    sections.set(name, data);
    o += len;
  }
  if (o !== bodyEnd) throw new DeviceStateError("malformed", `device state has ${bodyEnd - o} bytes after its ${count} sections`, undefined, version);
  return new DeviceState(version, sections);
}
