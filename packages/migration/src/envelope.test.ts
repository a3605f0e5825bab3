import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { crc32c } from "./crc32c";
import { DEVICE_STATE_VERSION, DeviceStateError, decodeDeviceState, encodeDeviceState } from "./envelope";

const nameArb = fc.stringMatching(/^[a-z0-9][a-z0-9._:/-]{0,20}$/);
const sectionsArb = fc.uniqueArray(fc.record({ name: nameArb, data: fc.uint8Array({ maxLength: 300 }) }), { selector: (s) => s.name, maxLength: 8 });

function refused(fn: () => unknown, kind: string, section?: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof DeviceStateError, `not a DeviceStateError: ${String(e)}`);
    assert.equal(e.kind, kind, e.message);
    if (section !== undefined) assert.equal(e.section, section);
    return true;
  });
}

test("crc32c matches the standard check value and the byte-at-a-time definition", () => {
  assert.equal(crc32c(new TextEncoder().encode("123456789")), 0xe3069283);
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 100 }), fc.nat(100), (b, cut) => {
      let slow = ~0 >>> 0;
      for (const x of b) {
        slow ^= x;
        for (let k = 0; k < 8; k++) slow = slow & 1 ? 0x82f63b78 ^ (slow >>> 1) : slow >>> 1;
      }
      assert.equal(crc32c(b), ~slow >>> 0);
      const c = Math.min(cut, b.length);
      assert.equal(crc32c(b, c, b.length, crc32c(b, 0, c)), crc32c(b));
    }),
  );
});

test("round trip: every section comes back, in order, with its bytes", () => {
  fc.assert(
    fc.property(sectionsArb, (sections) => {
      const st = decodeDeviceState(encodeDeviceState(sections));
      assert.equal(st.version, DEVICE_STATE_VERSION);
      assert.deepEqual(st.names(), sections.map((s) => s.name));
      for (const s of sections) assert.deepEqual(st.get(s.name), s.data);
    }),
  );
});

test("a record and a map encode like the section list", () => {
  const a = new Uint8Array([1, 2, 3]);
  const viaRecord = encodeDeviceState({ "vhost/blk0": a, balloon: new Uint8Array() });
  const viaMap = encodeDeviceState(new Map([["vhost/blk0", a], ["balloon", new Uint8Array()]]));
  assert.deepEqual(viaRecord, viaMap);
  const st = decodeDeviceState(viaRecord);
  assert.deepEqual(st.get("vhost/blk0"), a);
  refused(() => st.get("vfio"), "missing-section", "vfio");
});

test("any single flipped bit is refused (bad checksum, bad section checksum or bad magic)", () => {
  fc.assert(
    fc.property(sectionsArb, fc.nat(), fc.integer({ min: 0, max: 7 }), (sections, at, bit) => {
      const enc = encodeDeviceState(sections);
      const i = at % enc.length;
      enc[i]! ^= 1 << bit;
      assert.throws(
        () => decodeDeviceState(enc),
        (e: unknown) => e instanceof DeviceStateError && ["bad-checksum", "bad-magic"].includes(e.kind),
      );
    }),
  );
});

test("an unknown version with a good checksum is refused as such, naming the version", () => {
  fc.assert(
    fc.property(sectionsArb, fc.integer({ min: 2, max: 0xffff }), (sections, v) => {
      const enc = encodeDeviceState(sections, v);
      assert.throws(
        () => decodeDeviceState(enc),
        (e: unknown) => e instanceof DeviceStateError && e.kind === "unknown-version" && e.version === v && e.message.includes(String(v)),
      );
      assert.equal(decodeDeviceState(enc, { versions: [v] }).version, v);
    }),
  );
});

test("a section whose data was altered (overall crc recomputed) names the section", () => {
  const enc = encodeDeviceState([
    { name: "guest", data: new Uint8Array([9, 9, 9]) },
    { name: "vhost/blk0", data: new Uint8Array([1, 2, 3, 4]) },
  ]);
  // Last section's data sits just before the trailer.
  enc[enc.length - 5]! ^= 0xff;
  new DataView(enc.buffer).setUint32(enc.length - 4, crc32c(enc, 0, enc.length - 4), true);
  refused(() => decodeDeviceState(enc), "bad-section-checksum", "vhost/blk0");
});

test("truncation, bad magic and trailing bytes are refused", () => {
  const enc = encodeDeviceState([{ name: "a", data: new Uint8Array(10) }]);
  refused(() => decodeDeviceState(enc.subarray(0, 8)), "truncated");
  const bad = enc.slice();
  bad[0] = 0;
  refused(() => decodeDeviceState(bad), "bad-magic");
  // A section length pointing past the end, with a recomputed crc.
  const lie = enc.slice();
  const dv = new DataView(lie.buffer);
  dv.setUint32(12 + 1 + 1, 1000, true);
  dv.setUint32(lie.length - 4, crc32c(lie, 0, lie.length - 4), true);
  refused(() => decodeDeviceState(lie), "truncated", "a");
  // One section claimed, two present: bytes left over.
  const two = encodeDeviceState([{ name: "a", data: new Uint8Array(1) }, { name: "b", data: new Uint8Array(1) }]);
  const dv2 = new DataView(two.buffer);
  dv2.setUint32(8, 1, true);
  dv2.setUint32(two.length - 4, crc32c(two, 0, two.length - 4), true);
  refused(() => decodeDeviceState(two), "malformed");
});

test("encode refuses bad names and duplicates", () => {
  assert.throws(() => encodeDeviceState([{ name: "", data: new Uint8Array() }]), RangeError);
  assert.throws(() => encodeDeviceState([{ name: "a b", data: new Uint8Array() }]), RangeError);
  assert.throws(() => encodeDeviceState([{ name: "a", data: new Uint8Array() }, { name: "a", data: new Uint8Array() }]), RangeError);
  assert.throws(() => encodeDeviceState([], 0x10000), RangeError);
});

test("decode of arbitrary bytes never throws anything but DeviceStateError", () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 200 }), (b) => {
      try {
        decodeDeviceState(b);
      } catch (e) {
        assert.ok(e instanceof DeviceStateError);
      }
    }),
  );
});
