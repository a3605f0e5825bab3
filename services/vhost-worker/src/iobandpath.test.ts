// The conductor over a real IobandDevice with closed-loop submitters whose "backend"
// completes asynchronously (1 ms, so the share stays saturated): everything submitted
// completes (no stall, held requests and blocked devices are released), and under the
// weight policy the heavier weight gets more.
import { test } from "node:test";
import assert from "node:assert/strict";
import { IobandHost } from "./ioband";
import { conductorFor, IobandSlot, type IobandIssuer } from "./iobandpath";
import type { IobandBinding } from "./ioband";

class FakeDevice implements IobandIssuer {
  ioband: IobandBinding | null;
  slots: IobandSlot[] = [];
  done = 0;
  bytes = 0;
  blocked = false;
  private next = 0;
  constructor(
    b: IobandBinding,
    readonly depth: number,
    readonly serviceMs: () => number,
    readonly stopAt: number,
  ) {
    this.ioband = b;
    for (let h = 0; h < depth; h++) this.slots.push(new IobandSlot(this, h));
  }
  start(): void {
    for (let h = 0; h < this.depth; h++) this.submit(h);
  }
  private readonly waiting: number[] = [];
  private submit(head: number): void {
    if (Date.now() >= this.stopAt) return;
    // Like the ring: a blocked device pops nothing until unblock().
    if (this.blocked) {
      this.waiting.push(head);
      return;
    }
    const b = this.ioband!;
    const s = this.slots[head]!;
    s.bytes = 4096;
    s.cgroupId = b.cgroupId;
    s.urgent = this.next++ % 50 === 0;
    const r = b.ioband.submit(s, b.head);
    if (r === "dispatch" || r === "urgent") this.issueHeld(head);
    else {
      if (r === "queued-block") {
        this.blocked = true;
        conductorFor(b.ioband).block(this);
      }
      conductorFor(b.ioband).pump();
    }
  }
  issueHeld(head: number): void {
    setTimeout(() => {
      this.done++;
      this.bytes += 4096;
      const b = this.ioband!;
      b.ioband.complete(this.slots[head]!);
      conductorFor(b.ioband).pump();
      this.submit(head);
    }, this.serviceMs());
  }
  unblock(): void {
    this.blocked = false;
    while (!this.blocked && this.waiting.length > 0) this.submit(this.waiting.shift()!);
  }
}

for (const throttle of [1, 4]) {
  test(`weight 40/20/10, io_throttle ${throttle}: nothing stalls, the heaviest weight gets the most`, async () => {
    const host = new IobandHost();
    host.addBackend("ioband1", { policy: "weight", ioThrottle: throttle });
    host.addDevice("ioband1", "ioband1");
    const w = [40, 20, 10];
    const stopAt = Date.now() + 1500;
    const devs: FakeDevice[] = [];
    for (let i = 0; i < 3; i++) {
      const vm = `vm${i + 1}`;
      const b = host.bindVmDevice(vm, "blk0", "ioband1");
      devs.push(new FakeDevice(b, 100, () => 1, stopAt));
    }
    const { createCgroup, writeSettings } = await import("@virtmesh/ioband");
    for (let i = 0; i < 3; i++) {
      assert.ok(createCgroup(host.control, `/vm${i + 1}`).ok);
      assert.ok(host.attachVmDevice(`vm${i + 1}`, "blk0", `/vm${i + 1}`).ok);
      assert.ok(writeSettings(host.control, `/vm${i + 1}`, `ioband1 ${w[i]}`).ok);
    }
    devs.forEach((d) => d.start());
    await new Promise((r) => setTimeout(r, 1500));
    // Drain: everything submitted must complete.
    const dev = host.share("ioband1")!;
    const deadline = Date.now() + 3000;
    while ((dev.blocked > 0 || dev.issued > 0) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    assert.equal(dev.blocked, 0, "requests still held");
    assert.equal(dev.issued, 0, "requests still issued");
    const tot = devs.reduce((a, d) => a + d.bytes, 0);
    const shares = devs.map((d) => d.bytes / tot);
    const msg = `shares ${shares.map((s) => (s * 100).toFixed(1)).join(" / ")}`;
    assert.ok(tot > 0);
    assert.ok(devs[0]!.bytes > devs[1]!.bytes && devs[1]!.bytes > devs[2]!.bytes, msg);
  });
}
