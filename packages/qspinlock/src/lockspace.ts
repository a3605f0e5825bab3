// A lock space: header, lock words and per-CPU lock data in shared memory, and
// the two hypervisor operations the PV locks need (halt and kick), modelled on
// KVM: halt is HLT with the vCPU's pv_unhalted flag checked (a kick that comes
// before the vCPU blocks makes the HLT return at once), kick is the
// KVM_HC_KICK_CPU hypercall (set pv_unhalted, wake the vCPU thread).
import type { LockSpaceGeometry, LockStats } from "./layout";
import * as Layout from "./layout";
// Imported bindings become getter calls once transpiled to CommonJS; the hot
// paths read these module-level copies instead.
const { HDR_HALT_TIMEOUT_US, HDR_MAGIC, HDR_MAX_CPUS, HDR_NR_LOCKS, HDR_PLE_LAST_BOOSTED, HDR_PLE_WINDOW, HDR_WORDS, LOCKSPACE_MAGIC, PC_HV_HALTED, PC_HV_IDLE, PC_HV_READY, PC_HV_RUNGEN, PC_HV_UNHALT, PC_HV_YIELDERS, PC_STATS, STAT_COUNT, STAT_NAMES, Stat, _Q_TAIL_CPU_BITS, lockSpaceBytes, lockWordIndex, percpuBase, qnodeBase } = Layout;

/** Result of LockSpace.halt(). */
export const HALT_ABORTED = -1; // state changed before blocking: no halt
export const HALT_SPURIOUS = 0; // woke without a kick (timer "interrupt")
export const HALT_KICKED = 1; // woken by (or returned at once because of) a kick

/** Points where a vCPU may be paused to exercise the seed header's two races. */
export const RacePoint = {
  /** Race 1: queue head set cpustate = HALTED, before cmpxchg(lock byte, LOCKED, SLOWPATH). */
  qheadBeforeSlowpathCmpxchg: 0,
  /** Race 1: queue head's cmpxchg to _Q_LOCKED_SLOWPATH done, before __queue_halt_cpu. */
  qheadBeforeHalt: 1,
  /** Race 2 step [3] done (cpustate = HALTED), before step [4] (check qhead). */
  qnodeBeforeQheadCheck: 2,
  /** Race 2 step [1] done (next->qhead = true), before step [2] (pv_halt_check). */
  handoffBeforeHaltCheck: 3,
  /** queue_spin_unlock_slowpath: lock released, before pv_kick_node. */
  unlockBeforeKick: 4,
} as const;
export type RacePointName = keyof typeof RacePoint;
export const RACE_POINT_COUNT = 5;
export type RaceHook = (point: number, cpu: number) => void;

/**
 * PLE: a runnable vCPU whose run generation has not moved for this long, as
 * seen by a spinning vCPU, is taken to be preempted (kvm vcpu->preempted /
 * ready, which KVM learns from its sched-out notifier; see pleExit).
 */
export const PLE_PREEMPTED_US = 50;
/** PLE: a directed yield gives up the host core until the target has run, at most this long. */
export const PLE_YIELD_MAX_US = 1000;

export interface LockSpaceInit {
  maxCpus: number;
  nrLocks?: number;
  /**
   * 0: a halted vCPU sleeps until kicked. N > 0: it also wakes after N µs
   * without a kick, as a timer interrupt would (counted as spurious wake-ups).
   */
  haltTimeoutUs?: number;
  /**
   * Pause-loop exiting (a host feature, as VMX PLE / SVM pause filtering):
   * 0 (default) = off, a spin loop never leaves its host core. N > 0 (a power
   * of 2): after every N cpu_relax() iterations of a lock spin loop the vCPU
   * takes a pause-loop exit and the host runs kvm_vcpu_on_spin() (see
   * LockSpace.pleExit). PLE_WINDOW_SPINS is a KVM-like window.
   */
  pleWindow?: number;
}

export class LockSpace implements LockSpaceGeometry {
  readonly i32: Int32Array;
  readonly maxCpus: number;
  readonly nrLocks: number;
  private readonly haltTimeoutMs: number;
  /**
   * PLE window - 1, or -1 without PLE. Spin loops test `(++spins & pleMask) === 0`
   * and call pleExit(): one AND and one never-taken branch when PLE is off.
   */
  readonly pleMask: number;
  // This thread's view of the other vCPUs for the PLE "preempted" test: the
  // run generation last seen and when it was first seen (performance.now()).
  private readonly pleSeenGen: Int32Array;
  private readonly pleSeenAt: Float64Array;

  private constructor(
    readonly sab: SharedArrayBuffer,
    readonly byteOffset: number,
  ) {
    const hdr = new Int32Array(sab, byteOffset, HDR_WORDS);
    if (Atomics.load(hdr, HDR_MAGIC) !== LOCKSPACE_MAGIC) throw new Error(`no lock space at byte offset ${byteOffset} (bad magic)`);
    this.maxCpus = Atomics.load(hdr, HDR_MAX_CPUS);
    this.nrLocks = Atomics.load(hdr, HDR_NR_LOCKS);
    const us = Atomics.load(hdr, HDR_HALT_TIMEOUT_US);
    this.haltTimeoutMs = us > 0 ? us / 1000 : Infinity;
    const win = Atomics.load(hdr, HDR_PLE_WINDOW);
    this.pleMask = win > 0 ? win - 1 : -1;
    this.pleSeenGen = new Int32Array(win > 0 ? this.maxCpus : 0);
    this.pleSeenAt = new Float64Array(win > 0 ? this.maxCpus : 0);
    const bytes = lockSpaceBytes(this.maxCpus, this.nrLocks);
    if (byteOffset + bytes > sab.byteLength) throw new Error(`lock space at ${byteOffset} (${bytes} bytes) overruns the ${sab.byteLength}-byte buffer`);
    this.i32 = new Int32Array(sab, byteOffset, bytes / 4);
  }

  /** Lays out a fresh lock space (zeroed) at byteOffset and returns it. Call before sharing the region. */
  static init(sab: SharedArrayBuffer, byteOffset: number, init: LockSpaceInit): LockSpace {
    const nrLocks = init.nrLocks ?? 1;
    const maxCpus = init.maxCpus;
    if (!Number.isInteger(maxCpus) || maxCpus < 1 || maxCpus >= 1 << _Q_TAIL_CPU_BITS) throw new RangeError(`maxCpus must be an integer in 1..${(1 << _Q_TAIL_CPU_BITS) - 1}, got ${maxCpus}`);
    if (!Number.isInteger(nrLocks) || nrLocks < 1) throw new RangeError(`nrLocks must be a positive integer, got ${nrLocks}`);
    if (byteOffset % 64 !== 0) throw new RangeError(`lock space byte offset must be 64-byte aligned, got ${byteOffset}`);
    const pleWindow = init.pleWindow ?? 0;
    if (!Number.isInteger(pleWindow) || pleWindow < 0 || pleWindow > 1 << 30 || (pleWindow & (pleWindow - 1)) !== 0) throw new RangeError(`pleWindow must be 0 (no PLE) or a power of 2 up to 2^30, got ${pleWindow}`);
    const bytes = lockSpaceBytes(maxCpus, nrLocks);
    if (byteOffset + bytes > sab.byteLength) throw new RangeError(`lock space needs ${bytes} bytes at ${byteOffset}; buffer has ${sab.byteLength}`);
    const i32 = new Int32Array(sab, byteOffset, bytes / 4);
    for (let i = 0; i < i32.length; i++) Atomics.store(i32, i, 0);
    Atomics.store(i32, HDR_MAX_CPUS, maxCpus);
    Atomics.store(i32, HDR_NR_LOCKS, nrLocks);
    Atomics.store(i32, HDR_HALT_TIMEOUT_US, Math.max(0, Math.floor(init.haltTimeoutUs ?? 0)));
    Atomics.store(i32, HDR_PLE_WINDOW, pleWindow);
    Atomics.store(i32, HDR_PLE_LAST_BOOSTED, maxCpus - 1);
    Atomics.store(i32, HDR_MAGIC, LOCKSPACE_MAGIC);
    return new LockSpace(sab, byteOffset);
  }

  /** Attaches to a lock space another thread laid out. */
  static attach(sab: SharedArrayBuffer, byteOffset: number): LockSpace {
    return new LockSpace(sab, byteOffset);
  }

  lockWord(lock: number): number {
    if (!Number.isInteger(lock) || lock < 0 || lock >= this.nrLocks) throw new RangeError(`lock index ${lock} out of range 0..${this.nrLocks - 1}`);
    return lockWordIndex(lock);
  }
  percpu(cpu: number): number {
    return percpuBase(this, cpu);
  }
  qnode(node: number): number {
    return qnodeBase(this, node);
  }
  checkCpu(cpu: number): void {
    if (!Number.isInteger(cpu) || cpu < 0 || cpu >= this.maxCpus) throw new RangeError(`cpu ${cpu} out of range 0..${this.maxCpus - 1}`);
  }

  /** Adds n to a per-CPU statistic; only the owning vCPU writes its slots, so plain access suffices. */
  stat(cpu: number, s: number, n = 1): void {
    this.i32[percpuBase(this, cpu) + PC_STATS + s] += n;
  }

  /**
   * Hypervisor halt of vCPU `cpu` (the seed's __queue_halt_cpu on KVM): if
   * stateIdx >= 0 and that word no longer holds sval, do not halt. Otherwise
   * block the vCPU thread until a kick (pv_unhalted) or, if configured, a
   * timer wake-up. A kick sent before the thread blocks is not lost: it
   * leaves pv_unhalted set and Atomics.wait returns at once.
   *
   * As on KVM, only a halt consumes pv_unhalted, so a kick that did not end
   * the halt it was sent for stays pending. That happens whenever the kicker's
   * xchg(cpustate, PV_CPU_KICKED) saw PV_CPU_HALTED but the waiter did not
   * block: its halt aborted here on the changed state word (race 1, sequence
   * 1,2 with the kick before the halt), or, as a queue node, it saw qhead at
   * step [4] and never halted (race 2, sequence 3,1,2,4). The vCPU's next halt
   * then returns at once with its cpustate still PV_CPU_HALTED, which the seed
   * counts as PV_WAKE_SPURIOUS; the lock code just re-checks and spins or
   * halts again. Only a wake-up with no kick at all (the timer) counts as
   * hvTimerWakes.
   */
  halt(cpu: number, stateIdx: number, sval: number): number {
    const i32 = this.i32;
    const pc = percpuBase(this, cpu);
    if (stateIdx >= 0 && Atomics.load(i32, stateIdx) !== sval) {
      i32[pc + PC_STATS + Stat.haltAborted]++;
      return HALT_ABORTED;
    }
    const unhalt = pc + PC_HV_UNHALT;
    if (Atomics.exchange(i32, unhalt, 0) !== 0) return HALT_KICKED;
    Atomics.store(i32, pc + PC_HV_HALTED, 1);
    i32[pc + PC_STATS + Stat.hvBlocks]++;
    const t0 = performance.now();
    Atomics.wait(i32, unhalt, 0, this.haltTimeoutMs);
    const kicked = Atomics.exchange(i32, unhalt, 0) !== 0;
    Atomics.store(i32, pc + PC_HV_HALTED, 0);
    if (!kicked) i32[pc + PC_STATS + Stat.hvTimerWakes]++;
    i32[pc + PC_STATS + Stat.haltedUs] += Math.round((performance.now() - t0) * 1000);
    if (this.pleMask >= 0) {
      // Running again (kvm_sched_in): no longer ready, and yielders may go.
      Atomics.store(i32, pc + PC_HV_READY, 0);
      this.vcpuRan(cpu);
    }
    return kicked ? HALT_KICKED : HALT_SPURIOUS;
  }

  /** Hypervisor kick (KVM_HC_KICK_CPU) of vCPU `target`, issued by vCPU `cpu`. */
  kick(cpu: number, target: number): void {
    const i32 = this.i32;
    const unhalt = percpuBase(this, target) + PC_HV_UNHALT;
    Atomics.store(i32, unhalt, 1);
    Atomics.notify(i32, unhalt, 1);
    // kvm_vcpu_wake_up() marks a vCPU it wakes ready: a directed-yield target.
    if (this.pleMask >= 0 && Atomics.load(i32, percpuBase(this, target) + PC_HV_HALTED) === 1) Atomics.store(i32, percpuBase(this, target) + PC_HV_READY, 1);
    i32[percpuBase(this, cpu) + PC_STATS + Stat.kickCpu]++;
  }

  /**
   * PLE bookkeeping, called on vCPU `cpu`'s own thread: the host sees the
   * vCPU running (its run generation moves) and vCPUs that directed-yielded
   * to it may take their cores back. KVM learns this from its preempt
   * notifiers (kvm_sched_in); a worker thread has none, so the vCPU reports
   * it: from halt, from every pause-loop exit, and from whatever runs its
   * guest code (VcpuPool's worker: once per lock round). No-op without PLE.
   */
  vcpuRan(cpu: number): void {
    if (this.pleMask < 0) return;
    const i32 = this.i32;
    const pc = percpuBase(this, cpu);
    Atomics.add(i32, pc + PC_HV_RUNGEN, 1);
    if (Atomics.load(i32, pc + PC_HV_YIELDERS) !== 0) Atomics.notify(i32, pc + PC_HV_RUNGEN);
  }

  /**
   * Marks vCPU `cpu` idle (runs no guest code: never a directed-yield target,
   * as an idle vCPU sits in HLT on KVM) or running. A fresh lock space has
   * every vCPU running; VcpuPool marks the ones without a task idle.
   */
  setVcpuIdle(cpu: number, idle: boolean): void {
    Atomics.store(this.i32, percpuBase(this, cpu) + PC_HV_IDLE, idle ? 1 : 0);
    if (!idle) this.vcpuRan(cpu);
  }

  /**
   * Pause-loop exit of vCPU `cpu` after a PLE window of spinning: VMX
   * handle_pause() -> kvm_vcpu_on_spin(). Scans the VM's other vCPUs
   * round-robin from kvm->last_boosted_vcpu for one that is ready: kicked out
   * of a halt and not yet running (vcpu->ready set by kvm_vcpu_wake_up), or
   * runnable but preempted (vcpu->ready set by kvm_sched_out). Halted vCPUs
   * without a kick and idle ones are skipped. If one is found, yield the host
   * core to it (yield_to), else return to the guest at once.
   *
   * Preempted is judged from the outside, as no preempt notifier exists here:
   * a vCPU that is neither halted nor idle and whose run generation (see
   * vcpuRan) this thread has seen unchanged for PLE_PREEMPTED_US. A vCPU in a
   * long stretch of guest code that reports nothing (a long critical
   * section) also passes; yielding to a running vCPU is a wasted exit here
   * where KVM's yield_to would fail and try the next one.
   *
   * The yield: Atomics.wait on the target's run generation, until the target
   * reports that it ran (vcpuRan notifies) or PLE_YIELD_MAX_US. Atomics.wait
   * blocks the thread in the kernel (futex), so the host scheduler takes it
   * off the run queue and the core really goes to a runnable thread; the
   * other spinning vCPUs exit and yield alike within a PLE window, so the
   * preempted target is soon the one left to run. Not returning before the
   * target has run stands in for yield_to()'s next-buddy preference, which a
   * user-space thread cannot express. Rejected: spinning on (frees nothing),
   * sched_yield (not available to JS, and a near no-op under CFS), a fixed
   * sleep (would make the yield's length up rather than follow the target).
   * The bound is needed because the emulation cannot tell a preempted target
   * from a running one that reports nothing.
   */
  pleExit(cpu: number): void {
    if (this.pleMask < 0) return;
    const i32 = this.i32;
    const pc = percpuBase(this, cpu);
    i32[pc + PC_STATS + Stat.pleExits]++;
    this.vcpuRan(cpu);
    const now = performance.now();
    const n = this.maxCpus;
    const seenGen = this.pleSeenGen;
    const seenAt = this.pleSeenAt;
    let c = Atomics.load(i32, HDR_PLE_LAST_BOOSTED);
    for (let k = 0; k < n; k++) {
      if (++c >= n) c = 0;
      if (c === cpu) continue;
      const b = percpuBase(this, c);
      if (Atomics.load(i32, b + PC_HV_IDLE) !== 0) continue;
      const gen = Atomics.load(i32, b + PC_HV_RUNGEN);
      let ready = Atomics.load(i32, b + PC_HV_READY) !== 0;
      if (gen !== seenGen[c]) {
        seenGen[c] = gen; // it ran since we last looked
        seenAt[c] = now;
      } else if (!ready && Atomics.load(i32, b + PC_HV_HALTED) === 0 && (now - seenAt[c]!) * 1000 >= PLE_PREEMPTED_US) {
        ready = true; // runnable, not seen running for a while: preempted
      }
      if (!ready) continue;
      Atomics.store(i32, HDR_PLE_LAST_BOOSTED, c);
      i32[pc + PC_STATS + Stat.pleYields]++;
      Atomics.add(i32, b + PC_HV_YIELDERS, 1);
      Atomics.wait(i32, b + PC_HV_RUNGEN, gen, PLE_YIELD_MAX_US / 1000);
      Atomics.sub(i32, b + PC_HV_YIELDERS, 1);
      this.vcpuRan(cpu); // back on a core
      return;
    }
  }

  /** True while vCPU `cpu`'s thread is blocked in halt (its mp_state is HALTED). */
  isHalted(cpu: number): boolean {
    return Atomics.load(this.i32, percpuBase(this, cpu) + PC_HV_HALTED) === 1;
  }

  /** Sum of the per-CPU statistics. Exact once the vCPUs have stopped. */
  stats(): LockStats {
    const out = {} as LockStats;
    for (const n of STAT_NAMES) out[n] = 0;
    for (let cpu = 0; cpu < this.maxCpus; cpu++) {
      const base = percpuBase(this, cpu) + PC_STATS;
      for (let s = 0; s < STAT_COUNT; s++) out[STAT_NAMES[s]!] += Atomics.load(this.i32, base + s);
    }
    return out;
  }

  /** One vCPU's statistics. */
  statsOf(cpu: number): LockStats {
    this.checkCpu(cpu);
    const out = {} as LockStats;
    const base = percpuBase(this, cpu) + PC_STATS;
    for (let s = 0; s < STAT_COUNT; s++) out[STAT_NAMES[s]!] = Atomics.load(this.i32, base + s);
    return out;
  }

  resetStats(): void {
    for (let cpu = 0; cpu < this.maxCpus; cpu++) {
      const base = percpuBase(this, cpu) + PC_STATS;
      for (let s = 0; s < STAT_COUNT; s++) Atomics.store(this.i32, base + s, 0);
    }
  }
}
