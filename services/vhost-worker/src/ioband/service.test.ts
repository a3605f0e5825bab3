// IobandService over a real gRPC server and client on loopback: every control-language
// error of issue 5 comes back as its gRPC status, every field is checked, every change
// is an event. NATS publishing is covered by e2e/ioband.test.ts.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Server, ServerCredentials, credentials, Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";
import { ConfigError } from "@virtmesh/config";
import { ioband } from "@virtmesh/proto";
import { IobandHost, IobandHostError, configureIobandDevices, iobandService, parseIobandDevices, type IobandHostEvent } from "./index";

const events: IobandHostEvent[] = [];
const host = new IobandHost({ publish: (e) => events.push(e), clock: () => 0 });
let server: Server;
let client: ioband.IobandServiceClient;

before(async () => {
  configureIobandDevices(host, "ioband1:weight,ioband2:weight@ioband1,ioband3:range-bw");
  server = new Server();
  server.addService(ioband.IobandServiceService, iobandService(host));
  const port = await new Promise<number>((res, rej) => server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
  client = new ioband.IobandServiceClient(`127.0.0.1:${port}`, credentials.createInsecure());
});

after(async () => {
  client.close();
  await new Promise<void>((res) => server.tryShutdown(() => res()));
});

type Method<Req, Res> = (req: Req, md: Metadata, opts: { deadline: number }, cb: (e: ServiceError | null, r?: Res) => void) => unknown;

function call<Req, Res>(m: Method<Req, Res>, req: Req): Promise<Res> {
  return new Promise((res, rej) => m.call(client, req, new Metadata(), { deadline: Date.now() + 5000 }, (e, r) => (e ? rej(e) : res(r!))));
}

async function fails<Req, Res>(m: Method<Req, Res>, req: Req, code: Status, re?: RegExp): Promise<void> {
  await assert.rejects(call(m, req), (e: ServiceError) => {
    assert.equal(e.code, code, `${Status[e.code]}: ${e.details}`);
    assert.ok(e.details.length > 0);
    if (re) assert.match(e.details, re);
    return true;
  });
}

const c = () => client;

test("devices read: share line with policy, io_throttle, io_limit (+ token/carryover for weight), then its devices", async () => {
  const r = await call(c().readDevices, { cgroup: "/" });
  assert.equal(r.text, "ioband1 policy=weight io_throttle=4 io_limit=128 token=512 carryover=4\n  ioband1\n  ioband2\nioband3 policy=range-bw io_throttle=4 io_limit=128\n  ioband3\n");
  await fails(c().readDevices, { cgroup: "/nope" }, Status.NOT_FOUND);
});

test("cgroups: create (ids from 2), list, errors", async () => {
  assert.deepEqual(await call(c().createCgroup, { path: "/vm1" }), { path: "/vm1", id: 2 });
  assert.deepEqual(await call(c().createCgroup, { path: "/vm2/" }), { path: "/vm2", id: 3 });
  await fails(c().createCgroup, { path: "/vm1" }, Status.INVALID_ARGUMENT, /already exists/);
  await fails(c().createCgroup, { path: "/missing/child" }, Status.NOT_FOUND);
  await fails(c().createCgroup, { path: "/" }, Status.INVALID_ARGUMENT);
  const list = await call(c().listCgroups, {});
  assert.deepEqual(list.cgroups, [
    { path: "/", id: 1 },
    { path: "/vm1", id: 2 },
    { path: "/vm2", id: 3 },
  ]);
});

test("devices write: only from the root cgroup -> PERMISSION_DENIED", async () => {
  await fails(c().writeDevices, { cgroup: "/vm1", line: "ioband1 io_throttle 8" }, Status.PERMISSION_DENIED, /root cgroup/);
});

test("devices write: unknown share or device -> NOT_FOUND; argument errors -> INVALID_ARGUMENT", async () => {
  await fails(c().writeDevices, { cgroup: "/", line: "nosuch io_throttle 8" }, Status.NOT_FOUND);
  await fails(c().writeDevices, { cgroup: "/", line: "" }, Status.INVALID_ARGUMENT);
  await fails(c().writeDevices, { cgroup: "/", line: "ioband1 io_throttle" }, Status.INVALID_ARGUMENT);
  await fails(c().writeDevices, { cgroup: "/", line: "ioband1 io_throttle 8 9" }, Status.INVALID_ARGUMENT);
  await fails(c().writeDevices, { cgroup: "/", line: "ioband1 io_throttle 32768" }, Status.INVALID_ARGUMENT);
  await fails(c().writeDevices, { cgroup: "/", line: "ioband1 io_limit 2" }, Status.INVALID_ARGUMENT);
  await fails(c().writeDevices, { cgroup: "/", line: "ioband1 bogus 1" }, Status.INVALID_ARGUMENT);
  await fails(c().writeDevices, { cgroup: "/", line: "ioband1 attach 77" }, Status.NOT_FOUND);
  await fails(c().writeDevices, { cgroup: "/nope", line: "ioband1 io_throttle 8" }, Status.NOT_FOUND);
});

test("devices write: accepted by share name and by device name", async () => {
  events.length = 0;
  await call(c().writeDevices, { cgroup: "/", line: "ioband1 io_throttle 8" });
  await call(c().writeDevices, { cgroup: "/", line: "ioband3 io_limit 64" });
  const r = await call(c().readDevices, { cgroup: "/vm1" });
  assert.match(r.text, /^ioband1 policy=weight io_throttle=8 io_limit=128 /);
  assert.match(r.text, /\nioband3 policy=range-bw io_throttle=4 io_limit=64\n/);
  assert.deepEqual(events, [
    { kind: "device", device: "ioband1", head: "ioband1", argv: ["io_throttle", "8"] },
    { kind: "device", device: "ioband3", head: "ioband3", argv: ["io_limit", "64"] },
  ]);
});

test("settings read and write: weight=N, range-bw=min:max; attach, update, detach", async () => {
  assert.equal((await call(c().readSettings, { cgroup: "/" })).text, "ioband1 weight=100\nioband2 weight=100\nioband3 range-bw=0:0\n");
  assert.equal((await call(c().readSettings, { cgroup: "/vm1" })).text, "");
  events.length = 0;
  await call(c().writeSettings, { cgroup: "/vm1", line: "ioband1 40" });
  await call(c().writeSettings, { cgroup: "/vm1", line: "ioband1 60" });
  await call(c().writeSettings, { cgroup: "/vm1", line: "ioband3 100:200" });
  assert.equal((await call(c().readSettings, { cgroup: "/vm1" })).text, "ioband1 weight=60\nioband3 range-bw=100:200\n");
  await call(c().writeSettings, { cgroup: "/vm1", line: "ioband3" });
  assert.equal((await call(c().readSettings, { cgroup: "/vm1" })).text, "ioband1 weight=60\n");
  assert.deepEqual(
    events.map((e) => (e.kind === "settings" ? `${e.action} ${e.head} ${e.cgroup} ${e.value}` : e.kind)),
    ["attach ioband1 /vm1 40", "update ioband1 /vm1 60", "attach ioband3 /vm1 100:200", "detach ioband3 /vm1 null"],
  );
});

test("settings write errors: argument count, unknown device, root detach, weight and range-bw bounds", async () => {
  const bad = (cgroup: string, line: string, code: Status) => fails(c().writeSettings, { cgroup, line }, code);
  await bad("/vm2", "", Status.INVALID_ARGUMENT);
  await bad("/vm2", "ioband1 40 50", Status.INVALID_ARGUMENT);
  await bad("/vm2", "nosuch 40", Status.NOT_FOUND);
  await bad("/nope", "ioband1 40", Status.NOT_FOUND);
  await bad("/", "ioband1", Status.INVALID_ARGUMENT);
  await bad("/vm2", "ioband1", Status.INVALID_ARGUMENT); // not attached
  for (const w of ["0", "32768", "-1", "abc", "4x"]) await bad("/vm2", `ioband1 ${w}`, Status.INVALID_ARGUMENT);
  for (const r of ["5", "10:5", "-1:5", "0:1073741824", ":5", "a:b"]) await bad("/vm2", `ioband3 ${r}`, Status.INVALID_ARGUMENT);
  await call(c().writeSettings, { cgroup: "/vm2", line: "ioband1 32767" });
  await call(c().writeSettings, { cgroup: "/vm2", line: "ioband3 0:1073741823" });
  assert.equal((await call(c().readSettings, { cgroup: "/vm2" })).text, "ioband1 weight=32767\nioband3 range-bw=0:1073741823\n");
});

test("every field is checked before the control language sees it", async () => {
  const inv = Status.INVALID_ARGUMENT;
  await fails(c().readDevices, { cgroup: "" }, inv, /required/);
  await fails(c().readSettings, { cgroup: "vm1" }, inv, /not a cgroup path/);
  await fails(c().readSettings, { cgroup: "/vm1/../x" }, inv);
  await fails(c().writeSettings, { cgroup: "/a b", line: "ioband1 1" }, inv);
  await fails(c().writeSettings, { cgroup: "/" + "a".repeat(5000), line: "ioband1 1" }, inv, /longer than 4096/);
  await fails(c().writeSettings, { cgroup: "/vm1", line: "ioband1 " + "9".repeat(5000) }, inv, /longer than 4096/);
  await fails(c().writeDevices, { cgroup: "/", line: "ioband1\u0000 io_throttle 8" }, inv, /control characters/);
  await fails(c().createCgroup, { path: "" }, inv);
  await fails(c().removeCgroup, { cgroup: "x" }, inv);
  await fails(c().attachDevice, { vm: "", device: "vda", cgroup: "/vm1" }, inv);
  await fails(c().attachDevice, { vm: "VM1", device: "vda", cgroup: "/vm1" }, inv);
  await fails(c().attachDevice, { vm: "vm1", device: "a.b", cgroup: "/vm1" }, inv);
  await fails(c().attachDevice, { vm: "vm1", device: "vda", cgroup: "" }, inv);
  await fails(c().attachDevice, { vm: "vm1", device: "vda", cgroup: "/nope" }, Status.NOT_FOUND);
});

test("VM devices: attach before set-up, bind, move; the binding's cgroupId follows the move", async () => {
  await call(c().attachDevice, { vm: "vm1", device: "vda", cgroup: "/vm1" });
  const b = host.bindVmDevice("vm1", "vda", "ioband1");
  assert.equal(b.cgroupId, 2);
  assert.equal(b.head.name, "ioband1");
  assert.equal(b.ioband.name, "ioband1");
  assert.equal(host.lookup("vm1", "vda"), b);
  // The data path's submit charges the request to the cgroup's group on the device.
  assert.equal(b.ioband.submit({ bytes: 4096, cgroupId: b.cgroupId }, b.head), "dispatch");
  assert.equal(b.head.find(2)!.dispatchedIos, 1);
  b.ioband.complete({ bytes: 4096, cgroupId: b.cgroupId });
  await call(c().attachDevice, { vm: "vm1", device: "vda", cgroup: "/vm2" });
  assert.equal(b.cgroupId, 3);
  assert.throws(() => host.bindVmDevice("vm1", "vda", "ioband1"), IobandHostError);
  assert.throws(() => host.bindVmDevice("vm2", "vda", "nosuch"), IobandHostError);
  const b2 = host.bindVmDevice("vm2", "vdb", "ioband2", "/vm1");
  assert.equal(b2.cgroupId, 2);
  assert.ok(host.unbindVmDevice("vm2", "vdb"));
  assert.equal(host.lookup("vm2", "vdb"), undefined);
});

test("setUpVmDevice creates the share and the device on first use, then reuses them", () => {
  const h = new IobandHost({ clock: () => 0 });
  const a = h.setUpVmDevice("vm1", "vda", { share: "disk0" });
  const b = h.setUpVmDevice("vm2", "vda", { share: "disk0", policy: "range-bw" });
  assert.equal(a.ioband, b.ioband, "one share, one scheduler for both VM devices");
  assert.equal(a.ioband.policy.name, "weight");
  assert.deepEqual(a.ioband.heads.map((x) => x.name), ["vm1-vda", "vm2-vda"]);
  h.unbindVmDevice("vm1", "vda");
  assert.equal(h.setUpVmDevice("vm1", "vda", { share: "disk0" }).head, a.head);
  assert.throws(() => h.setUpVmDevice("vm3", "vda", { share: "disk1", head: "vm1-vda" }), IobandHostError);
  assert.throws(() => h.setUpVmDevice("a".repeat(30), "vda", { share: "disk0" }), IobandHostError);
});

test("removing a cgroup detaches it from every device; a cgroup holding a VM device cannot go", async () => {
  await fails(c().removeCgroup, { cgroup: "/vm2" }, Status.FAILED_PRECONDITION, /vm1\/vda/);
  await call(c().attachDevice, { vm: "vm1", device: "vda", cgroup: "/" });
  events.length = 0;
  await call(c().removeCgroup, { cgroup: "/vm2" });
  assert.deepEqual(
    events.map((e) => `${e.kind}:${"action" in e ? e.action : ""}:${"head" in e ? e.head : ""}`),
    ["settings:detach:ioband1", "settings:detach:ioband3", "cgroup:remove:"],
  );
  await fails(c().readSettings, { cgroup: "/vm2" }, Status.NOT_FOUND);
  await fails(c().removeCgroup, { cgroup: "/vm2" }, Status.NOT_FOUND);
  await fails(c().removeCgroup, { cgroup: "/" }, Status.INVALID_ARGUMENT);
  // /vm1 (with vm2/vdb charged to it, unbound) still cannot go: move it, then remove.
  await fails(c().removeCgroup, { cgroup: "/vm1" }, Status.FAILED_PRECONDITION);
});

test("VIRTMESH_IOBAND_DEVICES: parsed, validated with one clear line", () => {
  assert.deepEqual(parseIobandDevices(undefined), []);
  assert.deepEqual(parseIobandDevices(" "), []);
  assert.deepEqual(parseIobandDevices("ioband1:weight, ioband2:range-bw,d3:weight@ioband1"), [
    { device: "ioband1", share: "ioband1", policy: "weight" },
    { device: "ioband2", share: "ioband2", policy: "range-bw" },
    { device: "d3", share: "ioband1", policy: "weight" },
  ]);
  for (const bad of ["ioband1", "ioband1:", ":weight", "ioband1:fifo", "ioband1:weight,", "a b:weight", "ioband1:weight,ioband1:weight", "a:weight,b:range-bw@a", "a:weight@s,s2:weight@a", "x".repeat(32) + ":weight", "ioband1:weight@"]) {
    assert.throws(
      () => parseIobandDevices(bad),
      (e: Error) => e instanceof ConfigError && e.message.startsWith(`VIRTMESH_IOBAND_DEVICES=${bad}: `) && !e.message.includes("\n"),
      bad,
    );
  }
  const h = new IobandHost({ clock: () => 0 });
  assert.throws(() => configureIobandDevices(h, "a:weight@b,b:weight@a"), ConfigError);
});
