import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { DEVICE_STATE_VERSION as ENVELOPE_VERSION } from "@virtmesh/migration";
import { decodeEnvelope, encodeEnvelope, EnvelopeError } from "./migrate";

test("envelope round trip keeps every section", () => {
  fc.assert(
    fc.property(fc.dictionary(fc.stringMatching(/^[a-z0-9][a-z0-9.-]{0,19}$/), fc.uint8Array({ maxLength: 300 })), (d) => {
      const m = new Map(Object.entries(d));
      const out = decodeEnvelope(encodeEnvelope(m));
      assert.deepEqual([...out.keys()], [...m.keys()]);
      for (const [k, v] of m) assert.deepEqual(Buffer.from(out.get(k)!), Buffer.from(v));
    }),
  );
});

test("a flipped bit, a truncation or an unknown version is refused", () => {
  const e = encodeEnvelope(new Map([["guest", new Uint8Array([1, 2, 3])], ["guest.kernel", new Uint8Array(100).fill(7)]]));
  fc.assert(
    fc.property(fc.integer({ min: 0, max: e.length * 8 - 1 }), (b) => {
      const x = new Uint8Array(e);
      x[b >> 3]! ^= 1 << (b & 7);
      assert.throws(() => decodeEnvelope(x), EnvelopeError);
    }),
  );
  for (let n = 0; n < e.length; n += 7) assert.throws(() => decodeEnvelope(e.subarray(0, n)), EnvelopeError);
  assert.throws(() => decodeEnvelope(encodeEnvelope(new Map(), ENVELOPE_VERSION + 1)), /version/);
});
