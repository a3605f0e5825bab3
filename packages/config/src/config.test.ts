import { test } from "node:test";
import assert from "node:assert/strict";
import { ConfigError, serviceConfig, port } from "./index";

const base = { NATS_URL: "nats://127.0.0.1:4222", VIRTMESH_HOST: "src" };

test("reads a valid service configuration with defaults", () => {
  const c = serviceConfig("vhost-worker", base);
  assert.equal(c.host, "src");
  assert.equal(c.grpcPort, 0);
  assert.equal(c.shmDir, "/dev/shm/virtmesh-src");
});

test("bad port, bad host name, bad NATS URL, missing variables are one-line ConfigErrors", () => {
  const cases: [Record<string, string>, RegExp][] = [
    [{ ...base, VIRTMESH_GRPC_PORT: "70000" }, /VIRTMESH_GRPC_PORT=70000 is not a TCP port/],
    [{ ...base, VIRTMESH_GRPC_PORT: "12ab" }, /VIRTMESH_GRPC_PORT=12ab is not a TCP port/],
    [{ ...base, VIRTMESH_HOST: "../etc" }, /VIRTMESH_HOST '\.\.\/etc' is not a valid name/],
    [{ ...base, NATS_URL: "http://x:1" }, /NATS_URL=http:\/\/x:1 has scheme http:/],
    [{ VIRTMESH_HOST: "src" }, /NATS_URL is not set/],
    [{ NATS_URL: "nats://a:1" }, /VIRTMESH_HOST is not set/],
    [{ ...base, VIRTMESH_SHM_DIR: "rel/dir" }, /must be an absolute path/],
  ];
  for (const [env, re] of cases) {
    assert.throws(() => serviceConfig("x", env), (e: unknown) => e instanceof ConfigError && re.test(e.message) && !e.message.includes("\n"));
  }
  assert.equal(port({ P: "65535" }, "P"), 65535);
});
