// The guest kernel's own memory that every vCPU thread shares: the virtio-blk
// queue's driver state (struct vring_virtqueue and virtio_blk's request map),
// the spinlock that guards them (vq->lock), which vCPU owns each request slot,
// and per-vCPU completion mailboxes (the IPI that blk-mq sends to complete a
// request on the CPU that issued it).
// One SharedArrayBuffer, private to this process: the device never sees it.
import { guestLockBytes } from "@virtmesh/qspinlock";
import { driverStateBytes } from "@virtmesh/virtqueue";

export interface KernelGeometry {
  queueSize: number;
  /** Request slots of the blk driver. */
  slots: number;
  /** vCPU threads that run fio jobs (cpus 1..vcpus); cpu 0 is the boot CPU (this thread), which takes interrupts. */
  vcpus: number;
}

// Mailbox header words (per vCPU); the ring of completions follows.
export const MB_HEAD = 0; // written by the interrupt handler
export const MB_TAIL = 1; // written by the vCPU
export const MB_SLEEPING = 2; // the vCPU is (about to be) halted: a completion for it must wake it
export const MB_HDR_WORDS = 16;
// Control words.
export const CTL_STOP = 0; // the run is abandoned: vCPUs stop waiting
export const CTL_COMPLETED = 1; // used elements taken back so far (written under vq->lock)
export const CTL_WORDS = 16;

const align64 = (n: number): number => Math.ceil(n / 64) * 64;

export class GuestKernel {
  readonly sab: SharedArrayBuffer;
  readonly driverStateOffset = 0;
  /** Descriptor head -> request slot (-1: none); the driver's per-head data. */
  readonly headToSlot: Int32Array;
  /** Request slot -> head it was last submitted on. */
  readonly slotHead: Int32Array;
  /** 1 while the slot's request carries a sampled trace in the head's trace slot. */
  readonly slotTraced: Int32Array;
  /** Request slot -> vCPU whose fio job owns it in the current run (0: none, the boot CPU). */
  readonly slotOwner: Int32Array;
  readonly lockOffset: number;
  readonly ctl: Int32Array;
  /** Mailbox ring entries: capacity per vCPU (every slot could complete at once, plus one). */
  readonly mbCapacity: number;
  private readonly mailboxBase: number;
  readonly words: Int32Array;

  constructor(
    readonly geom: KernelGeometry,
    sab?: SharedArrayBuffer,
  ) {
    const { queueSize, slots, vcpus } = geom;
    let off = align64(driverStateBytes(queueSize));
    const h2s = off;
    off = align64(off + 4 * queueSize);
    const sh = off;
    off = align64(off + 4 * slots);
    const st = off;
    off = align64(off + 4 * slots);
    const so = off;
    off = align64(off + 4 * slots);
    this.lockOffset = off;
    off = align64(off + guestLockBytes(vcpus + 1));
    const ctl = off;
    off = align64(off + 4 * CTL_WORDS);
    this.mailboxBase = off / 4;
    this.mbCapacity = slots + 1;
    off += 4 * (vcpus + 1) * this.mailboxWords();
    this.sab = sab ?? new SharedArrayBuffer(off);
    if (this.sab.byteLength < off) throw new RangeError(`guest kernel memory of ${this.sab.byteLength} bytes is smaller than the ${off} its geometry needs`);
    this.headToSlot = new Int32Array(this.sab, h2s, queueSize);
    this.slotHead = new Int32Array(this.sab, sh, slots);
    this.slotTraced = new Int32Array(this.sab, st, slots);
    this.slotOwner = new Int32Array(this.sab, so, slots);
    this.ctl = new Int32Array(this.sab, ctl, CTL_WORDS);
    this.words = new Int32Array(this.sab);
    if (!sab) {
      this.headToSlot.fill(-1);
      this.slotHead.fill(-1);
    }
  }

  private mailboxWords(): number {
    return Math.ceil((MB_HDR_WORDS + this.mbCapacity) / 16) * 16;
  }

  /** Word index (in `words`) of vCPU cpu's mailbox header. */
  mailbox(cpu: number): number {
    return this.mailboxBase + cpu * this.mailboxWords();
  }
}

// A mailbox is a ring of mbCapacity entries; MB_HEAD and MB_TAIL are indexes
// in [0, mbCapacity) (empty when equal). A vCPU has at most `slots` requests in
// flight, one fewer than the capacity, so it never fills.
const nextIndex = (i: number, cap: number): number => (i + 1 === cap ? 0 : i + 1);

/**
 * The interrupt handler's side of a vCPU mailbox: queue a completion (slot,
 * status) for vCPU cpu. Whoever runs the handler holds vq->lock, so there is
 * one producer at a time. Returns true if that vCPU is halted: the caller must
 * wake it (ring the call doorbell it sleeps on: the IPI).
 */
export function postCompletion(k: GuestKernel, cpu: number, slot: number, status: number): boolean {
  const w = k.words;
  const mb = k.mailbox(cpu);
  const head = w[mb + MB_HEAD]!;
  w[mb + MB_HDR_WORDS + head] = (slot << 8) | (status & 0xff);
  // Seq-cst store of head, then seq-cst load of SLEEPING: with the vCPU's
  // store-SLEEPING-then-load-head this cannot lose a wake-up.
  Atomics.store(w, mb + MB_HEAD, nextIndex(head, k.mbCapacity));
  return Atomics.load(w, mb + MB_SLEEPING) !== 0;
}

/** pollCompletion() found nothing. */
export const MAILBOX_EMPTY = -2;

/** The vCPU's side: the next completion (slot << 8 | status), or MAILBOX_EMPTY. */
export function pollCompletion(k: GuestKernel, cpu: number): number {
  const w = k.words;
  const mb = k.mailbox(cpu);
  const tail = Atomics.load(w, mb + MB_TAIL);
  if (Atomics.load(w, mb + MB_HEAD) === tail) return MAILBOX_EMPTY;
  const e = w[mb + MB_HDR_WORDS + tail]!;
  Atomics.store(w, mb + MB_TAIL, nextIndex(tail, k.mbCapacity));
  return e;
}

/** Whether vCPU cpu has a completion waiting. */
export function hasCompletion(k: GuestKernel, cpu: number): boolean {
  const mb = k.mailbox(cpu);
  return Atomics.load(k.words, mb + MB_HEAD) !== Atomics.load(k.words, mb + MB_TAIL);
}

/** Announces (1) or withdraws (0) that vCPU cpu is about to halt; re-check the mailbox after announcing. */
export function setHalted(k: GuestKernel, cpu: number, halted: 0 | 1): void {
  Atomics.store(k.words, k.mailbox(cpu) + MB_SLEEPING, halted);
}

/** Empties every mailbox (between runs). */
export function resetMailboxes(k: GuestKernel): void {
  for (let cpu = 0; cpu <= k.geom.vcpus; cpu++) {
    const mb = k.mailbox(cpu);
    Atomics.store(k.words, mb + MB_HEAD, 0);
    Atomics.store(k.words, mb + MB_TAIL, 0);
    Atomics.store(k.words, mb + MB_SLEEPING, 0);
  }
  Atomics.store(k.ctl, CTL_STOP, 0);
}
