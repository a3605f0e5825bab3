// Entry points for guest code that wants a spinlock in shared guest memory.
import { HDR_MAGIC, LOCKSPACE_MAGIC, lockSpaceBytes } from "./layout";
import { LockSpace, type RaceHook } from "./lockspace";
import { QueueSpinlock } from "./qspinlock";
import { type GuestLock, type LockKind, TicketSpinlock } from "./ticket";

export interface GuestLockOptions {
  /** Allow lock stealing in the queue lock's fast path (seed: unfair lock). Ignored for ticket locks. */
  unfair?: boolean;
  /** Test hook called at the racy points of the PV queue lock (see RacePoint). */
  hook?: RaceHook | null;
}

export function isLockKind(k: unknown): k is LockKind {
  return k === "ticket" || k === "queue";
}

/** Builds lock number `index` of a lock space as a ticket or queue spinlock, PV off or on. */
export function lockFromSpace(space: LockSpace, index: number, kind: LockKind, pv: boolean, opts: GuestLockOptions = {}): GuestLock {
  if (!isLockKind(kind)) throw new TypeError(`lock kind must be "ticket" or "queue", got ${String(kind)}`);
  space.lockWord(index); // range check
  return kind === "ticket" ? new TicketSpinlock(space, index, pv) : new QueueSpinlock(space, index, pv, opts.unfair === true, opts.hook ?? null);
}

/** Bytes a single-lock space for maxCpus vCPUs takes (what createGuestLock lays out). */
export function guestLockBytes(maxCpus: number): number {
  return lockSpaceBytes(maxCpus, 1);
}

/**
 * A spinlock living at `byteOffset` of `sharedBuffer` (guest memory): the lock
 * word and the per-CPU queue nodes, PV state and statistics for up to
 * `maxCpus` vCPUs (default 64), guestLockBytes(maxCpus) bytes in all. The
 * first caller lays the region out; later callers (other vCPU threads, given
 * the same buffer) attach to it. Lay it out before starting vCPUs.
 */
export function createGuestLock(
  kind: LockKind,
  pv: boolean,
  sharedBuffer: SharedArrayBuffer,
  byteOffset: number,
  opts: GuestLockOptions & { maxCpus?: number; haltTimeoutUs?: number } = {},
): GuestLock {
  if (!isLockKind(kind)) throw new TypeError(`lock kind must be "ticket" or "queue", got ${String(kind)}`);
  const hdr = new Int32Array(sharedBuffer, byteOffset, 1);
  const space =
    Atomics.load(hdr, HDR_MAGIC) === LOCKSPACE_MAGIC
      ? LockSpace.attach(sharedBuffer, byteOffset)
      : LockSpace.init(sharedBuffer, byteOffset, { maxCpus: opts.maxCpus ?? 64, nrLocks: 1, haltTimeoutUs: opts.haltTimeoutUs ?? 0 });
  return lockFromSpace(space, 0, kind, pv, opts);
}
