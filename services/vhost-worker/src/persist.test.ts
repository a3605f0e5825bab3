// The device-state encoding alone: round trip, and each refusal names what it checked.
import { test } from "node:test";
import assert from "node:assert/strict";
import { DEVICE_STATE_VERSION, DeviceStateError, applySetup, decodeDeviceState, encodeDeviceState, type DeviceSetup } from "./persist";

const setup: DeviceSetup = {
  features: (1n << 32n) | (1n << 26n),
  num: 256,
  descAddr: 0x10000,
  availAddr: 0x11000,
  usedAddr: 0x12000,
  addrFlags: 1,
  logGuestAddr: 0,
  base: 65535,
  backend: { kind: "file", path: "/srv/disks/vm1.img", capacityBytes: 1 << 30 },
  mode: "parallel",
  cgroup: "/vm1",
  serial: new Uint8Array(20).fill(0x42),
};

const fault = (bytes: Uint8Array): string => {
  try {
    decodeDeviceState(bytes);
  } catch (e) {
    assert.ok(e instanceof DeviceStateError);
    return e.fault;
  }
  assert.fail("accepted");
};

test("round trip keeps every field", () => {
  assert.deepEqual(decodeDeviceState(encodeDeviceState(setup)), setup);
});

test("a flipped payload bit is a checksum fault, another version a version fault, garbage a format fault", () => {
  const good = encodeDeviceState(setup);
  for (let i = 12; i < good.length; i += 7) {
    const b = good.slice();
    b[i]! ^= 0x10;
    assert.equal(fault(b), "checksum", `byte ${i}`);
  }
  const v = good.slice();
  new DataView(v.buffer).setUint16(4, DEVICE_STATE_VERSION + 1, true);
  assert.equal(fault(v), "version");
  assert.equal(fault(new Uint8Array(8)), "format");
  assert.equal(fault(good.subarray(0, good.length - 1)), "format");
});

test("applySetup runs the setters in the ioctl order with this host's files", () => {
  const calls: string[] = [];
  applySetup(
    {
      setFeatures: () => calls.push("features"),
      setVringNum: () => calls.push("num"),
      setVringAddr: () => calls.push("addr"),
      setVringBase: (n) => calls.push(`base ${n}`),
      setVringKick: (p) => calls.push(`kick ${p}`),
      setVringCall: (p) => calls.push(`call ${p}`),
      setLogBase: (p) => calls.push(`log ${p}`),
    },
    setup,
    { kickPath: "/k", callPath: "/c", logPath: "/l" },
  );
  assert.deepEqual(calls, ["features", "num", "addr", "base 65535", "kick /k", "call /c", "log /l"]);
});
