// Issue 16: ctx.client() handed the client of one API back for another API at the same
// address (every generated client class is named ServiceClientImpl). On a real stack: a
// one-hop probe from a service to its sidecar, after that service already talks to the
// sidecar's SharedMemoryService; and, after a vhost-worker restart, a probe first and then
// SET_OWNER (which needs DescribeVm from the sidecar). The VM is made here through the
// sidecar's API (no guest-driver), so the test needs only the host services.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { credentials } from "@grpc/grpc-js";
import { callUnary, probe, sidecar, vhost } from "@virtmesh/proto";
import { Stack } from "../cli/src/stack";
import { ROOT, pidAlive, until } from "./helpers";

const HOST = "rc";
const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-rtc-"));
const lines: string[] = [];
let stack: Stack;
let mm: probe.ProbeServiceClient;
let sc: sidecar.SharedMemoryServiceClient;
const VM = "rtcvm";

before(async () => {
  stack = new Stack({
    root: ROOT,
    stateDir,
    hosts: [HOST],
    vms: [],
    basePort: 0,
    shmBase: "/dev/shm",
    stackId: randomBytes(3).toString("hex"),
    env: {},
    log: (l) => lines.push(l),
  });
  await stack.start();
  mm = new probe.ProbeServiceClient(svc("migration-manager").grpc, credentials.createInsecure());
  sc = new sidecar.SharedMemoryServiceClient(svc("shm-sidecar").grpc, credentials.createInsecure());
  await callUnary(sc, sc.createVm, { incoming: false, vm: VM, memoryBytes: 64 << 20, queues: [{ device: "rtc-blk", index: 0, size: 16 }] }, 20_000);
});

after(async () => {
  mm?.close();
  if (sc) await callUnary(sc, sc.destroyVm, { vm: VM }, 20_000).catch(() => undefined);
  sc?.close();
  const pids = stack.snapshot().services.map((s) => s.pid);
  await stack.stop();
  for (const pid of pids) if (pidAlive(pid)) process.kill(pid, "SIGKILL");
  rmSync(stateDir, { recursive: true, force: true });
});

function svc(instance: string) {
  const s = stack.snapshot().services.find((x) => x.instance === instance);
  assert.ok(s, `${instance} is in the stack`);
  return s;
}

async function probeVia(service: string): Promise<string[]> {
  const G = probe.Transport.TRANSPORT_GRPC;
  const res = await callUnary(mm, mm.probe, {
    route: [
      { service, host: HOST, transport: G },
      { service: "shm-sidecar", host: HOST, transport: G },
    ],
    payload: "rtc",
  }, 20_000);
  return res.visits.map((v) => `${v.service}@${v.host}`);
}

async function ownAndRelease(grpc: string, device: string): Promise<void> {
  const vw = new vhost.VhostBlkServiceClient(grpc, credentials.createInsecure());
  try {
    await callUnary(vw, vw.setOwner, { vm: VM, device }, 20_000);
    await callUnary(vw, vw.resetOwner, { vm: VM, device }, 20_000);
  } finally {
    vw.close();
  }
}

test("a one-hop probe to the sidecar works from a vhost-worker that already uses the sidecar's API", async () => {
  // SET_OWNER makes vhost-worker open a SharedMemoryService client to the sidecar (DescribeVm).
  await ownAndRelease(svc("vhost-worker").grpc, "rtc-blk");
  assert.deepEqual(await probeVia("vhost-worker"), ["migration-manager@cluster", `vhost-worker@${HOST}`, `shm-sidecar@${HOST}`]);
});

test("after a vhost-worker restart, a probe first does not break SET_OWNER", async () => {
  const old = svc("vhost-worker");
  process.kill(old.pid, "SIGKILL");
  const now = await until(
    "vhost-worker restarted and healthy",
    () => {
      const s = svc("vhost-worker");
      return s.state === "running" && s.pid !== old.pid ? s : undefined;
    },
    60_000,
  );
  assert.deepEqual(await probeVia("vhost-worker"), ["migration-manager@cluster", `vhost-worker@${HOST}`, `shm-sidecar@${HOST}`]);
  // The probe opened a ProbeService client to the sidecar first; DescribeVm must not get it.
  await ownAndRelease(now.grpc, "rtc-blk");
});
