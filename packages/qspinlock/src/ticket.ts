// Ticket spinlock (x86 arch_spinlock_t) and the KVM PV ticketlock that the
// seed compares against (arch/x86/kernel/kvm.c kvm_lock_spinning /
// kvm_unlock_kick, arch/x86/include/asm/spinlock.h, 3.12-era).
//
// Word: head = low halfword, tail = high halfword. The kernel adds to the head
// halfword alone; a 32-bit Atomics.add would carry into the tail when head
// wraps, so the head increment is a CAS loop on the word. xadd on the tail is a
// plain Atomics.add (the tail is the top halfword: its carry falls off bit 31).
import * as Layout from "./layout";
import { HALT_KICKED, type LockSpace } from "./lockspace";
// Imported bindings become getter calls once transpiled to CommonJS; the hot
// paths read these module-level copies instead.
const { PC_KW_LOCK, PC_KW_WAITING, PC_KW_WANT, Stat, TICKET_SHIFT, TICKET_SLOWPATH_FLAG, TICKET_SPIN_THRESHOLD } = Layout;

export type LockKind = "ticket" | "queue";

/** A guest spinlock as guest code uses it: the caller names the vCPU it runs on. */
export interface GuestLock {
  readonly kind: LockKind;
  readonly pv: boolean;
  readonly unfair: boolean;
  readonly lockIndex: number;
  /** The lock space (lock words, per-CPU nodes, PV state, statistics) the lock lives in. */
  readonly space: LockSpace;
  lock(cpu: number): void;
  unlock(cpu: number): void;
  trylock(cpu: number): boolean;
  isLocked(): boolean;
}

export class TicketSpinlock implements GuestLock {
  readonly kind = "ticket" as const;
  readonly unfair = false;
  private readonly i32: Int32Array;
  private readonly w: number;
  /** TICKET_LOCK_INC: 2 with PV so that bit 0 of tail can be TICKET_SLOWPATH_FLAG. */
  private readonly inc: number;
  /** Masks TICKET_SLOWPATH_FLAG out of a tail (PV only; without PV bit 0 is part of the ticket). */
  private readonly tailMask: number;

  constructor(
    readonly space: LockSpace,
    readonly lockIndex: number,
    readonly pv: boolean,
  ) {
    this.i32 = space.i32;
    this.w = space.lockWord(lockIndex);
    this.inc = pv ? 2 : 1;
    this.tailMask = pv ? 0xffff & ~TICKET_SLOWPATH_FLAG : 0xffff;
  }

  isLocked(): boolean {
    const v = Atomics.load(this.i32, this.w);
    return (v & 0xffff) !== ((v >>> TICKET_SHIFT) & this.tailMask);
  }

  trylock(cpu: number): boolean {
    const v = Atomics.load(this.i32, this.w);
    if ((v & 0xffff) !== ((v >>> TICKET_SHIFT) & this.tailMask)) return false;
    if (Atomics.compareExchange(this.i32, this.w, v, (v + (this.inc << TICKET_SHIFT)) | 0) !== v) return false;
    this.space.stat(cpu, Stat.acquired);
    return true;
  }

  lock(cpu: number): void {
    const i32 = this.i32;
    const w = this.w;
    const old = Atomics.add(i32, w, this.inc << TICKET_SHIFT); // xadd(&lock->tickets, inc)
    const want = (old >>> TICKET_SHIFT) & this.tailMask;
    if ((old & 0xffff) === want) {
      this.space.stat(cpu, Stat.acquired);
      return;
    }
    this.space.stat(cpu, Stat.lockSlowpath);
    let spins = 0;
    // cpu_relax() loops: each PLE window may exit to the hypervisor (LockSpace.pleExit); -1 (no PLE) never matches.
    const space = this.space;
    const pleMask = space.pleMask;
    if (!this.pv) {
      while ((Atomics.load(i32, w) & 0xffff) !== want) if ((++spins & pleMask) === 0) space.pleExit(cpu);
    } else {
      for (;;) {
        let count = TICKET_SPIN_THRESHOLD;
        let got = false;
        do {
          if ((Atomics.load(i32, w) & 0xffff) === want) {
            got = true;
            break;
          }
          if ((++spins & pleMask) === 0) space.pleExit(cpu);
        } while (--count);
        if (got) break;
        if (this.lockSpinning(cpu, want)) break;
      }
    }
    this.space.stat(cpu, Stat.spins, spins);
    this.space.stat(cpu, Stat.acquired);
  }

  /** kvm_lock_spinning(): publish what we wait for, set the slowpath flag, recheck, halt. Returns true if the lock is ours. */
  private lockSpinning(cpu: number, want: number): boolean {
    const i32 = this.i32;
    const space = this.space;
    const pc = space.percpu(cpu);
    Atomics.store(i32, pc + PC_KW_WANT, want);
    Atomics.store(i32, pc + PC_KW_LOCK, this.lockIndex + 1);
    space.stat(cpu, Stat.ticketTakenSlow);
    Atomics.store(i32, pc + PC_KW_WAITING, 1); // cpumask_set_cpu(cpu, &waiting_cpus)
    Atomics.or(i32, this.w, TICKET_SLOWPATH_FLAG << TICKET_SHIFT); // __ticket_enter_slowpath()
    let mine = false;
    // Check again: it may have become ours while we were setting up.
    if ((Atomics.load(i32, this.w) & 0xffff) === want) {
      space.stat(cpu, Stat.ticketPickup);
      mine = true;
    } else {
      space.stat(cpu, Stat.ticketHalt);
      space.stat(cpu, space.halt(cpu, -1, 0) === HALT_KICKED ? Stat.wakeKicked : Stat.wakeSpurious);
    }
    Atomics.store(i32, pc + PC_KW_WAITING, 0);
    Atomics.store(i32, pc + PC_KW_LOCK, 0);
    return mine;
  }

  /** head += inc on the low halfword only; returns the old word (the value the add applied to). */
  private addHead(): number {
    const i32 = this.i32;
    const w = this.w;
    const inc = this.inc;
    // Only the holder changes head, so it is stable here: unless it is about
    // to wrap, a word add is exactly the halfword add.
    if ((Atomics.load(i32, w) & 0xffff) + inc <= 0xffff) return Atomics.add(i32, w, inc);
    for (;;) {
      const v = Atomics.load(i32, w);
      const nv = (v & ~0xffff) | ((v + inc) & 0xffff);
      if (Atomics.compareExchange(i32, w, v, nv) === v) return v;
    }
  }

  unlock(cpu: number): void {
    const prev = this.addHead();
    if (!this.pv) return;
    // add_smp() is a full barrier, then the kernel reads the slowpath flag; the
    // word our atomic add applied to is a read at that same point.
    if (((prev >>> TICKET_SHIFT) & TICKET_SLOWPATH_FLAG) !== 0) this.unlockSlowpath(cpu, prev);
  }

  /** __ticket_unlock_slowpath(): clear the flag if uncontended, else kick the next ticket's waiter. */
  private unlockSlowpath(cpu: number, prev: number): void {
    const oldHead = ((prev & 0xffff) + this.inc) & 0xffff;
    const old = ((prev & ~0xffff) | oldHead) | 0;
    const nw = (old & ~(TICKET_SLOWPATH_FLAG << TICKET_SHIFT)) | 0;
    if ((nw & 0xffff) !== ((nw >>> TICKET_SHIFT) & 0xffff) || Atomics.compareExchange(this.i32, this.w, old, nw) !== old) {
      this.unlockKick(cpu, oldHead);
    }
  }

  /** kvm_unlock_kick(): kick the waiting vCPU that holds `ticket` for this lock. */
  private unlockKick(cpu: number, ticket: number): void {
    const i32 = this.i32;
    const space = this.space;
    for (let c = 0; c < space.maxCpus; c++) {
      const pc = space.percpu(c);
      if (Atomics.load(i32, pc + PC_KW_WAITING) === 0) continue;
      if (Atomics.load(i32, pc + PC_KW_LOCK) === this.lockIndex + 1 && Atomics.load(i32, pc + PC_KW_WANT) === ticket) {
        space.kick(cpu, c);
        return;
      }
    }
  }
}
