// Two real processes push requests through one split virtqueue in a MAP_SHARED
// guest-memory file (@virtmesh/shm) and back, with EVENT_IDX off and on:
// none lost, duplicated or reordered against the used ring, no lost
// notification (a lost kick or interrupt shows up as a stall, not a hang).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { Doorbell, mapFile } from "@virtmesh/shm";
import { splitQueueLayout } from "./layout";
import { DirtyLog } from "./guest-memory";
import { indirectAreaBytes } from "./driver";
import type { PeerConfig } from "./cross-process-peer";

const PEER = join(__dirname, "cross-process-peer.ts");
const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

type PeerResult = Record<string, unknown>;

function runPeer(cfg: PeerConfig, timeoutMs: number): { done: Promise<PeerResult>; kill: () => void } {
  const proc = spawn(process.execPath, ["--import", "tsx", PEER, JSON.stringify(cfg)], { stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  proc.stdout.setEncoding("utf8");
  proc.stdout.on("data", (c: string) => (out += c));
  const done = new Promise<PeerResult>((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      reject(new Error(`${cfg.role} did not finish within ${timeoutMs} ms`));
    }, timeoutMs);
    proc.once("exit", (code, signal) => {
      clearTimeout(timer);
      const line = out.trim().split("\n").pop() ?? "";
      let parsed: PeerResult;
      try {
        parsed = JSON.parse(line) as PeerResult;
      } catch {
        reject(new Error(`${cfg.role} exited ${code ?? signal} without a result: ${out}`));
        return;
      }
      if (parsed.error) reject(new Error(`${cfg.role}: ${String(parsed.error)}`));
      else if (code !== 0) reject(new Error(`${cfg.role} exited ${code ?? signal}`));
      else resolve(parsed);
    });
  });
  return { done, kill: () => proc.kill("SIGKILL") };
}

async function pushThrough(total: number, eventIdx: boolean, indirect: boolean, crashAfter?: number) {
  const dir = mkdtempSync("/dev/shm/virtmesh-test-");
  dirs.push(dir);
  const memSize = 4 << 20;
  const size = 256;
  const layout = splitQueueLayout(size, 0);
  const indirectAddr = 16384;
  const maxIndirect = 4;
  const cfgBase = {
    memPath: join(dir, "guest-mem"),
    memSize,
    logPath: join(dir, "dirty-logs"),
    kickPath: join(dir, "kick"),
    callPath: join(dir, "call"),
    queue: { ...layout, eventIdx, indirect },
    indirectAddr,
    maxIndirect,
    reqBase: 64 * 1024,
    respBase: 128 * 1024,
    total,
    stallMs: 5000,
  };
  assert.ok(indirectAddr + indirectAreaBytes(size, maxIndirect) <= cfgBase.reqBase && layout.end <= indirectAddr);
  const mem = mapFile(cfgBase.memPath, memSize, { create: true });
  const logs = mapFile(cfgBase.logPath, 2 * 4096, { create: true });
  const kick = Doorbell.create(cfgBase.kickPath);
  const call = Doorbell.create(cfgBase.callPath);
  const device = runPeer({ ...cfgBase, role: "device", crashAfter }, 60_000);
  const driver = runPeer({ ...cfgBase, role: "driver" }, 60_000);
  let restarted: ReturnType<typeof runPeer> | null = null;
  try {
    let dev = await device.done;
    let firstDev: PeerResult | null = null;
    if (crashAfter !== undefined) {
      // The device process is gone with 3 chains popped but never used; a new
      // one re-derives its position from the rings and carries on.
      firstDev = dev;
      restarted = runPeer({ ...cfgBase, role: "device", startSeq: crashAfter }, 60_000);
      dev = await restarted.done;
    }
    const drv = await driver.done;
    // Both logs are in a shared file: read them from this third process
    // (copied, since the mapping goes away below).
    const snapshot = logs.buffer.slice(0);
    const vcpuLog = new DirtyLog(snapshot, memSize, { byteOffset: 0 });
    const deviceLog = new DirtyLog(snapshot, memSize, { byteOffset: 4096 });
    return { drv, dev, firstDev, cfg: cfgBase, vcpuLog, deviceLog };
  } finally {
    restarted?.kill();
    driver.kill();
    device.kill();
    kick.close();
    call.close();
    mem.unmap();
    logs.unmap();
  }
}

for (const eventIdx of [false, true]) {
  test(`cross-process: 1,000,000 requests through one virtqueue and back, EVENT_IDX ${eventIdx ? "on" : "off"}`, { timeout: 90_000 }, async () => {
    const total = 1_000_000;
    const { drv, dev, cfg, vcpuLog, deviceLog } = await pushThrough(total, eventIdx, false);
    assert.equal(drv.completed, total);
    assert.equal(drv.submitted, total);
    assert.equal(dev.served, total);
    assert.equal(dev.usedIdx, total & 0xffff);
    assert.equal(dev.lastAvailIdx, total & 0xffff);
    assert.equal(drv.stalls, 0, "no lost interrupt");
    assert.equal(dev.stalls, 0, "no lost kick");
    // Dirty logs: the driver (vCPU) wrote descriptors, avail ring and requests;
    // the device wrote the used ring and responses, and nothing else.
    const page = (a: number) => Math.floor(a / 4096);
    assert.ok(vcpuLog.isDirty(page(cfg.queue.descAddr)) && vcpuLog.isDirty(page(cfg.reqBase)));
    assert.ok(deviceLog.isDirty(page(cfg.queue.usedAddr)) && deviceLog.isDirty(page(cfg.respBase)));
    assert.equal(deviceLog.isDirty(page(cfg.reqBase)), false);
    assert.equal(vcpuLog.isDirty(page(cfg.respBase + 8 * 4096)), false);
    console.log(`# EVENT_IDX ${eventIdx ? "on " : "off"}: ${total} requests, kicks ${drv.kicks}, interrupts ${dev.interrupts}, driver waits ${drv.waits}, device waits ${dev.waits}`);
  });
}

test("cross-process: indirect descriptors with EVENT_IDX, 100,000 requests", { timeout: 60_000 }, async () => {
  const total = 100_000;
  const { drv, dev } = await pushThrough(total, true, true);
  assert.equal(drv.completed, total);
  assert.equal(dev.served, total);
  assert.equal(drv.stalls, 0);
  assert.equal(dev.stalls, 0);
});

test("cross-process: the device process dies mid-stream and a new one resumes from the rings", { timeout: 60_000 }, async () => {
  const total = 150_000;
  const crashAfter = 70_000; // past the 16-bit wrap
  const { drv, dev, firstDev } = await pushThrough(total, true, false, crashAfter);
  assert.ok(firstDev);
  assert.equal(firstDev.served, crashAfter);
  assert.equal(firstDev.abandoned, 3, "popped but never completed");
  // The restarted device found used->idx = 70000 & 0xffff and resumed there, so the 3
  // abandoned chains are served again, exactly once from the driver's view.
  assert.deepEqual(dev.startState, { lastAvailIdx: crashAfter & 0xffff, usedIdx: crashAfter & 0xffff });
  assert.equal(dev.served, total);
  assert.equal(drv.completed, total);
  assert.equal(dev.stalls, 0);
});
