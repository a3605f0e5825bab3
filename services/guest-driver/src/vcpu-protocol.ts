// Messages between the boot CPU (the service's main thread) and its vCPU workers.
import type { LockKind } from "@virtmesh/qspinlock";
import type { QueueConfig } from "@virtmesh/virtqueue";
import type { FioParams, FioPartial, FioVcpuState, TraceParent } from "./fio";
import type { KernelGeometry } from "./kernel";
import type { StressWalkerState } from "./stress";

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
  /**
   * The VM's vCPU dirty log file (VmLayout.dirty_log_path: what KVM_GET_DIRTY_LOG
   * reports); every guest write of the vCPU is recorded there while dirty
   * logging is on. Absent: writes are not logged.
   */
  vcpuDirtyLogPath?: string;
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

/** The dirtying walk on this vCPU: its part of the working set and its share of the rate. */
export interface VcpuStressStart {
  type: "stress-start";
  addr: number;
  pages: number;
  /** Pages per ms for this vCPU; 0: flat out. */
  ratePagesPerMs: number;
  /** Float64Array words [2 * cpu]: pages written, [2 * cpu + 1]: passes (the boot CPU reads them). */
  stats: SharedArrayBuffer;
}

/** One vCPU's workloads between two steps (saved while paused). */
export interface VcpuWorkloadState {
  stress: { walk: StressWalkerState; ratePagesPerMs: number } | null;
  fio: { state: FioVcpuState; started: boolean; lock: SpinlockConfig } | null;
}

export type VcpuCommand =
  | VcpuRun
  | VcpuStressStart
  | { type: "exit" }
  | { type: "stress-stop" }
  /** Auto-converge (QEMU cpu_throttle_set): sleep pct % of every 10 ms slice. */
  | { type: "throttle"; pct: number }
  /** The sidecar's "dirty-logging" switch, relayed by the boot CPU (KVM_MEM_LOG_DIRTY_PAGES). */
  | { type: "dirty-logging"; enabled: boolean }
  | { type: "pause" }
  | { type: "resume" }
  | { type: "save" }
  /** Loads saved workloads (stays paused); a restored fio run reports under gen. */
  | { type: "restore"; state: VcpuWorkloadState; gen: number; stats: SharedArrayBuffer }
  /** The workloads went on elsewhere (migrated): forget them without touching guest memory. */
  | { type: "drop" };

export type VcpuReply =
  | { type: "ready"; gen: 0; cpu: number }
  | { type: "done"; gen: number; cpu: number; partial: FioPartial }
  | { type: "error"; gen: number; cpu: number; message: string }
  | { type: "ack"; gen: 0; cpu: number; what: "stress-start" | "stress-stop" | "pause" | "restore" | "drop" }
  | { type: "saved"; gen: 0; cpu: number; state: VcpuWorkloadState };
