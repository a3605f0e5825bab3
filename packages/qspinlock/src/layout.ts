// Shared-memory layout of a guest lock space: the lock words and the per-CPU
// data the kernel keeps for spinlocks (qnodes[4] per CPU, the PV ticketlock's
// klock_waiting, lock statistics), all as Int32 words in one SharedArrayBuffer
// region so that any number of vCPU threads (or processes, if the region is an
// mmap'd MAP_SHARED file) can use them. Offsets are word indices relative to
// the region base; nothing here holds a JS object reference.

/** Spin threshold for queue spinlock waiters (seed: QSPIN_THRESHOLD = 1U<<14). */
export const QSPIN_THRESHOLD = 1 << 14;
/** Seed: MAYHALT_THRESHOLD = QSPIN_THRESHOLD - 0x10. */
export const MAYHALT_THRESHOLD = QSPIN_THRESHOLD - 0x10;
/** kvm pv ticketlock: SPIN_THRESHOLD = 1 << 15 (arch/x86/include/asm/spinlock.h). */
export const TICKET_SPIN_THRESHOLD = 1 << 15;
/**
 * A PLE window in cpu_relax() iterations comparable to KVM's default: VMX
 * ple_window = 4096 cycles (~1.4 µs at 3 GHz) of PAUSE-spinning; one
 * cpu_relax() here is a loop iteration with an atomic load (~15 ns), so
 * ~90 iterations, rounded to a power of 2 (LockSpaceInit.pleWindow must be one).
 */
export const PLE_WINDOW_SPINS = 128;

// qspinlock word (include/asm-generic/qspinlock_types.h, NR_CPUS < 16K):
//  bits 0-7 locked byte, bit 8 pending, bits 9-15 unused,
//  bits 16-17 tail index, bits 18-31 tail cpu (+1).
export const _Q_LOCKED_VAL = 1;
export const _Q_LOCKED_MASK = 0xff;
/** Seed: _Q_LOCKED_SLOWPATH = _Q_LOCKED_VAL | 2, the unlocker must kick the queue head. */
export const _Q_LOCKED_SLOWPATH = _Q_LOCKED_VAL | 2;
export const _Q_PENDING_OFFSET = 8;
export const _Q_PENDING_VAL = 1 << _Q_PENDING_OFFSET;
export const _Q_PENDING_MASK = 0xff << _Q_PENDING_OFFSET;
export const _Q_LOCKED_PENDING_MASK = _Q_LOCKED_MASK | _Q_PENDING_MASK;
export const _Q_TAIL_IDX_OFFSET = 16;
export const _Q_TAIL_IDX_BITS = 2;
export const _Q_TAIL_IDX_MASK = ((1 << _Q_TAIL_IDX_BITS) - 1) << _Q_TAIL_IDX_OFFSET;
export const _Q_TAIL_CPU_OFFSET = 18;
export const _Q_TAIL_CPU_BITS = 14;
export const _Q_TAIL_CPU_MASK = ((1 << _Q_TAIL_CPU_BITS) - 1) << _Q_TAIL_CPU_OFFSET;
export const _Q_TAIL_MASK = _Q_TAIL_IDX_MASK | _Q_TAIL_CPU_MASK;
/** Max nesting (task, softirq, hardirq, nmi) as the kernel's MAX_NODES. */
export const MAX_NODES = 4;

/** kernel encode_tail(): cpu+1 so that tail 0 means "no queue". */
export function encodeTail(cpu: number, idx: number): number {
  return (((cpu + 1) << _Q_TAIL_CPU_OFFSET) | (idx << _Q_TAIL_IDX_OFFSET)) | 0;
}
/** Node number (cpu * MAX_NODES + idx) of an encoded tail; tail must be non-zero. */
export function tailToNode(tail: number): number {
  const cpu = ((tail >>> _Q_TAIL_CPU_OFFSET) & ((1 << _Q_TAIL_CPU_BITS) - 1)) - 1;
  const idx = (tail & _Q_TAIL_IDX_MASK) >>> _Q_TAIL_IDX_OFFSET;
  return cpu * MAX_NODES + idx;
}

// Ticket lock word (x86 arch_spinlock_t, __ticket_t = u16): head in the low
// halfword, tail in the high halfword. With PV the ticket increment is 2 and
// bit 0 of tail is TICKET_SLOWPATH_FLAG.
export const TICKET_SHIFT = 16;
export const TICKET_SLOWPATH_FLAG = 1;

// PV CPU states (seed: PV_CPU_ACTIVE / PV_CPU_KICKED / PV_CPU_HALTED).
export const PV_CPU_ACTIVE = 1;
export const PV_CPU_KICKED = 2;
export const PV_CPU_HALTED = -1;

/** Lock statistics, as the seed's __queue_lockstat plus the kvm ticketlock's. */
export const Stat = {
  /** cpu_relax() iterations in lock slow paths. */
  spins: 0,
  /** Lock acquisitions. */
  acquired: 1,
  /** Entries to the lock slow path (qspinlock slowpath / ticket contended). */
  lockSlowpath: 2,
  /** queue_spin_unlock_slowpath() calls (lock byte was _Q_LOCKED_SLOWPATH). */
  unlockSlowpath: 3,
  /** PV_HALT_QHEAD: queue head called __queue_halt_cpu. */
  haltQhead: 4,
  /** PV_HALT_QNODE: queue node called __queue_halt_cpu. */
  haltQnode: 5,
  /** Halt aborted by the hypervisor because cpustate changed before blocking. */
  haltAborted: 6,
  /** PV_WAKE_KICKED. */
  wakeKicked: 7,
  /** PV_WAKE_SPURIOUS. */
  wakeSpurious: 8,
  /** PV_KICK_NOHALT: kick of a CPU whose cpustate was not HALTED. */
  kickNohalt: 9,
  /** Hypervisor kick hypercalls issued (KVM_HC_KICK_CPU). */
  kickCpu: 10,
  /** Times the vCPU thread really blocked in the hypervisor. */
  hvBlocks: 11,
  /** Microseconds spent halted. */
  haltedUs: 12,
  /** kvm ticketlock TAKEN_SLOW: entered kvm_lock_spinning. */
  ticketTakenSlow: 13,
  /** kvm ticketlock TAKEN_SLOW_PICKUP: lock became ours before halting. */
  ticketPickup: 14,
  /** kvm ticketlock: halts (calls to halt()). */
  ticketHalt: 15,
  /** Unfair fast-path lock steals. */
  steals: 16,
  /**
   * Halts the hypervisor ended without a kick (pv_unhalted clear: the
   * haltTimeoutUs timer). Not the seed's PV_WAKE_SPURIOUS, which is judged by
   * the guest (cpustate != PV_CPU_KICKED after the halt) and also counts a halt
   * ended by a kick left over from an earlier, aborted halt (see halt()).
   */
  hvTimerWakes: 17,
  /**
   * Pause-loop exits: a spin loop ran a PLE window of cpu_relax() iterations
   * and the hypervisor took the exit (handle_pause -> kvm_vcpu_on_spin). Only
   * with LockSpaceInit.pleWindow > 0.
   */
  pleExits: 18,
  /**
   * PLE exits on which kvm_vcpu_on_spin found a candidate (a kicked vCPU, or
   * one that looks preempted while runnable) and yielded the host core to it.
   */
  pleYields: 19,
} as const;
export type StatName = keyof typeof Stat;
export const STAT_COUNT = 20;
export const STAT_NAMES = Object.keys(Stat) as StatName[];
export type LockStats = Record<StatName, number>;

// Per-qnode words (struct qnode: mcs_spinlock + pv_qvars).
export const QN_LOCKED = 0; // mcs.locked == qhead
export const QN_NEXT = 1; // node number + 1 of next, 0 = NULL
export const QN_CPUSTATE = 2;
export const QN_MAYHALT = 3;
export const QN_MYCPU = 4;
export const QN_PREV = 5; // node number + 1 of prev, 0 = NULL
export const QNODE_WORDS = 16; // one 64-byte cache line per node

// Per-CPU block.
export const PC_COUNT = 0; // qnodes[0].mcs.count: nesting depth
export const PC_KW_LOCK = 1; // klock_waiting.lock: lock index + 1, 0 = none
export const PC_KW_WANT = 2; // klock_waiting.want
export const PC_KW_WAITING = 3; // bit in waiting_cpus
// Hypervisor state of the vCPU (not guest-visible in a real host; kept here so
// every thread sharing the region sees it).
export const PC_HV_UNHALT = 16; // kvm vcpu->arch.pv.pv_unhalted: Atomics.wait target
export const PC_HV_HALTED = 17; // 1 while the vCPU thread is blocked in halt
// Pause-loop exiting (only used with a PLE window; see LockSpace.pleExit):
export const PC_HV_IDLE = 18; // 1 while the vCPU runs no guest code (idle in the host's eyes): never a yield target
export const PC_HV_RUNGEN = 19; // bumped whenever the vCPU is seen running: the host's "scheduled in" signal
export const PC_HV_READY = 20; // kvm vcpu->ready: kicked out of a halt and not yet running again
export const PC_HV_YIELDERS = 21; // vCPUs directed-yielding to this one (Atomics.wait on its PC_HV_RUNGEN)
export const PC_STATS = 32;
export const PC_QNODES = 64;
export const PERCPU_WORDS = PC_QNODES + MAX_NODES * QNODE_WORDS;

// Region header.
export const HDR_MAGIC = 0;
export const HDR_MAX_CPUS = 1;
export const HDR_NR_LOCKS = 2;
export const HDR_HALT_TIMEOUT_US = 3; // 0 = halt until kicked; else spurious wake-up period
export const HDR_PLE_WINDOW = 4; // 0 = no pause-loop exiting; else cpu_relax() iterations per PLE window (a power of 2)
export const HDR_PLE_LAST_BOOSTED = 5; // kvm->last_boosted_vcpu: where kvm_vcpu_on_spin's round-robin scan resumes
export const HDR_WORDS = 16;
export const LOCK_STRIDE = 16; // each lock word on its own cache line
export const LOCKSPACE_MAGIC = 0x51534c4b; // "QSLK"

export interface LockSpaceGeometry {
  maxCpus: number;
  nrLocks: number;
}

export function lockWordIndex(lock: number): number {
  return HDR_WORDS + lock * LOCK_STRIDE;
}
export function percpuBase(g: LockSpaceGeometry, cpu: number): number {
  return HDR_WORDS + g.nrLocks * LOCK_STRIDE + cpu * PERCPU_WORDS;
}
export function qnodeBase(g: LockSpaceGeometry, node: number): number {
  const cpu = Math.floor(node / MAX_NODES);
  return percpuBase(g, cpu) + PC_QNODES + (node - cpu * MAX_NODES) * QNODE_WORDS;
}
/** Bytes needed for a lock space with these dimensions. */
export function lockSpaceBytes(maxCpus: number, nrLocks = 1): number {
  return (HDR_WORDS + nrLocks * LOCK_STRIDE + maxCpus * PERCPU_WORDS) * 4;
}
