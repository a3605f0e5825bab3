// The parts of an ActiveQueue (queue.ts) that run once: its options, opening the
// completion ring, the limits it serves, and the span of a sampled request.
import { mkdirSync, rmSync, statSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { dirname } from "node:path";
import { context, trace, SpanKind, TraceFlags } from "@opentelemetry/api";
import { Doorbell, mapFile, type SharedMapping } from "@virtmesh/shm";
import type { DirtyLog, GuestMemory, QueueConfig } from "@virtmesh/virtqueue";
import { BLK_MAX_DISCARD_SEG, BLK_MAX_ZEROES_BYTES, BLK_SEG_MAX, CompletionRing, COMPLETION_DOORBELL_OFFSET, blkTypeName, completionRingBytes, type BlkLimits } from "@virtmesh/virtio-blk";
import type { BlkBackend } from "./backend";
import type { IobandBinding } from "./ioband";

export type CompletionMode = "parallel" | "serialized";

/** The doorbells the ioctls set (SET_VRING_KICK / CALL may replace them while the queue runs). */
export interface VringFiles {
  readonly kick: Doorbell | null;
  readonly call: Doorbell | null;
}

export interface QueueStats {
  requests: number;
  kicks: number;
  interrupts: number;
  errors: number;
}

/** fresh: a new completion ring (BLK_SET_BACKEND). reuse: the drained ring of a queue GET_VRING_BASE stopped. recover: a restarted worker's ring, inflight heads re-submitted. */
export type RingStart = "fresh" | "reuse" | "recover";

export interface ActiveQueueOptions {
  vm: string;
  device: string;
  memory: GuestMemory;
  log: DirtyLog | null;
  queue: QueueConfig;
  /** SET_VRING_BASE: where popping starts (ignored by "recover": the inflight region says). */
  base: number;
  limits: BlkLimits;
  backend: BlkBackend;
  mode: CompletionMode;
  files: VringFiles;
  ioband: IobandBinding | null;
  cringPath: string;
  cringFlags: number;
  ring: RingStart;
  stats: QueueStats;
  onNeedsReset(reason: string): void;
}

/** What a "recover" start found in the inflight region (logged by the worker). */
export interface RecoveredHeads {
  submitted: number;
  pushed: number;
  pushedNotMarked: number;
  ringPending: number;
  lastAvailIdx: number;
  usedIdx: number;
}

/** Opens the completion ring the way `o.ring` says (see RingStart). */
export function openRing(o: ActiveQueueOptions): { map: SharedMapping; ring: CompletionRing; bell: Doorbell } {
  const n = o.queue.size;
  if (o.ring !== "fresh") {
    const map = mapFile(o.cringPath, statSync(o.cringPath).size);
    try {
      const ring = CompletionRing.open(map.buffer);
      if (ring.entries !== n) throw new Error(`completion ring ${o.cringPath} has ${ring.entries} entries, the vring ${n}`);
      if (o.ring === "reuse") ring.flags = o.cringFlags;
      return { map, ring, bell: Doorbell.attach(map, COMPLETION_DOORBELL_OFFSET, false) };
    } catch (e) {
      map.unmap();
      throw e;
    }
  }
  rmSync(o.cringPath, { force: true });
  mkdirSync(dirname(o.cringPath), { recursive: true });
  const map = mapFile(o.cringPath, completionRingBytes(n), { create: true, mode: 0o600 });
  const ring = CompletionRing.init(map.buffer, { size: n, descAddr: o.queue.descAddr, availAddr: o.queue.availAddr, usedAddr: o.queue.usedAddr }, o.cringFlags);
  return { map, ring, bell: Doorbell.attach(map, COMPLETION_DOORBELL_OFFSET, true) };
}

/** The limits a vhost-blk device offers (config space seg_max, max_discard_seg, max_*_sectors) over a backend. */
export function blkLimits(features: bigint, backend: BlkBackend): BlkLimits {
  return { features, capacityBytes: backend.capacityBytes, segMax: BLK_SEG_MAX, maxDiscardSeg: BLK_MAX_DISCARD_SEG, maxZeroesBytes: BLK_MAX_ZEROES_BYTES };
}

/** The worker's span for one sampled request: from pop to I/O completion, child of the guest's span. */
export function traceRequest(ring: CompletionRing, head: number, o: { vm: string; device: string }, type: number, sector: number, t0: number, status: number, mode: CompletionMode): void {
  const t = ring.readTrace(head);
  const parent = trace.setSpanContext(context.active(), { traceId: t.traceId, spanId: t.guestSpanId, traceFlags: t.traceFlags || TraceFlags.SAMPLED, isRemote: true });
  const span = trace.getTracer("virtmesh.vhost-blk").startSpan(
    `vhost-blk ${blkTypeName(type)}`,
    {
      kind: SpanKind.SERVER,
      startTime: performance.timeOrigin + t0,
      attributes: { "virtio.vm": o.vm, "virtio.device": o.device, "virtio.head": head, "virtio_blk.sector": sector, "virtio_blk.status": status, "vhost.completion_mode": mode },
    },
    parent,
  );
  span.end();
  ring.writeWorkerSpan(head, span.spanContext().spanId);
}

/** Per-head request state of a queue (index = head), sized once: nothing is allocated per request. */
export class HeadTable {
  readonly ops: Uint16Array;
  readonly status: Uint8Array;
  readonly usedLen: Uint32Array;
  readonly statusAddr: Float64Array;
  /** 1: OUT (data pages not dirtied by the device). */
  readonly write: Uint8Array;
  readonly segs: Uint8Array;
  /** [head * segMax + i] */
  readonly segAddr: Float64Array;
  readonly segLen: Uint32Array;
  /** Pop time, for the span of a sampled request. */
  readonly t0: Float64Array;
  readonly type: Uint32Array;
  readonly sector: Float64Array;
  /** 1: submitted to the ioband device, complete() owed. */
  readonly iob: Uint8Array;
  constructor(n: number, segMax: number) {
    this.ops = new Uint16Array(n);
    this.status = new Uint8Array(n);
    this.usedLen = new Uint32Array(n);
    this.statusAddr = new Float64Array(n);
    this.write = new Uint8Array(n);
    this.segs = new Uint8Array(n);
    this.segAddr = new Float64Array(n * segMax);
    this.segLen = new Uint32Array(n * segMax);
    this.t0 = new Float64Array(n);
    this.type = new Uint32Array(n);
    this.sector = new Float64Array(n);
    this.iob = new Uint8Array(n);
  }

  /** A popped request starts: OK until an operation fails, no segments yet. */
  begin(head: number, type: number, sector: number, statusAddr: number, usedLen: number, t0: number): void {
    this.statusAddr[head] = statusAddr;
    this.t0[head] = t0;
    this.type[head] = type;
    this.sector[head] = sector;
    this.usedLen[head] = usedLen;
    this.status[head] = 0; // VIRTIO_BLK_S_OK
    this.ops[head] = 0;
    this.segs[head] = 0;
    this.write[head] = 0;
  }
}
