// Queue spinlock (kernel/locking/qspinlock.c) with the seed's para-virtual
// support (arch/x86/include/asm/pvqspinlock.h, PATCH v9 17/19).
//
// Sub-word atomics: the kernel updates the locked byte and the tail halfword
// of the 32-bit lock word with byte/halfword stores, xchg and cmpxchg. Here
// every access is a 32-bit Atomics operation on the whole word:
//  - byte store 0 (unlock)           -> Atomics.and(word, ~0xff): one atomic RMW
//  - byte store SLOWPATH (holder)    -> Atomics.or(word, 2): the holder owns the byte (1 or 3)
//  - cmpxchg(locked byte)            -> CAS loop on the word, retried only when
//                                       another byte changed (never when the byte differs)
//  - xchg_tail (halfword xchg)       -> CAS loop on the word (the kernel's own
//                                       variant for _Q_PENDING_BITS != 8)
//  - clear_pending_set_locked        -> Atomics.add(word, LOCKED - PENDING)
// The differences: the plain byte stores become locked RMWs (full barriers,
// slower than x86's plain mov), and a CAS loop may retry under contention
// where the kernel's sub-word instruction would not. All JS Atomics are
// sequentially consistent, so the seed's smp_mb() pairs hold trivially and
// the mayhalt handshake (race 2) is exact rather than "highly unlikely" to
// miss.
import * as Layout from "./layout";
import { type LockSpace, type RaceHook, RacePoint } from "./lockspace";
import type { GuestLock } from "./ticket";
// Imported bindings become getter calls once transpiled to CommonJS; the hot
// paths read these module-level copies instead.
const { MAX_NODES, MAYHALT_THRESHOLD, PC_COUNT, PV_CPU_ACTIVE, PV_CPU_HALTED, PV_CPU_KICKED, QN_CPUSTATE, QN_LOCKED, QN_MAYHALT, QN_MYCPU, QN_NEXT, QN_PREV, QSPIN_THRESHOLD, Stat, _Q_LOCKED_MASK, _Q_LOCKED_PENDING_MASK, _Q_LOCKED_SLOWPATH, _Q_LOCKED_VAL, _Q_PENDING_VAL, _Q_TAIL_MASK, encodeTail, tailToNode } = Layout;

export class QueueSpinlock implements GuestLock {
  readonly kind = "queue" as const;
  private readonly i32: Int32Array;
  private readonly w: number;

  constructor(
    readonly space: LockSpace,
    readonly lockIndex: number,
    readonly pv: boolean,
    readonly unfair: boolean,
    private readonly hook: RaceHook | null = null,
  ) {
    this.i32 = space.i32;
    this.w = space.lockWord(lockIndex);
  }

  isLocked(): boolean {
    return (Atomics.load(this.i32, this.w) & _Q_LOCKED_MASK) !== 0;
  }

  trylock(cpu: number): boolean {
    if (Atomics.compareExchange(this.i32, this.w, 0, _Q_LOCKED_VAL) === 0) {
      this.space.stat(cpu, Stat.acquired);
      return true;
    }
    return false;
  }

  /** queue_spin_lock(): fast path cmpxchg(0 -> LOCKED), else the slow path. */
  lock(cpu: number): void {
    const i32 = this.i32;
    const w = this.w;
    const val = Atomics.compareExchange(i32, w, 0, _Q_LOCKED_VAL);
    if (val === 0) {
      this.space.stat(cpu, Stat.acquired);
      return;
    }
    // Seed: with unfair locks, stealing is allowed in the fast path only
    // (queue_spin_trylock_unfair: !l->locked && cmpxchg(&l->locked, 0, LOCKED)).
    if (this.unfair && (val & _Q_LOCKED_MASK) === 0 && this.cmpxchgLockedByte(0, _Q_LOCKED_VAL) === 0) {
      this.space.stat(cpu, Stat.steals);
      this.space.stat(cpu, Stat.acquired);
      return;
    }
    this.slowpath(cpu, val);
  }

  unlock(cpu: number): void {
    if (!this.pv) {
      Atomics.and(this.i32, this.w, ~_Q_LOCKED_MASK); // __queue_spin_unlock: locked byte = 0
      return;
    }
    // Seed queue_spin_unlock(): cmpxchg the lock byte LOCKED -> 0 so as not to
    // race with a queue head setting _Q_LOCKED_SLOWPATH. Uncontended the whole
    // word is LOCKED, and one word cmpxchg is the byte cmpxchg.
    if (Atomics.compareExchange(this.i32, this.w, _Q_LOCKED_VAL, 0) === _Q_LOCKED_VAL) return;
    if (this.cmpxchgLockedByte(_Q_LOCKED_VAL, 0) === _Q_LOCKED_VAL) return;
    this.unlockSlowpath(cpu);
  }

  /** cmpxchg((u8 *)lock, old, nw): returns the byte value seen (old on success). */
  private cmpxchgLockedByte(old: number, nw: number): number {
    const i32 = this.i32;
    const w = this.w;
    for (;;) {
      const v = Atomics.load(i32, w);
      const b = v & _Q_LOCKED_MASK;
      if (b !== old) return b;
      if (Atomics.compareExchange(i32, w, v, (v & ~_Q_LOCKED_MASK) | nw) === v) return old;
    }
  }

  /** xchg_tail(): swap in our tail, keep locked+pending; returns the old word. */
  private xchgTail(tail: number): number {
    const i32 = this.i32;
    const w = this.w;
    for (;;) {
      const v = Atomics.load(i32, w);
      if (Atomics.compareExchange(i32, w, v, (v & _Q_LOCKED_PENDING_MASK) | tail) === v) return v;
    }
  }

  private slowpath(cpu: number, val: number): void {
    const i32 = this.i32;
    const w = this.w;
    const space = this.space;
    const pv = this.pv;
    // Every spin loop below is a cpu_relax() loop: each PLE window of it may
    // exit to the hypervisor (LockSpace.pleExit); -1 (no PLE) never matches.
    const pleMask = space.pleMask;
    let spins = 0;
    space.stat(cpu, Stat.lockSlowpath);

    // Pending-bit path (trylock or pend behind the owner). With PV on it is
    // skipped, as mainline pv_queued_spin_lock_slowpath does: a pending waiter
    // cannot halt, which is exactly what hurts when vCPUs are preempted.
    if (!pv) {
      if (val === _Q_PENDING_VAL) {
        while ((val = Atomics.load(i32, w)) === _Q_PENDING_VAL) if ((++spins & pleMask) === 0) space.pleExit(cpu);
      }
      let nw = 0;
      let queue = false;
      for (;;) {
        if (val & ~_Q_LOCKED_MASK) {
          queue = true;
          break;
        }
        nw = _Q_LOCKED_VAL;
        if (val === nw) nw |= _Q_PENDING_VAL;
        const old = Atomics.compareExchange(i32, w, val, nw);
        if (old === val) break;
        val = old;
      }
      if (!queue) {
        if (nw !== _Q_LOCKED_VAL) {
          // We are pending: wait for the owner to go away, then take over.
          for (;;) {
            const v = Atomics.load(i32, w);
            if ((v & _Q_LOCKED_MASK) === 0) {
              if (!this.unfair) {
                Atomics.add(i32, w, _Q_LOCKED_VAL - _Q_PENDING_VAL); // clear_pending_set_locked
                break;
              }
              // An unfair fast-path stealer may take the byte under us: CAS.
              if (Atomics.compareExchange(i32, w, v, (v & ~_Q_PENDING_VAL) | _Q_LOCKED_VAL) === v) break;
            }
            if ((++spins & pleMask) === 0) space.pleExit(cpu);
          }
        }
        this.done(cpu, spins);
        return;
      }
    }

    // MCS queue. Per-CPU qnodes[MAX_NODES]; count is only touched by this vCPU.
    const pc = space.percpu(cpu);
    const idx = i32[pc + PC_COUNT]!;
    if (idx >= MAX_NODES) throw new Error(`qspinlock: cpu ${cpu} nested deeper than ${MAX_NODES} contexts`);
    i32[pc + PC_COUNT] = idx + 1;
    const nodeNo = cpu * MAX_NODES + idx;
    const node = space.qnode(nodeNo);
    const tail = encodeTail(cpu, idx);
    Atomics.store(i32, node + QN_LOCKED, 0);
    Atomics.store(i32, node + QN_NEXT, 0);
    if (pv) {
      // pv_init_vars()
      Atomics.store(i32, node + QN_CPUSTATE, PV_CPU_ACTIVE);
      Atomics.store(i32, node + QN_PREV, 0);
      Atomics.store(i32, node + QN_MAYHALT, 0);
      Atomics.store(i32, node + QN_MYCPU, cpu);
    }

    // We touched a cold cacheline; try the lock once more before queueing.
    if (Atomics.compareExchange(i32, w, 0, _Q_LOCKED_VAL) === 0) {
      i32[pc + PC_COUNT] = idx;
      this.done(cpu, spins);
      return;
    }

    const old = this.xchgTail(tail);
    if (old & _Q_TAIL_MASK) {
      const prevNo = tailToNode(old & _Q_TAIL_MASK);
      if (pv) Atomics.store(i32, node + QN_PREV, prevNo + 1); // pv_set_prev()
      Atomics.store(i32, space.qnode(prevNo) + QN_NEXT, nodeNo + 1);
      let cnt = 0;
      while (Atomics.load(i32, node + QN_LOCKED) === 0) {
        if (pv) cnt = this.pvQueueSpinCheck(cpu, node, cnt + 1);
        if ((++spins & pleMask) === 0) space.pleExit(cpu);
      }
    } else if (pv) {
      Atomics.store(i32, node + QN_LOCKED, 1); // first in queue: qhead = true
    }

    // Queue head: wait for the owner and the pending waiter to go away.
    let nextNo = 0;
    for (;;) {
      let hcnt = 0;
      while ((val = Atomics.load(i32, w)) & _Q_LOCKED_PENDING_MASK) {
        if (pv) hcnt = this.pvHeadSpinCheck(cpu, node, hcnt + 1);
        if ((++spins & pleMask) === 0) space.pleExit(cpu);
      }
      if ((val & _Q_TAIL_MASK) === tail) {
        // Nobody behind us: take the lock and clear the tail in one go.
        if (Atomics.compareExchange(i32, w, val, _Q_LOCKED_VAL) === val) {
          i32[pc + PC_COUNT] = idx;
          this.done(cpu, spins);
          return;
        }
        continue; // a successor appeared, or the byte was stolen
      }
      // set_locked(); a CAS rather than a store so a fast-path stealer is not overwritten.
      if (this.cmpxchgLockedByte(0, _Q_LOCKED_VAL) === 0) break;
    }

    // Hand the queue head role to the next node (arch_mcs_spin_unlock_contended).
    while ((nextNo = Atomics.load(i32, node + QN_NEXT)) === 0) if ((++spins & pleMask) === 0) space.pleExit(cpu);
    const next = space.qnode(nextNo - 1);
    Atomics.store(i32, next + QN_LOCKED, 1);
    if (pv) {
      if (this.hook !== null) this.hook(RacePoint.handoffBeforeHaltCheck, cpu);
      this.pvHaltCheck(next);
    }
    i32[pc + PC_COUNT] = idx;
    this.done(cpu, spins);
  }

  private done(cpu: number, spins: number): void {
    this.space.stat(cpu, Stat.acquired);
    if (spins !== 0) this.space.stat(cpu, Stat.spins, spins);
  }

  /** Seed pv_head_spin_check(); returns the new loop count. */
  private pvHeadSpinCheck(cpu: number, node: number, count: number): number {
    const i32 = this.i32;
    const cs = node + QN_CPUSTATE;
    if (Atomics.load(i32, cs) === PV_CPU_KICKED) {
      Atomics.store(i32, cs, PV_CPU_ACTIVE);
      return 0;
    }
    if (count < 2 * QSPIN_THRESHOLD) return count;
    // Race 1 (seed header): [1] cmpxchg(lock byte, LOCKED, SLOWPATH) then halt,
    // against the holder's [2] cmpxchg(LOCKED, 0) and kick if that fails.
    const oldstate = Atomics.compareExchange(i32, cs, PV_CPU_ACTIVE, PV_CPU_HALTED);
    if (oldstate !== PV_CPU_KICKED) {
      if (this.hook !== null) this.hook(RacePoint.qheadBeforeSlowpathCmpxchg, cpu);
      const lockval = this.cmpxchgLockedByte(_Q_LOCKED_VAL, _Q_LOCKED_SLOWPATH);
      if (lockval !== 0) {
        if (this.hook !== null) this.hook(RacePoint.qheadBeforeHalt, cpu);
        this.space.stat(cpu, Stat.haltQhead);
        this.space.halt(cpu, cs, PV_CPU_HALTED);
        this.wakeStat(cpu, cs);
      }
      // else the lock is free and no halting is needed
    }
    Atomics.store(i32, cs, PV_CPU_ACTIVE);
    return 0;
  }

  /** Seed pv_queue_spin_check(); returns the new loop count. */
  private pvQueueSpinCheck(cpu: number, node: number, count: number): number {
    const i32 = this.i32;
    if (count >= QSPIN_THRESHOLD) {
      const cs = node + QN_CPUSTATE;
      // Race 2: [3] cpustate = HALTED; smp_mb(); [4] if (!qhead) halt.
      Atomics.store(i32, cs, PV_CPU_HALTED);
      if (this.hook !== null) this.hook(RacePoint.qnodeBeforeQheadCheck, cpu);
      if (Atomics.load(i32, node + QN_LOCKED) === 0) {
        this.space.stat(cpu, Stat.haltQnode);
        this.space.halt(cpu, cs, PV_CPU_HALTED);
        this.wakeStat(cpu, cs);
      }
      Atomics.store(i32, cs, PV_CPU_ACTIVE);
      Atomics.store(i32, node + QN_MAYHALT, 0);
      return 0;
    }
    if (count === MAYHALT_THRESHOLD) Atomics.store(i32, node + QN_MAYHALT, 1);
    return count;
  }

  private wakeStat(cpu: number, cs: number): void {
    // Seed: PV_WAKE_KICKED if cpustate == PV_CPU_KICKED after the halt, else spurious.
    this.space.stat(cpu, Atomics.load(this.i32, cs) === PV_CPU_KICKED ? Stat.wakeKicked : Stat.wakeSpurious);
  }

  /** Seed pv_halt_check(): the new holder marks the lock if the next node halted. */
  private pvHaltCheck(next: number): void {
    const i32 = this.i32;
    // Race 2: [1] qhead = true (done by the caller); smp_mb(); [2] check cpustate.
    if (Atomics.load(i32, next + QN_MAYHALT) !== 0 && Atomics.load(i32, next + QN_CPUSTATE) === PV_CPU_HALTED) {
      Atomics.or(i32, this.w, _Q_LOCKED_SLOWPATH); // holder's byte is LOCKED or SLOWPATH
    }
  }

  /** Seed queue_spin_unlock_slowpath(): find the queue head via prev pointers, release, kick. */
  private unlockSlowpath(cpu: number): void {
    const i32 = this.i32;
    const space = this.space;
    space.stat(cpu, Stat.unlockSlowpath);
    const tail = Atomics.load(i32, this.w) & _Q_TAIL_MASK;
    if (tail === 0) throw new Error("qspinlock: _Q_LOCKED_SLOWPATH set with an empty queue");
    let node = space.qnode(tailToNode(tail));
    let spins = 0;
    while (Atomics.load(i32, node + QN_LOCKED) === 0) {
      const prev = Atomics.load(i32, node + QN_PREV);
      if (prev !== 0) node = space.qnode(prev - 1);
      else if ((++spins & space.pleMask) === 0) space.pleExit(cpu); // let the prev pointer be set up
    }
    if (spins !== 0) space.stat(cpu, Stat.spins, spins);
    Atomics.and(i32, this.w, ~_Q_LOCKED_MASK); // release before waking the head
    if (this.hook !== null) this.hook(RacePoint.unlockBeforeKick, cpu);
    // pv_kick_node()
    const oldstate = Atomics.exchange(i32, node + QN_CPUSTATE, PV_CPU_KICKED);
    if (oldstate !== PV_CPU_HALTED) space.stat(cpu, Stat.kickNohalt);
    else space.kick(cpu, Atomics.load(i32, node + QN_MYCPU));
  }
}

