import { test } from "node:test";
import assert from "node:assert/strict";
import { IobandDevice } from "./device";
import type { IobandRequest } from "./group";
import {
  addIobandDevice,
  attachVmDevice,
  createCgroup,
  createIobandControl,
  listCgroups,
  readDevices,
  readSettings,
  removeCgroup,
  writeDevices,
  writeSettings,
  type IobandChangeEvent,
  type IobandControlContext,
} from "./control";
import type { ControlErrorCode, ControlResult } from "./result";

function setup() {
  const events: IobandChangeEvent[] = [];
  const ctx = createIobandControl({ onChange: (e) => events.push(e) });
  const w = new IobandDevice<IobandRequest>({ name: "share1", policy: "weight", clock: () => 0 });
  w.addHead("ioband1");
  w.addHead("ioband2");
  const r = new IobandDevice<IobandRequest>({ name: "share2", policy: "range-bw", clock: () => 0 });
  r.addHead("ioband3");
  assert.ok(addIobandDevice(ctx, w).ok);
  assert.ok(addIobandDevice(ctx, r).ok);
  const vm1 = createCgroup(ctx, "/vm1");
  const vm2 = createCgroup(ctx, "/vm2");
  assert.ok(vm1.ok && vm2.ok);
  events.length = 0;
  return { ctx, events, w, r };
}

function err(res: ControlResult, code: ControlErrorCode): void {
  assert.equal(res.ok, false, `expected ${code}, got ok`);
  if (!res.ok) {
    assert.equal(res.code, code, res.message);
    assert.ok(res.message.length > 0);
  }
}

function text(res: ControlResult): string {
  assert.ok(res.ok, res.ok ? "" : res.message);
  return res.ok ? (res.text ?? "") : "";
}

test("devices read: '%s policy=%s io_throttle=%d io_limit=%d' [+ ' token=%d carryover=%d'], then '  %s' per device", () => {
  const { ctx } = setup();
  assert.equal(
    text(readDevices(ctx)),
    "share1 policy=weight io_throttle=4 io_limit=128 token=512 carryover=4\n  ioband1\n  ioband2\nshare2 policy=range-bw io_throttle=4 io_limit=128\n  ioband3\n",
  );
});

test("settings read: '<device> weight=N' / '<device> range-bw=min:max' for each device the cgroup is on; the root is on all", () => {
  const { ctx } = setup();
  assert.equal(text(readSettings(ctx, "/")), "ioband1 weight=100\nioband2 weight=100\nioband3 range-bw=0:0\n");
  assert.equal(text(readSettings(ctx, "/vm1")), "");
  assert.ok(writeSettings(ctx, "/vm1", "ioband1 40").ok);
  assert.ok(writeSettings(ctx, "/vm1", "ioband3 100:200").ok);
  assert.equal(text(readSettings(ctx, "/vm1")), "ioband1 weight=40\nioband3 range-bw=100:200\n");
  err(readSettings(ctx, "/nope"), "NOT_FOUND");
});

test("devices write from a non-root cgroup: PERMISSION_DENIED, checked before the line is parsed", () => {
  const { ctx, events } = setup();
  err(writeDevices(ctx, "/vm1", "share1 io_throttle 8"), "PERMISSION_DENIED");
  err(writeDevices(ctx, "/vm1", ""), "PERMISSION_DENIED");
  err(writeDevices(ctx, "/vm1", "nosuch x y"), "PERMISSION_DENIED");
  assert.equal(events.length, 0);
});

test("devices write: unknown share or device name -> NOT_FOUND; no arguments -> INVALID_ARGUMENT", () => {
  const { ctx } = setup();
  err(writeDevices(ctx, "/", "nosuch io_throttle 8"), "NOT_FOUND");
  err(writeDevices(ctx, "/", ""), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "   \t "), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/nope", "share1 io_throttle 8"), "NOT_FOUND");
});

test("devices write: __ioband_message argument checks", () => {
  const { ctx, w, events } = setup();
  // argc != 2 after the name ("Unrecognised band message received.")
  err(writeDevices(ctx, "/", "share1"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 io_throttle"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 io_throttle 8 9"), "INVALID_ARGUMENT");
  // io_throttle: strict_strtol, 0..SHORT_MAX, not above io_limit
  err(writeDevices(ctx, "/", "share1 io_throttle 8x"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 io_throttle -1"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 io_throttle 32768"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 io_throttle 129"), "INVALID_ARGUMENT");
  // io_limit: 0..SHORT_MAX, not below io_throttle
  assert.ok(writeDevices(ctx, "/", "share1 io_throttle 16").ok);
  err(writeDevices(ctx, "/", "share1 io_limit 15"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 io_limit 32768"), "INVALID_ARGUMENT");
  // unknown command, bad policy, unknown group id in "<id>:<value>"
  err(writeDevices(ctx, "/", "share1 bogus 1"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 policy fifo"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 weight 99:50"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 weight 0"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 token 0"), "INVALID_ARGUMENT");
  err(writeDevices(ctx, "/", "share1 type pid"), "INVALID_ARGUMENT");
  // attach of an id that is no cgroup
  err(writeDevices(ctx, "/", "share1 attach 77"), "NOT_FOUND");
  assert.equal(w.ioThrottle, 16);
  assert.equal(events.length, 1);
});

test("devices write: accepted commands change the device and emit one event each", () => {
  const { ctx, w, r, events } = setup();
  assert.ok(writeDevices(ctx, "/", "share1 io_limit 256").ok);
  assert.ok(writeDevices(ctx, "/", "ioband2 io_throttle 0").ok); // by device name; 0 = DEFAULT_IO_THROTTLE
  assert.equal(w.ioThrottle, 4);
  assert.ok(writeDevices(ctx, "/", "share1 token 8192").ok);
  assert.ok(writeDevices(ctx, "/", "share1 weight 300").ok); // the head group of ioband1
  assert.ok(writeSettings(ctx, "/vm1", "ioband1 40").ok);
  assert.ok(writeDevices(ctx, "/", "share1 weight 2:50").ok); // group id 2 = /vm1
  assert.ok(writeDevices(ctx, "/", "share2 io_limit 0").ok); // 3 * nr_requests / 2
  assert.equal(r.ioLimit, 192);
  assert.equal(
    text(readDevices(ctx)),
    "share1 policy=weight io_throttle=4 io_limit=256 token=1024 carryover=8\n  ioband1\n  ioband2\nshare2 policy=range-bw io_throttle=4 io_limit=192\n  ioband3\n",
  );
  assert.equal(text(readSettings(ctx, "/")), "ioband1 weight=300\nioband2 weight=100\nioband3 range-bw=0:0\n");
  assert.equal(text(readSettings(ctx, "/vm1")), "ioband1 weight=50\n");
  assert.equal(events.filter((e) => e.kind === "device").length, 6);
  assert.deepEqual(events[0], { kind: "device", device: "share1", head: "ioband1", argv: ["io_limit", "256"] });
  assert.ok(writeDevices(ctx, "/", "share1 policy range-bw").ok);
  assert.equal(text(readSettings(ctx, "/vm1")), "ioband1 range-bw=0:0\n");
});

test("settings write: argument count, device name, root detach", () => {
  const { ctx } = setup();
  err(writeSettings(ctx, "/vm1", ""), "INVALID_ARGUMENT");
  err(writeSettings(ctx, "/vm1", "ioband1 40 extra"), "INVALID_ARGUMENT");
  err(writeSettings(ctx, "/vm1", "share1 40"), "NOT_FOUND"); // a share name is not a device name here
  err(writeSettings(ctx, "/vm1", "nosuch 40"), "NOT_FOUND");
  err(writeSettings(ctx, "/", "ioband1"), "INVALID_ARGUMENT"); // the root cannot detach
  err(writeSettings(ctx, "/vm1", "ioband1"), "INVALID_ARGUMENT"); // not attached: ioband_group_detach -EINVAL
  err(writeSettings(ctx, "/nope", "ioband1 40"), "NOT_FOUND");
  err(writeSettings(ctx, "/vm1", "ioband1 " + "9".repeat(5000)), "INVALID_ARGUMENT");
});

test("settings write: weight must be 1..32767 (strict_strtol, base 0)", () => {
  const { ctx } = setup();
  for (const bad of ["0", "32768", "-1", "abc", "4x", "+5", "1.5", "0x"]) err(writeSettings(ctx, "/vm1", `ioband1 ${bad}`), "INVALID_ARGUMENT");
  assert.equal(text(readSettings(ctx, "/vm1")), "", "a refused attach leaves no group behind");
  assert.ok(writeSettings(ctx, "/vm1", "ioband1 1").ok);
  assert.ok(writeSettings(ctx, "/vm1", "ioband1 32767").ok);
  assert.ok(writeSettings(ctx, "/vm2", "ioband1 0x10").ok);
  assert.ok(writeSettings(ctx, "/", "ioband2 010").ok);
  err(writeSettings(ctx, "/vm1", "ioband1 0"), "INVALID_ARGUMENT"); // update path checks the same
  assert.equal(text(readSettings(ctx, "/vm1")), "ioband1 weight=32767\n");
  assert.equal(text(readSettings(ctx, "/vm2")), "ioband1 weight=16\n");
  assert.equal(text(readSettings(ctx, "/")), "ioband1 weight=100\nioband2 weight=8\nioband3 range-bw=0:0\n");
});

test("settings write: range-bw 0 <= min <= max <= INT_MAX/2", () => {
  const { ctx } = setup();
  for (const bad of ["5", "10:5", "-1:5", "0:-1", "0:1073741824", "1073741824:1073741824", ":5", "5:", "5:6:7", "a:b", "5;6"]) {
    err(writeSettings(ctx, "/vm1", `ioband3 ${bad}`), "INVALID_ARGUMENT");
  }
  assert.ok(writeSettings(ctx, "/vm1", "ioband3 0:1073741823").ok);
  assert.ok(writeSettings(ctx, "/vm1", "ioband3 5,5").ok);
  assert.ok(writeSettings(ctx, "/vm2", "ioband3 1=0x10").ok);
  assert.equal(text(readSettings(ctx, "/vm1")), "ioband3 range-bw=5:5\n");
  assert.equal(text(readSettings(ctx, "/vm2")), "ioband3 range-bw=1:16\n");
});

test("settings write: attach, update, detach emit events; detach removes the line", () => {
  const { ctx, events } = setup();
  assert.ok(writeSettings(ctx, "/vm1", "ioband1 40").ok);
  assert.ok(writeSettings(ctx, "/vm1", "ioband1 60").ok);
  assert.ok(writeSettings(ctx, "/vm1", "ioband1").ok);
  assert.deepEqual(
    events.map((e) => (e.kind === "settings" ? `${e.action}:${e.head}:${e.cgroup}:${e.value}` : e.kind)),
    ["attach:ioband1:/vm1:40", "update:ioband1:/vm1:60", "detach:ioband1:/vm1:null"],
  );
  assert.equal(text(readSettings(ctx, "/vm1")), "");
});

test("removing a cgroup detaches it from every device (ioband_cgroup_remove_group)", () => {
  const { ctx, w, r, events } = setup();
  assert.ok(writeSettings(ctx, "/vm1", "ioband1 40").ok);
  assert.ok(writeSettings(ctx, "/vm1", "ioband2 20").ok);
  assert.ok(writeSettings(ctx, "/vm1", "ioband3 10:20").ok);
  events.length = 0;
  assert.ok(removeCgroup(ctx, "/vm1").ok);
  assert.equal(w.groups.length, 2);
  assert.equal(r.groups.length, 1);
  assert.equal((w.policy as unknown as { weightTotal: number }).weightTotal, 200);
  assert.deepEqual(
    events.map((e) => `${e.kind}:${"action" in e ? e.action : ""}`),
    ["settings:detach", "settings:detach", "settings:detach", "cgroup:remove"],
  );
  err(readSettings(ctx, "/vm1"), "NOT_FOUND");
  err(removeCgroup(ctx, "/"), "INVALID_ARGUMENT");
  err(removeCgroup(ctx, "/vm1"), "NOT_FOUND");
});

test("cgroups: create/list/attach VM devices; a cgroup holding a VM device cannot be removed", () => {
  const { ctx } = setup();
  const sub = createCgroup(ctx, "/vm1/disk");
  assert.ok(sub.ok && sub.id === 4 && sub.path === "/vm1/disk");
  assert.deepEqual(listCgroups(ctx), [
    { path: "/", id: 1 },
    { path: "/vm1", id: 2 },
    { path: "/vm2", id: 3 },
    { path: "/vm1/disk", id: 4 },
  ]);
  err(createCgroup(ctx, "/missing/child"), "NOT_FOUND");
  err(createCgroup(ctx, "/vm1"), "INVALID_ARGUMENT");
  err(createCgroup(ctx, "relative"), "INVALID_ARGUMENT");
  err(createCgroup(ctx, "/a b"), "INVALID_ARGUMENT");
  err(removeCgroup(ctx, "/vm1"), "FAILED_PRECONDITION"); // has a child
  assert.ok(attachVmDevice(ctx, "vm2", "vda", "/vm2").ok);
  assert.equal(ctx.cgroups.cgroupIdOf("vm2", "vda"), 3);
  assert.equal(ctx.cgroups.cgroupIdOf("vm9", "vda"), 1);
  err(attachVmDevice(ctx, "vm2", "vda", "/nope"), "NOT_FOUND");
  err(removeCgroup(ctx, "/vm2"), "FAILED_PRECONDITION");
  assert.ok(attachVmDevice(ctx, "vm2", "vda", "/").ok); // moved
  assert.ok(removeCgroup(ctx, "/vm2").ok);
  // The idr hands the lowest free id out again.
  const again = createCgroup(ctx, "/vm3");
  assert.ok(again.ok && again.id === 3);
});

test("a request of an attached cgroup is scheduled in its group; others fall to the root group", () => {
  const { ctx, w } = setup();
  assert.ok(writeSettings(ctx, "/vm1", "ioband1 40").ok);
  const head = w.head("ioband1")!;
  const vm1Id = ctx.cgroups.lookup("/vm1")!.id;
  w.submit({ bytes: 4096, cgroupId: vm1Id }, head);
  w.submit({ bytes: 4096, cgroupId: 99 }, head);
  assert.equal(head.find(vm1Id)!.dispatchedIos, 1);
  assert.equal(head.defaultGroup.dispatchedIos, 1);
});

test("duplicate share or device names are refused", () => {
  const ctx: IobandControlContext = createIobandControl();
  const a = new IobandDevice<IobandRequest>({ name: "s", policy: "weight", clock: () => 0 });
  a.addHead("d");
  const b = new IobandDevice<IobandRequest>({ name: "t", policy: "weight", clock: () => 0 });
  b.addHead("d");
  assert.ok(addIobandDevice(ctx, a).ok);
  err(addIobandDevice(ctx, b), "INVALID_ARGUMENT");
});

test("devices write attach/detach take a cgroup id in base 0 and must name a live cgroup", () => {
  const { ctx } = setup();
  err(writeDevices(ctx, "/", "share1 attach 010"), "NOT_FOUND"); // 8: no such cgroup
  assert.ok(writeDevices(ctx, "/", "share1 attach 0x2").ok); // /vm1
  assert.equal(text(readSettings(ctx, "/vm1")), "ioband1 weight=100\n");
  err(writeDevices(ctx, "/", "share1 attach 2"), "INVALID_ARGUMENT"); // already attached (EEXIST)
  err(writeDevices(ctx, "/", "share1 detach 1"), "INVALID_ARGUMENT"); // the root group
  assert.ok(writeDevices(ctx, "/", "share1 detach 2").ok);
  assert.equal(text(readSettings(ctx, "/vm1")), "");
});
