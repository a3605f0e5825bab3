import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startNatsServer, type NatsServerHandle } from "./server";
import { connectNats, drainNats, NatsUnreachableError } from "./connection";
import { Registry, RegistryError, parseServiceEntry } from "./registry";
import { serviceSubject, vmSubject } from "./subjects";
import type { NatsConnection } from "@nats-io/transport-node";

let srv: NatsServerHandle;
let nc: NatsConnection;

before(async () => {
  srv = await startNatsServer();
  nc = await connectNats(srv.url, "registry-test");
});
after(async () => {
  await drainNats(nc);
  await srv.stop();
});

test("services register, are listed and found; unknown hosts are named as such", async () => {
  const reg = await Registry.open(nc);
  await reg.putService({ service: "shm-sidecar", host: "src", grpc: "127.0.0.1:5000", pid: 1, startedAt: "", meta: {} });
  await reg.putService({ service: "vhost-worker", host: "src", grpc: "127.0.0.1:5001", pid: 2, startedAt: "", meta: { a: "b" } });
  const all = await reg.listServices();
  assert.deepEqual(all.map((e) => e.service), ["shm-sidecar", "vhost-worker"]);
  assert.equal((await reg.waitForService("src", "vhost-worker", 500)).grpc, "127.0.0.1:5001");
  await assert.rejects(reg.waitForService("nowhere", "shm-sidecar", 300), (e: unknown) =>
    e instanceof RegistryError && /unknown host 'nowhere'.*known hosts: src/.test(e.message));
  await reg.deleteService("src", "vhost-worker");
  assert.equal(await reg.getService("src", "vhost-worker"), undefined);
  await reg.putVm({ vm: "vm1", host: "src", state: "running" });
  assert.equal((await reg.getVm("vm1"))?.host, "src");
});

test("registry values are checked when read", () => {
  const enc = (v: unknown) => new TextEncoder().encode(JSON.stringify(v));
  assert.equal(parseServiceEntry(new TextEncoder().encode("{not json")), undefined);
  assert.equal(parseServiceEntry(enc({ service: "X*", host: "src", grpc: "a:1", pid: 1 })), undefined);
  assert.equal(parseServiceEntry(enc({ service: "x", host: "src", grpc: "no-port", pid: 1 })), undefined);
  assert.ok(parseServiceEntry(enc({ service: "x", host: "src", grpc: "h:1", pid: 1 })));
});

test("subjects refuse wildcards and extra tokens", () => {
  assert.equal(serviceSubject("src", "vhost-worker", "probe"), "virtmesh.src.vhost-worker.probe");
  assert.throws(() => vmSubject("vm.*", "balloon"));
  assert.throws(() => serviceSubject("src", ">", "x"));
});

test("an unreachable NATS server fails fast with one line", async () => {
  await assert.rejects(connectNats("nats://127.0.0.1:1", "x", 600), (e: unknown) =>
    e instanceof NatsUnreachableError && /cannot reach NATS at nats:\/\/127\.0\.0\.1:1/.test(e.message));
});
