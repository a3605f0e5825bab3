// Messages between the boot CPU (the service's main thread) and its vCPU workers.
import type { LockKind } from "@virtmesh/qspinlock";
import type { QueueConfig } from "@virtmesh/virtqueue";
import type { FioParams, FioPartial, TraceParent } from "./fio";
import type { KernelGeometry } from "./kernel";

/** workerData of a vCPU thread: where the guest's memory, queue and kernel memory are. */
export interface VcpuBoot {
  cpu: number;
  kernelSab: SharedArrayBuffer;
  geom: KernelGeometry;
  memoryPath: string;
  memoryBytes: number;
  kickPath: string;
  /** The queue's interrupt doorbell: an idle vCPU halts on it and takes the interrupt. */
  callPath: string;
  queue: QueueConfig;
  indirectArea: { addr: number; maxIndirect: number } | null;
  reqArea: number;
  dataBase: number;
  maxBs: number;
  /** Request slots of the blk driver, the control slot (the last) included. */
  slots: number;
  diskBytes: number;
  /** The completion ring file whose per-head trace slots carry sampled requests, or null. */
  completionRing: { path: string; bytes: number } | null;
}

export interface SpinlockConfig {
  kind: LockKind;
  pv: boolean;
  unfair: boolean;
}

export interface VcpuRun {
  type: "run";
  gen: number;
  params: FioParams;
  jobs: number[];
  runId: number;
  parent: TraceParent | null;
  traceEvery: number;
  /** Epoch ms at which runtime ends, or null. */
  deadlineEpochMs: number | null;
  lock: SpinlockConfig;
}

export type VcpuReply =
  | { type: "ready"; gen: 0; cpu: number }
  | { type: "done"; gen: number; cpu: number; partial: FioPartial }
  | { type: "error"; gen: number; cpu: number; message: string };
