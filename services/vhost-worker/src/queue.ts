// The active request queue of one vhost-blk device, built by BLK_SET_BACKEND (or a
// restart) and stopped by GET_VRING_BASE. It owns the logged guest memory view, the
// DeviceQueue, the completion ring and its doorbell, and the backend. Woken by the kick
// doorbell, it pops chains, parseBlkRequest checks them, and I/O goes straight into / out
// of guest memory. Completions go to the completion ring (parallel mode, the seed's
// design: the completion-thread fills the used ring) or are written inline (serialized,
// Liu Yuan's pre-seed design). Nothing is allocated or logged per request.
import { performance } from "node:perf_hooks";
import type { Doorbell, SharedMapping } from "@virtmesh/shm";
import { ChainError, DeviceQueue, GuestMemory, type DescriptorChain, type DirtyLog, type MemoryAccessor } from "@virtmesh/virtqueue";
import { BLK_MAX_DISCARD_SEG, BLK_SEG_MAX, BlkRequest, BlkRequestError, CompletionRing, INFLIGHT_SUBMITTED, TRACE_GUEST, VIRTIO_BLK_ID_BYTES, parseBlkRequest, type BlkLimits } from "@virtmesh/virtio-blk";
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES } from "@virtmesh/virtio-blk";
import type { BlkBackend } from "./backend";
import { VhostError } from "./errors";
import type { IobandBinding } from "./ioband";
import { conductorFor, IobandSlot, type IobandConductor, type IobandIssuer } from "./iobandpath";
import { HeadTable, openRing, traceRequest, type ActiveQueueOptions, type CompletionMode, type RecoveredHeads } from "./queue-setup";

export { blkLimits, type ActiveQueueOptions, type CompletionMode, type QueueStats, type RecoveredHeads, type RingStart, type VringFiles } from "./queue-setup";

export class ActiveQueue implements IobandIssuer {
  readonly backend: BlkBackend;
  readonly mode: CompletionMode;
  readonly ioband: IobandBinding | null;
  readonly limits: BlkLimits;
  readonly recovered: RecoveredHeads = { submitted: 0, pushed: 0, pushedNotMarked: 0, ringPending: 0, lastAvailIdx: 0, usedIdx: 0 };
  private readonly mem: GuestMemory;
  private readonly log: DirtyLog | null;
  private readonly q: DeviceQueue;
  private readonly dev: MemoryAccessor;
  private readonly chain: DescriptorChain;
  private readonly req: BlkRequest;
  private readonly cringMap: SharedMapping;
  private readonly cring: CompletionRing;
  private readonly cringBell: Doorbell;
  private readonly conductor: IobandConductor | null;
  private running = false;
  private loop: Promise<void> | null = null;
  private inflight = 0;
  private drainWaiters: Array<() => void> = [];
  private released = false;

  /** Per-head request state (index = head). */
  private readonly h: HeadTable;
  private readonly hCb: Array<(err: NodeJS.ErrnoException | null, n: number) => void> = [];
  private readonly hSlot: IobandSlot[] = [];
  /** "queued-block": this device's group is full, popping waits (g_should_block). */
  private iobandBlocked = false;
  /** unblock() ran: the loop must drain once, which re-enables notifications (they stayed off while blocked). */
  private iobandResume = false;

  constructor(private readonly o: ActiveQueueOptions) {
    this.backend = o.backend;
    this.mode = o.mode;
    this.ioband = o.ioband;
    this.limits = o.limits;
    this.log = o.log;
    this.mem = o.memory;
    const n = o.queue.size;
    const { map, ring, bell } = openRing(o);
    this.cringMap = map;
    this.cring = ring;
    this.cringBell = bell;
    // The device writes (status byte, used ring, IN data) go to the device dirty log.
    const logged = new GuestMemory(o.memory.buffer, { size: o.memory.size, deviceLog: o.log });
    this.q = new DeviceQueue(logged, o.queue, { lastAvailIdx: o.ring === "recover" ? ring.lastAvailIdx : o.base });
    this.dev = logged.device;
    this.chain = this.q.newChain();
    this.req = new BlkRequest(BLK_SEG_MAX, BLK_MAX_DISCARD_SEG);
    this.conductor = o.ioband === null ? null : conductorFor(o.ioband.ioband);
    this.h = new HeadTable(n, BLK_SEG_MAX);
    for (let h = 0; h < n; h++) {
      this.hCb.push((err, bytes) => this.segDone(h, err, bytes));
      this.hSlot.push(new IobandSlot(this, h));
    }
  }

  get isRunning(): boolean {
    return this.running;
  }
  get lastAvailIdx(): number {
    return this.q.lastAvailIdx;
  }
  get entries(): number {
    return this.cring.entries;
  }
  /** SET_FEATURES while running (VHOST_F_LOG_ALL): the completion-thread reads the flags. */
  set ringFlags(f: number) {
    this.cring.flags = f;
  }

  /** Starts popping; "recover" first re-submits the heads the inflight region says never completed. Returns how many. */
  start(): number {
    const resubmitted = this.o.ring === "recover" ? this.recoverInflight() : 0;
    if (this.q.needsReset === null) {
      this.running = true;
      this.loop = this.kickLoop();
    }
    return resubmitted;
  }

  /**
   * VHOST_GET_VRING_BASE: stops popping, waits until every request in flight has
   * completed (held ioband requests included; in parallel mode until the
   * completion-thread has consumed the ring, i.e. written every used element) and
   * returns last_avail_idx. Nothing popped is lost or left half-done.
   */
  async stop(timeoutMs: number): Promise<number> {
    this.running = false;
    this.o.files.kick?.ring(); // wake the loop if it sleeps
    if (this.loop) await this.loop;
    this.loop = null;
    const deadline = Date.now() + timeoutMs;
    while (this.inflight > 0 || this.cring.pending > 0) {
      if (Date.now() > deadline) {
        throw new VhostError("ETIMEDOUT", `${this.inflight} requests in flight and ${this.cring.pending} completions not consumed after ${timeoutMs} ms (is the completion-thread attached?)`);
      }
      await new Promise<void>((r) => {
        this.drainWaiters.push(r);
        setTimeout(r, 5);
      });
    }
    return this.q.lastAvailIdx;
  }

  /** Gives up the ring mapping and the ioband share; the backend is closed unless `keepBackend` (a restart reuses it). */
  release(keepBackend: boolean): void {
    if (this.released) return;
    this.released = true;
    this.running = false;
    // The binding stays: a completion arriving after a timed-out drain still gives its slot back.
    this.conductor?.forget(this);
    if (!keepBackend) this.backend.close();
    this.cringBell.close();
    this.cringMap.unmap();
  }

  /** The conductor lets a held request of this device go. */
  issueHeld(head: number): void {
    if (this.released) {
      // Closed under it (a drain that timed out): nothing to issue to; give the slot back.
      this.h.iob[head] = 0;
      this.ioband?.ioband.complete(this.hSlot[head]!);
      return;
    }
    this.issue(head);
  }

  /** The group has room again: pop the ring again (the loop sleeps on the kick doorbell). */
  unblock(): void {
    if (!this.iobandBlocked) return;
    this.iobandBlocked = false;
    this.iobandResume = true;
    this.o.files.kick?.ring();
  }

  /** vhost-user inflight recovery: heads at SUBMITTED whose completion never reached the ring are submitted again. */
  private recoverInflight(): number {
    const ring = this.cring;
    const rec = this.recovered;
    const n = this.q.size;
    for (let h = 0; h < n; h++) {
      const st = ring.inflightState(h);
      if (st === INFLIGHT_SUBMITTED) rec.submitted++;
      else if (st !== 0) rec.pushed++;
    }
    rec.ringPending = ring.pending;
    rec.lastAvailIdx = ring.lastAvailIdx;
    rec.usedIdx = this.q.usedIdx;
    let resubmitted = 0;
    for (let h = 0; h < n; h++) {
      if (ring.inflightState(h) !== INFLIGHT_SUBMITTED) continue;
      if (ring.hasPendingCompletion(h)) {
        ring.markPushed(h); // died between the push and the state change
        rec.pushedNotMarked++;
        continue;
      }
      // Serialized mode keeps no commit record (the pre-seed design): only parallel-mode heads.
      if (this.mode === "serialized") continue;
      const r = this.q.walkChain(h, this.chain);
      if (r instanceof ChainError) {
        this.q.enterNeedsReset(r);
        this.needsReset(r.message);
        break;
      }
      resubmitted++;
      this.handleRequest(r);
    }
    return resubmitted;
  }

  /** The worker loop (vhost_blk_handle_guest_kick): pop until empty, then sleep on the kick doorbell. */
  private async kickLoop(): Promise<void> {
    const q = this.q;
    // Held by "queued-block": sleep until unblock() rings the kick doorbell.
    const check = (): boolean => !this.running || (!this.iobandBlocked && (this.iobandResume || q.hasPending()));
    while (this.running) {
      this.iobandResume = false;
      this.drainAvail();
      const kick = this.o.files.kick;
      if (!this.running || !kick) break;
      // A rejected wait means the doorbell was replaced or closed: loop and re-read it.
      await kick.spinThenWait(check, { maxSpinUs: 20 }).catch(() => undefined);
      this.o.stats.kicks++;
    }
  }

  private drainAvail(): void {
    const q = this.q;
    const chain = this.chain;
    q.disableNotifications();
    for (;;) {
      while (this.running && !this.iobandBlocked) {
        const r = q.pop(chain);
        if (r === null) break;
        if (r instanceof ChainError) {
          // A chain that breaks §2.7 (address outside guest memory, loop, ...): like
          // QEMU's virtio_error, the device enters NEEDS_RESET and stops serving this
          // queue; every other device keeps running.
          q.enterNeedsReset(r);
          this.needsReset(r.message);
          return;
        }
        // Already ours: a restarted worker re-popped a head it had recorded (or a guest
        // put a head in flight twice, §2.7.13.2 forbids it). Not submitted again.
        if (this.cring.inflightState(r.head) !== 0) continue;
        this.cring.markSubmitted(r.head, q.lastAvailIdx);
        this.handleRequest(r);
      }
      // Blocked: notifications stay off, the guest need not kick; unblock() resumes.
      if (!this.running || this.iobandBlocked) return;
      // vhost_enable_notify: re-check after re-enabling so no kick is lost.
      if (!q.enableNotifications()) return;
      q.disableNotifications();
    }
  }

  private needsReset(reason: string): void {
    this.o.stats.errors++;
    this.running = false;
    this.o.onNeedsReset(reason);
    this.checkDrained();
  }

  /** Dispatch only: parseBlkRequest made every check on the chain. */
  private handleRequest(c: DescriptorChain): void {
    const head = c.head;
    this.o.stats.requests++;
    const r = parseBlkRequest(c, this.dev, this.limits, this.req);
    if (r instanceof BlkRequestError) {
      if (r.fatal) return this.needsReset(r.message);
      this.begin(head, r.type, 0, r.statusAddr, 1);
      return this.complete(head, r.status);
    }
    this.begin(head, r.type, r.sector, r.statusAddr, r.usedLen);
    switch (r.type) {
      case VIRTIO_BLK_T_IN:
      case VIRTIO_BLK_T_OUT: {
        const base = head * BLK_SEG_MAX;
        for (let i = 0; i < r.segCount; i++) {
          this.h.segAddr[base + i] = r.segAddr[i]!;
          this.h.segLen[base + i] = r.segLen[i]!;
        }
        this.h.segs[head] = r.segCount;
        this.h.write[head] = r.isWrite ? 1 : 0;
        this.h.ops[head] = r.segCount;
        if (this.ioband !== null) return this.submitIoband(head, r.dataBytes, false);
        return this.issue(head);
      }
      case VIRTIO_BLK_T_FLUSH:
        this.h.ops[head] = 1;
        // A flush is urgent for dm-ioband (g_urgent_bios): it never waits behind the throttle.
        if (this.ioband !== null) return this.submitIoband(head, 0, true);
        return this.issue(head);
      case VIRTIO_BLK_T_GET_ID: {
        const serial = this.backend.serial;
        const n = Math.min(r.dataBytes, VIRTIO_BLK_ID_BYTES);
        this.h.usedLen[head] = this.q.writeChain(c, n === VIRTIO_BLK_ID_BYTES ? serial : serial.subarray(0, n)) + 1;
        return this.complete(head, VIRTIO_BLK_S_OK);
      }
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES:
        try {
          // DISCARD zeroes too: a later read returning zeros is allowed, and it is deterministic.
          for (let i = 0; i < r.zeroCount; i++) this.backend.zeroSync(r.zeroPos[i]!, r.zeroLen[i]!);
        } catch {
          return this.complete(head, VIRTIO_BLK_S_IOERR);
        }
        return this.complete(head, VIRTIO_BLK_S_OK);
    }
  }

  private begin(head: number, type: number, sector: number, statusAddr: number, usedLen: number): void {
    this.h.begin(head, type, sector, statusAddr, usedLen, performance.now());
    this.inflight++;
  }

  /** Hands a checked IN/OUT/FLUSH request to the backend (hType, segments and hOps are set). */
  private issue(head: number): void {
    const be = this.backend;
    const cb = this.hCb[head]!;
    if (this.h.type[head] === VIRTIO_BLK_T_FLUSH) return be.flush(cb);
    const isWrite = this.h.write[head] === 1;
    const nseg = this.h.segs[head]!;
    const bytes = this.mem.bytes;
    let p = this.h.sector[head]! * 512;
    for (let i = 0; i < nseg; i++) {
      const a = this.h.segAddr[head * BLK_SEG_MAX + i]!;
      const l = this.h.segLen[head * BLK_SEG_MAX + i]!;
      if (isWrite) be.write(bytes, a, l, p, cb);
      else be.read(bytes, a, l, p, cb);
      p += l;
    }
  }

  /**
   * ioband_map(): the request goes to its cgroup's group on the ioband device; it is
   * issued now ("dispatch", "urgent") or held until the conductor lets it go.
   */
  private submitIoband(head: number, bytes: number, urgent: boolean): void {
    const b = this.ioband;
    const conductor = this.conductor;
    if (b === null || conductor === null) return this.issue(head);
    const slot = this.hSlot[head]!;
    slot.bytes = bytes;
    slot.cgroupId = b.cgroupId; // read per request: a move (AttachDevice) updates it in place
    slot.urgent = urgent;
    this.h.iob[head] = 1;
    const r = b.ioband.submit(slot, b.head);
    if (r === "dispatch" || r === "urgent") return this.issue(head);
    if (r === "queued-block") {
      this.iobandBlocked = true;
      conductor.block(this);
    }
    conductor.pump();
  }

  /** One backend operation of `head` finished (the seed's io_event). */
  private segDone(head: number, err: NodeJS.ErrnoException | null, bytes: number): void {
    // A failed operation fails the request; so does one that moved no bytes (segment
    // lengths are bounded by the capacity check, so a short read cannot happen inside it).
    if (err) this.h.status[head] = VIRTIO_BLK_S_IOERR;
    else if (this.h.segs[head]! > 0 && bytes <= 0) this.h.status[head] = VIRTIO_BLK_S_IOERR;
    if (--this.h.ops[head]! > 0) return;
    if (this.h.write[head] === 0 && this.log !== null && this.log.enabled) {
      // IN data landed in guest memory behind the accessor's back: log it (VHOST_F_LOG_ALL).
      for (let i = 0; i < this.h.segs[head]!; i++) this.log.markRange(this.h.segAddr[head * BLK_SEG_MAX + i]!, this.h.segLen[head * BLK_SEG_MAX + i]!);
    }
    this.complete(head, this.h.status[head]!);
  }

  private complete(head: number, status: number): void {
    if (status !== VIRTIO_BLK_S_OK) this.o.stats.errors++;
    if (this.released) {
      // A completion after a timed-out drain: the ring is gone; the guest gets nothing.
      this.inflight--;
      return;
    }
    // Sampled requests only: the guest put its span context in this head's trace slot.
    if (this.cring.traceState(head) === TRACE_GUEST) traceRequest(this.cring, head, this.o, this.h.type[head]!, this.h.sector[head]!, this.h.t0[head]!, status, this.mode);
    if (this.mode === "parallel") {
      this.cring.push(head, status, this.h.usedLen[head]!, this.h.statusAddr[head]!);
      this.cring.markPushed(head);
      this.cringBell.ring();
    } else {
      // Serialized: set_status + vhost_add_used_and_signal inline.
      this.dev.writeU8(this.h.statusAddr[head]!, status);
      this.cring.markFree(head);
      this.q.addUsed(head, this.h.usedLen[head]!);
      if (this.q.needsInterrupt()) {
        this.o.stats.interrupts++;
        this.o.files.call?.ring();
      }
    }
    this.inflight--;
    if (this.h.iob[head] === 1) {
      // ioband_end_io(): the slot is free again, and the completion may let held requests go.
      this.h.iob[head] = 0;
      this.ioband?.ioband.complete(this.hSlot[head]!);
      this.conductor?.pump();
    }
    this.checkDrained();
  }

  private checkDrained(): void {
    if (this.drainWaiters.length && this.inflight === 0 && this.cring.pending === 0) {
      const w = this.drainWaiters;
      this.drainWaiters = [];
      for (const f of w) f();
    }
  }
}

