// One side (driver or device) of the cross-process virtqueue test; spawned by
// cross-process.test.ts, never imported. Maps the guest memory file and the
// dirty-log file with @virtmesh/shm, pushes/serves `total` requests, and prints
// one JSON line with its counters (or {"error": ...}).
//
// Request i: a 16-byte device-readable header {seq, ~seq, slot, 0} and an
// 8-byte device-writable response the device fills with {seq, ~seq}. The
// device checks it sees seq 0, 1, 2, ... in avail order; the driver checks the
// used ring returns them in that order with the right head, len and response.

import { Doorbell, mapFile } from "@virtmesh/shm";
import { DirtyLog, GuestMemory } from "./guest-memory";
import { DeviceQueue, DescriptorChain, type QueueConfig } from "./device";
import { DriverQueue, type BufferSegment } from "./driver";
import { ChainError } from "./chain-error";

export interface PeerConfig {
  role: "driver" | "device";
  memPath: string;
  memSize: number;
  logPath: string;
  kickPath: string;
  callPath: string;
  queue: QueueConfig;
  indirectAddr: number;
  maxIndirect: number;
  reqBase: number;
  respBase: number;
  total: number;
  /** Give up (and report a stall) if a wait lasts this long: a lost notification. */
  stallMs: number;
  /** Device: first request seq this incarnation will see (after a restart). */
  startSeq?: number;
  /**
   * Device: after completing this many requests (counting from 0), pop a few
   * more without completing them and exit, as a crashed device would.
   */
  crashAfter?: number;
}

const SLOT = 16;

function main(): void {
  const cfg = JSON.parse(process.argv[2]!) as PeerConfig;
  const mapping = mapFile(cfg.memPath, cfg.memSize);
  const logMapping = mapFile(cfg.logPath, 2 * 4096);
  const kick = Doorbell.open(cfg.kickPath);
  const call = Doorbell.open(cfg.callPath);
  try {
    const vcpuLog = new DirtyLog(logMapping.buffer, cfg.memSize, { byteOffset: 0 });
    const deviceLog = new DirtyLog(logMapping.buffer, cfg.memSize, { byteOffset: 4096 });
    const mem = new GuestMemory(mapping.buffer, { vcpuLog, deviceLog });
    const result = cfg.role === "driver" ? runDriver(cfg, mem, kick, call) : runDevice(cfg, mem, kick, call);
    process.stdout.write(JSON.stringify(result) + "\n");
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: String((err as Error).stack ?? err) }) + "\n");
    process.exitCode = 1;
  } finally {
    kick.close();
    call.close();
    logMapping.unmap();
    mapping.unmap();
  }
}

function runDriver(cfg: PeerConfig, mem: GuestMemory, kick: Doorbell, call: Doorbell) {
  const q = new DriverQueue(mem, cfg.queue, {
    initRings: false, // fresh zero-filled file; the device may already be polling
    indirectArea: cfg.queue.indirect ? { addr: cfg.indirectAddr, maxIndirect: cfg.maxIndirect } : undefined,
  });
  const n = cfg.queue.size;
  const w = mem.vcpu;
  // Request slots: a free stack, and which slot/seq each outstanding head carries.
  const freeSlots: number[] = [];
  for (let s = n - 1; s >= 0; s--) freeSlots.push(s);
  const headSlot = new Int32Array(n).fill(-1);
  // FIFO of heads in submission order: the used ring must return exactly this order.
  const fifo = new Int32Array(n);
  let fifoHead = 0;
  let fifoTail = 0;
  const readable: BufferSegment[] = [{ addr: 0, len: SLOT }];
  const writable: BufferSegment[] = [{ addr: 0, len: 8 }];
  let submitted = 0;
  let completed = 0;
  let kicks = 0;
  let waits = 0;
  let stalls = 0;
  const t0 = performance.now();
  q.disableCallbacks();
  while (completed < cfg.total) {
    while (submitted < cfg.total && freeSlots.length > 0) {
      const slot = freeSlots[freeSlots.length - 1]!;
      const req = cfg.reqBase + slot * SLOT;
      const resp = cfg.respBase + slot * SLOT;
      w.writeU32(req, submitted);
      w.writeU32(req + 4, ~submitted >>> 0);
      w.writeU32(req + 8, slot);
      w.writeU32(resp, 0xdeadbeef); // must be overwritten by the device
      readable[0]!.addr = req;
      writable[0]!.addr = resp;
      const head = q.add(readable, writable);
      if (head < 0) break; // descriptors exhausted (direct: 2 per request)
      freeSlots.pop();
      if (headSlot[head] !== -1) throw new Error(`head ${head} handed out twice`);
      headSlot[head] = slot;
      fifo[fifoTail++ % n] = head;
      submitted++;
    }
    if (q.kickPrepare()) {
      kicks++;
      kick.ring();
    }
    let reaped = 0;
    for (let u = q.popUsed(); u !== null; u = q.popUsed()) {
      if (fifoHead === fifoTail) throw new Error(`used id ${u.id} with nothing outstanding`);
      const want = fifo[fifoHead++ % n]!;
      if (u.id !== want) throw new Error(`reordered: used id ${u.id}, expected head ${want} (request ${completed})`);
      const slot = headSlot[u.id]!;
      headSlot[u.id] = -1;
      const resp = cfg.respBase + slot * SLOT;
      const seq = w.readU32(resp);
      const check = w.readU32(resp + 4);
      if (u.len !== 8 || seq !== completed || check !== ~completed >>> 0) {
        throw new Error(`request ${completed}: used len ${u.len}, response seq ${seq} check ${check.toString(16)}`);
      }
      freeSlots.push(slot);
      completed++;
      reaped++;
    }
    if (reaped === 0 && completed < cfg.total) {
      // Nothing to do until the device uses something: re-enable interrupts,
      // re-check (§2.7.14), sleep on the call doorbell.
      if (q.enableCallbacks()) {
        q.disableCallbacks();
        continue;
      }
      waits++;
      if (!call.spinThenWaitSync(() => q.hasUsed(), { timeoutMs: cfg.stallMs })) {
        stalls++;
        if (!q.hasUsed()) throw new Error(`stalled ${cfg.stallMs} ms waiting for used buffers with ${submitted - completed} outstanding: lost interrupt`);
      }
      q.disableCallbacks();
    }
  }
  return { role: "driver", completed, submitted, kicks, waits, stalls, ms: performance.now() - t0, doorbell: call.counters };
}

function runDevice(cfg: PeerConfig, mem: GuestMemory, kick: Doorbell, call: Doorbell) {
  // No saved state: position re-derived from used->idx in guest memory.
  const q = new DeviceQueue(mem, cfg.queue);
  const startState = q.state;
  const chain: DescriptorChain = q.newChain();
  const r = mem.device;
  let expectSeq = cfg.startSeq ?? 0;
  const stopAt = cfg.crashAfter ?? cfg.total;
  let interrupts = 0;
  let waits = 0;
  let stalls = 0;
  const t0 = performance.now();
  q.disableNotifications();
  while (expectSeq < stopAt) {
    let popped = 0;
    for (let c = expectSeq < stopAt ? q.pop(chain) : null; c !== null; c = expectSeq < stopAt ? q.pop(chain) : null) {
      if (c instanceof ChainError) throw new Error(`valid driver produced a bad chain: ${c.message}`);
      if (c.readableCount !== 1 || c.count !== 2 || c.readableBytes !== SLOT || c.writableBytes !== 8) {
        throw new Error(`unexpected chain shape: ${c.count} segments, ${c.readableBytes}/${c.writableBytes} bytes`);
      }
      const req = c.addr[0]!;
      const seq = r.readU32(req);
      if (seq !== expectSeq || r.readU32(req + 4) !== ~seq >>> 0) throw new Error(`avail order: got seq ${seq}, expected ${expectSeq}`);
      const resp = c.addr[1]!;
      r.writeU32(resp, seq);
      r.writeU32(resp + 4, ~seq >>> 0);
      q.addUsed(c.head, 8);
      expectSeq++;
      // Interrupt per small batch so the driver can recycle slots early.
      if (++popped % 32 === 0 && q.needsInterrupt()) {
        interrupts++;
        call.ring();
      }
    }
    if (q.needsInterrupt()) {
      interrupts++;
      call.ring();
    }
    if (expectSeq >= stopAt) break;
    // Idle: ask for kicks again, re-check for the race (vhost_enable_notify), sleep.
    if (q.enableNotifications()) {
      q.disableNotifications();
      continue;
    }
    waits++;
    if (!kick.spinThenWaitSync(() => q.hasPending(), { timeoutMs: cfg.stallMs })) {
      stalls++;
      if (!q.hasPending()) throw new Error(`stalled ${cfg.stallMs} ms waiting for a kick at request ${expectSeq}: lost kick`);
    }
    q.disableNotifications();
  }
  let abandoned = 0;
  if (cfg.crashAfter !== undefined) {
    // Pop (and so consume from the avail ring) a few chains that will never be
    // completed: the restarted device must serve them again.
    while (abandoned < 3) {
      const c = q.pop(chain);
      if (c instanceof ChainError) throw new Error(c.message);
      if (c !== null) abandoned++;
    }
  }
  return { role: "device", startState, served: expectSeq, abandoned, interrupts, waits, stalls, lastAvailIdx: q.lastAvailIdx, usedIdx: q.usedIdx, ms: performance.now() - t0, doorbell: kick.counters };
}

main();
