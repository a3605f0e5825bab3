// BalloonTransport over real virtqueues: the balloon driver's buffers live in
// guest memory; send() puts one on the queue's avail ring (DriverQueue), kicks
// the device through the queue's doorbell when it asks for kicks (§2.7.10.1),
// and resolves once the device has returned it on the used ring, waking on the
// call doorbell (§2.7.7). The device reports a refused buffer by bumping
// refused[queue] in the config page before the used entry.

import type { BalloonQueue, BalloonTransport } from "@virtmesh/balloon";
import type { Doorbell } from "@virtmesh/shm";
import type { DriverQueue, GuestMemory } from "@virtmesh/virtqueue";
import type { GuestBalloonConfig } from "./config-page";

export class BalloonRequestRefused extends Error {
  override readonly name = "BalloonRequestRefused";
  constructor(readonly queue: BalloonQueue) {
    super(`the balloon device refused a ${queue} buffer (see the balloon-host's balloon-refused event for why)`);
  }
}

export class BalloonQueueClosed extends Error {
  override readonly name = "BalloonQueueClosed";
}

interface Waiter {
  resolve(): void;
  reject(e: Error): void;
  refusedBefore: number;
}

export interface GuestQueue {
  name: BalloonQueue;
  q: DriverQueue;
  kick: Doorbell;
  call: Doorbell;
}

/** One queue's driver side: submit, wait for used. */
class QueueChannel {
  private readonly waiters = new Map<number, Waiter>();
  private polling = false;
  private closed = false;
  private readonly hasUsed = () => this.closed || this.g.q.hasUsed();

  constructor(
    private readonly g: GuestQueue,
    private readonly config: GuestBalloonConfig,
  ) {}

  submit(addr: number, len: number): Promise<void> {
    if (this.closed) return Promise.reject(new BalloonQueueClosed(`balloon ${this.g.name} queue is closed`));
    const refusedBefore = this.config.refused(this.g.name);
    const head = this.g.q.add([{ addr, len }], []);
    // The driver keeps at most a few buffers in flight per queue; a full ring is a bug.
    if (head < 0) return Promise.reject(new Error(`balloon ${this.g.name} queue is full`));
    const p = new Promise<void>((resolve, reject) => this.waiters.set(head, { resolve, reject, refusedBefore }));
    if (this.g.q.kickPrepare()) this.g.kick.ring();
    if (!this.polling) void this.poll();
    return p;
  }

  close(): void {
    this.closed = true;
    const err = new BalloonQueueClosed(`balloon ${this.g.name} queue closed`);
    for (const w of this.waiters.values()) w.reject(err);
    this.waiters.clear();
  }

  private async poll(): Promise<void> {
    this.polling = true;
    try {
      while (!this.closed && this.waiters.size > 0) {
        for (let u = this.g.q.popUsed(); u; u = this.g.q.popUsed()) {
          const w = this.waiters.get(u.id);
          if (!w) continue;
          this.waiters.delete(u.id);
          if (this.config.refused(this.g.name) !== w.refusedBefore) w.reject(new BalloonRequestRefused(this.g.name));
          else w.resolve();
        }
        if (this.waiters.size === 0) break;
        await this.g.call.spinThenWait(this.hasUsed);
      }
    } catch (e) {
      // DeviceProtocolError (a lying device) or the doorbell closing: fail every waiter.
      const err = e instanceof Error ? e : new Error(String(e));
      for (const w of this.waiters.values()) w.reject(err);
      this.waiters.clear();
    } finally {
      this.polling = false;
    }
  }
}

export class VirtqueueBalloonTransport implements BalloonTransport {
  private readonly channels = new Map<BalloonQueue, QueueChannel>();
  private readonly base: number;

  constructor(
    private readonly memory: GuestMemory,
    queues: readonly GuestQueue[],
    config: GuestBalloonConfig,
  ) {
    this.base = memory.bytes.byteOffset;
    for (const g of queues) this.channels.set(g.name, new QueueChannel(g, config));
  }

  /** buf must be a view of guest memory (the device reads it by guest-physical address). */
  send(queue: BalloonQueue, buf: Uint8Array, len: number): Promise<void> {
    const ch = this.channels.get(queue);
    if (!ch) return Promise.reject(new Error(`balloon ${queue} queue was not negotiated`));
    if (buf.buffer !== this.memory.bytes.buffer) return Promise.reject(new Error("balloon buffers must live in guest memory"));
    return ch.submit(buf.byteOffset - this.base, len);
  }

  close(): void {
    for (const c of this.channels.values()) c.close();
  }
}
