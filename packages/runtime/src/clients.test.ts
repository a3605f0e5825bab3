import { test } from "node:test";
import assert from "node:assert/strict";
import { probe, sidecar, vhost } from "@virtmesh/proto";
import { ClientCache } from "./clients";

// Nothing listens here: gRPC clients connect lazily, and none of these makes a call.
const ADDRESS = "127.0.0.1:9";

test("two generated client classes at one address get a client each (issue 16)", () => {
  // The bug's premise: every generated class has the same name.
  assert.equal(sidecar.SharedMemoryServiceClient.name, probe.ProbeServiceClient.name);
  const cache = new ClientCache();
  try {
    const sc = cache.get(ADDRESS, sidecar.SharedMemoryServiceClient);
    const pr = cache.get(ADDRESS, probe.ProbeServiceClient);
    const vw = cache.get(ADDRESS, vhost.VhostBlkServiceClient);
    assert.ok(sc instanceof sidecar.SharedMemoryServiceClient);
    assert.ok(pr instanceof probe.ProbeServiceClient, "the probe client is a ProbeServiceClient");
    assert.equal(typeof pr.probe, "function");
    assert.equal(typeof sc.describeVm, "function");
    assert.equal(typeof vw.setOwner, "function");
    assert.equal(cache.size, 3);
  } finally {
    cache.closeAll();
  }
});

test("the same class at the same address is reused; another address gets its own client", () => {
  const cache = new ClientCache();
  try {
    const a = cache.get(ADDRESS, probe.ProbeServiceClient);
    assert.equal(cache.get(ADDRESS, probe.ProbeServiceClient), a);
    const b = cache.get("127.0.0.1:10", probe.ProbeServiceClient);
    assert.notEqual(b, a);
    assert.equal(cache.size, 2);
    cache.closeAll();
    assert.equal(cache.size, 0);
    assert.notEqual(cache.get(ADDRESS, probe.ProbeServiceClient), a, "a closed client is not handed out again");
  } finally {
    cache.closeAll();
  }
});
