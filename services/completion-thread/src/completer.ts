// One attached queue: consume the completion ring vhost-worker fills, and for each
// completion write the status byte, add the used element (the seed's
// vhost_blk_host_kick_thread: copy_to_user(status) + vhost_add_used), then signal
// the guest once per batch only if EVENT_IDX (or NO_INTERRUPT) says it must
// (vhost_signal). Device writes go through the device accessor, so with
// VHOST_F_LOG_ALL the status byte and used ring pages land in the device dirty log.
import { statSync } from "node:fs";
import { context, trace, SpanKind, TraceFlags, type Span } from "@opentelemetry/api";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import { DeviceQueue, DirtyLog, GuestMemory, type MemoryAccessor } from "@virtmesh/virtqueue";
import { CompletionRing, COMPLETION_DOORBELL_OFFSET, CRING_F_EVENT_IDX, CRING_F_LOG_ALL, TRACE_WORKER } from "@virtmesh/virtio-blk";

export interface AttachSpec {
  vm: string;
  device: string;
  index: number;
  cringPath: string;
  callPath: string;
  memoryPath: string;
  deviceDirtyLogPath: string;
  eventIdx: boolean;
}

export class QueueCompleter {
  completed = 0;
  interrupts = 0;
  suppressed = 0;
  errors = 0;
  /** Inodes of the ring and memory files (one consumer per ring; set by the owner). */
  ringIno = 0;
  memIno = 0;
  private readonly cringMap: SharedMapping;
  private readonly cring: CompletionRing;
  private readonly bell: Doorbell;
  private readonly call: Doorbell;
  private readonly memMap: SharedMapping;
  private readonly logMap: SharedMapping | null;
  private readonly log: DirtyLog | null;
  private readonly q: DeviceQueue;
  private readonly dev: MemoryAccessor;
  private running = true;
  private loop: Promise<void> | null = null;
  private closed = false;

  /**
   * Maps the ring, guest memory and the log and checks the ring header; does not
   * consume yet (start()), so that a caller can open a replacement before it
   * detaches the queue it replaces and give up with nothing changed.
   */
  constructor(readonly spec: AttachSpec, private readonly onError: (msg: string) => void) {
    const maps: SharedMapping[] = [];
    try {
      const cringBytes = statSync(spec.cringPath).size;
      this.cringMap = mapFile(spec.cringPath, cringBytes);
      maps.push(this.cringMap);
      this.cring = CompletionRing.open(this.cringMap.buffer);
      const memBytes = statSync(spec.memoryPath).size;
      this.memMap = mapFile(spec.memoryPath, memBytes);
      maps.push(this.memMap);
      if (spec.deviceDirtyLogPath) {
        this.logMap = mapFile(spec.deviceDirtyLogPath, statSync(spec.deviceDirtyLogPath).size);
        maps.push(this.logMap);
        this.log = new DirtyLog(this.logMap.buffer, memBytes, { enabled: (this.cring.flags & CRING_F_LOG_ALL) !== 0 });
      } else {
        this.logMap = null;
        this.log = null;
      }
      const mem = new GuestMemory(this.memMap.buffer, { size: memBytes, deviceLog: this.log });
      this.dev = mem.device;
      // The queue placement comes from the ring header vhost-worker wrote at
      // BLK_SET_BACKEND; used->idx is read from guest memory (only devices write it).
      const eventIdx = spec.eventIdx || (this.cring.flags & CRING_F_EVENT_IDX) !== 0;
      this.q = new DeviceQueue(mem, { ...this.cring.queue, eventIdx });
      this.call = Doorbell.open(spec.callPath);
      this.bell = Doorbell.attach(this.cringMap, COMPLETION_DOORBELL_OFFSET, false);
    } catch (e) {
      for (const m of maps) m.unmap();
      throw e;
    }
  }

  /** The pid the ring header names as its consumer (0: none). */
  get ringConsumerPid(): number {
    return this.cring.consumerPid;
  }

  /** Starts consuming the ring (once). */
  start(): this {
    if (this.loop || !this.running) return this;
    this.cring.consumerPid = process.pid;
    this.loop = this.run();
    return this;
  }

  private async run(): Promise<void> {
    const ring = this.cring;
    // A restarted consumer resumes after the last element whose used->idx store
    // (the commit point) happened; the rest of its last batch is done again.
    let head = ring.recoverHead(this.q.usedIdx);
    ring.consumeTo(head);
    const check = (): boolean => !this.running || ring.tail !== head;
    while (this.running) {
      const tail = ring.tail;
      if (tail === head) {
        await this.bell.spinThenWait(check, { maxSpinUs: 20 }).catch(() => {
          this.running = false;
        });
        continue;
      }
      if (this.log) this.log.enabled = (ring.flags & CRING_F_LOG_ALL) !== 0;
      let spans: Span[] | null = null;
      ring.beginBatch(head, this.q.usedIdx);
      for (; head !== tail; head = (head + 1) >>> 0) {
        const statusAddr = ring.entryStatusAddr(head);
        // Sampled requests only (the worker left its span id in the head's trace slot).
        if (ring.traceState(ring.entryId(head)) === TRACE_WORKER) (spans ??= []).push(this.startSpan(ring.entryId(head), ring.entryStatus(head)));
        try {
          const id = ring.entryId(head);
          this.dev.writeU8(statusAddr, ring.entryStatus(head));
          // Free in the inflight region before publishing: once used->idx moves the guest may reuse the head.
          ring.markFree(id);
          this.q.addUsed(id, ring.entryLen(head));
          this.completed++;
        } catch (e) {
          // The worker only pushes validated heads and addresses; anything else is a bug, not guest input.
          this.errors++;
          this.onError(`completion for ${this.spec.vm}/${this.spec.device}: ${(e as Error).message}`);
        }
      }
      ring.consumeTo(head);
      const signal = this.q.needsInterrupt();
      if (signal) {
        this.interrupts++;
        this.call.ring();
      } else this.suppressed++;
      if (spans) for (const s of spans) s.setAttribute("virtio.interrupt", signal).end();
    }
  }

  /** The completion span of one sampled request: status byte, used ring, signal; child of the worker's span. */
  private startSpan(id: number, status: number): Span {
    const t = this.cring.readTrace(id);
    const parent = trace.setSpanContext(context.active(), { traceId: t.traceId, spanId: t.workerSpanId, traceFlags: t.traceFlags || TraceFlags.SAMPLED, isRemote: true });
    return trace.getTracer("virtmesh.completion-thread").startSpan(
      "vhost-blk complete",
      { kind: SpanKind.CONSUMER, attributes: { "virtio.vm": this.spec.vm, "virtio.device": this.spec.device, "virtio.head": id, "virtio_blk.status": status } },
      parent,
    );
  }

  async detach(): Promise<number> {
    if (this.closed) return this.completed;
    this.closed = true;
    const started = this.loop !== null;
    this.running = false;
    if (started) {
      this.bell.ring();
      await this.loop;
      if (this.cring.consumerPid === process.pid) this.cring.consumerPid = 0;
    }
    this.bell.close();
    this.call.close();
    this.cringMap.unmap();
    this.logMap?.unmap();
    this.memMap.unmap();
    return this.completed;
  }
}
