// Shared control block and messages between the vCPU runner and its workers.
import type { LockKind } from "./ticket";

export const CTL = {
  DONE: 0,
  HOLDER: 1, // cpu + 1 of the vCPU holding the lock in "hold" mode
  SLEEP: 2, // never notified: Atomics.wait on it is a timed sleep
  STOP: 3, // set: loops end after their current round (time budget reached)
  NR_VCPUS: 4, // vCPUs in the run
  STARTED: 5, // vCPUs that have acquired the lock at least once
  STEADY_OPS: 6, // the shared counter when the last vCPU first got the lock (0 = not yet)
  // Float64 slots (index into a Float64Array over the first 64 bytes of the block), times
  // as performance.timeOrigin + performance.now() so that all threads share one clock:
  STEADY_T_F64: 4, // words 8-9: when every vCPU of the run had acquired the lock once
  END_T_F64: 5, // words 10-11: when the last vCPU finished its rounds
  COUNTER: 16, // the shared counter, on its own cache line
  HOOKS: 32, // per race point: [armed cpu + 1, reached, gate, -]
  HOOK_STRIDE: 4,
  GO: 64, // per cpu: run generation to start
  ACQUIRED: 64 + 1024, // per cpu: rounds done
  RELEASE: 64 + 2048, // per cpu: "hold" mode may unlock
  MAX_CPUS: 1024,
  WORDS: 64 + 3 * 1024,
} as const;

export interface RandomDelays {
  /** Up to this many work iterations inside and after each critical section. */
  maxSpin: number;
  /** One in this many delays also sleeps (the vCPU is preempted); 0 = never. */
  sleepOneIn: number;
  maxSleepMs: number;
}

export interface VcpuWorkerData {
  sab: SharedArrayBuffer;
  spaceByteOffset: number;
  ctlByteOffset: number;
  cpu: number;
}

export interface VcpuRunParams {
  gen: number;
  kind: LockKind;
  pv: boolean;
  unfair: boolean;
  mode: "loop" | "hold";
  iterations: number;
  criticalSectionWork: number;
  outsideWork: number;
  random?: RandomDelays;
  seed: number;
  hooks: boolean;
}

export type VcpuMessage = { type: "tid"; cpu: number; gen: 0; tid: number } | { type: "ready"; cpu: number; gen: number } | { type: "done"; cpu: number; gen: number; ms: number; sink: number };
