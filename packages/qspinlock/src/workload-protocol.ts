// Shared control block and messages between the vCPU runner and its workers.
import type { LockKind } from "./ticket";

export const CTL = {
  DONE: 0,
  HOLDER: 1, // cpu + 1 of the vCPU holding the lock in "hold" mode
  SLEEP: 2, // never notified: Atomics.wait on it is a timed sleep
  STOP: 3, // set: loops end after their current round (time budget reached)
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
