// Issue 4 item 6: fio --verify keeps running while vhost-worker, then completion-thread,
// is killed with SIGKILL and restarted by the launcher (the real Stack, with its restart
// hook switched on for those two services). Each restarted process reattaches to the
// rings and the inflight region in shared memory; every request the guest submitted is
// completed exactly once (the guest's DriverQueue rejects a duplicate or unknown used id)
// and every block verifies.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { credentials } from "@grpc/grpc-js";
import { guest } from "@virtmesh/proto";
import { Stack } from "../cli/src/stack";
import { stackOptions } from "../cli/src/commands";
import { pidAlive, until, sleep } from "./helpers";

const stateDir = mkdtempSync(join(tmpdir(), "virtmesh-e2e-blkc-"));
const lines: string[] = [];
let stack: Stack;
let client: guest.GuestServiceClient;

before(async () => {
  const o = stackOptions({ hosts: "src", "state-dir": stateDir }, (l) => lines.push(l));
  // The restore lines checked below are info-level; npm test runs services at warn.
  o.env = { VIRTMESH_STATE_DIR: stateDir, VIRTMESH_DISK_BYTES: String(64 << 20), VIRTMESH_LOG_LEVEL: "info" };
  o.restart = (svc) => svc.name === "vhost-worker" || svc.name === "completion-thread";
  stack = new Stack(o);
  await stack.start();
  const gd = stack.snapshot().services.find((s) => s.instance === "guest-driver-vm1")!;
  client = new guest.GuestServiceClient(gd.grpc, credentials.createInsecure());
});

after(async () => {
  client?.close();
  const pids = stack.snapshot().services.map((s) => s.pid);
  await stack.stop();
  for (const pid of pids) if (pidAlive(pid)) process.kill(pid, "SIGKILL");
  rmSync(stateDir, { recursive: true, force: true });
});

function runFio(req: guest.FioRequest): Promise<guest.FioResult> {
  return new Promise((ok, fail) => client.runFio(req, (e, r) => (e ? fail(e) : ok(r!))));
}

async function killAndWaitRestart(name: string): Promise<void> {
  const svc = stack.snapshot().services.find((s) => s.name === name)!;
  // Freeze it first so the guest fills the ring and work piles up inside it
  // (I/O issued, completions queued), then kill it in that state.
  process.kill(svc.pid, "SIGSTOP");
  await sleep(300);
  process.kill(svc.pid, "SIGKILL");
  await until(
    `${name} restarted and healthy`,
    () => {
      const s = stack.snapshot().services.find((x) => x.name === name)!;
      return s.restarts >= 1 && s.state === "running" && s.pid !== svc.pid ? s : undefined;
    },
    60_000,
  );
}

test("fio --verify survives SIGKILL of vhost-worker, then of completion-thread: zero errors, every request completed once", async () => {
  const req = { rw: "randwrite", blockSize: 4096, iodepth: 32, numjobs: 2, sizeBytes: 24 << 20, runtimeMs: 0, verify: "crc32c", rwmixRead: 0, spinlock: "", pvSpinlock: "" };
  let done = false;
  const fio = runFio(req).finally(() => (done = true));
  await sleep(700);
  assert.equal(done, false, "fio still running when vhost-worker is killed");
  await killAndWaitRestart("vhost-worker");
  await sleep(300);
  assert.equal(done, false, "fio still running when completion-thread is killed");
  await killAndWaitRestart("completion-thread");
  const r = await fio;
  assert.deepEqual(r.verifyFailures, []);
  assert.equal(r.verifyErrors, 0);
  // Every block written once and read back once by the verify phase.
  assert.equal(r.writeIos, 2 * (24 << 20) / 4096);
  assert.equal(r.readIos, 2 * (24 << 20) / 4096);
  assert.ok(lines.some((l) => /restarting vhost-worker@src/.test(l)));
  assert.ok(lines.some((l) => /restarting completion-thread@src/.test(l)));
  // The restarted processes reattached to the device and the queue from shared memory.
  const wlog = readFileSync(join(stateDir, "logs", "src-vhost-worker.log"), "utf8");
  const restored = /"resubmitted":(\d+)[^\n]*vhost-blk device restored after a restart/.exec(wlog);
  assert.ok(restored, "vhost-worker restored vm1/blk0");
  process.stdout.write(`# vhost-worker after SIGKILL: ${/"resubmitted".*"usedIdx":\d+/.exec(wlog)?.[0]}\n`);
  assert.match(readFileSync(join(stateDir, "logs", "src-completion-thread.log"), "utf8"), /completion queue resumed after a restart/);
  // The stack keeps serving: a fresh verified read of everything written.
  const again = await runFio({ ...req, rw: "read" });
  assert.equal(again.verifyErrors, 0, again.verifyFailures.join("\n"));
});
