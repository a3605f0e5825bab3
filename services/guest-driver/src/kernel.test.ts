// The guest kernel memory's completion mailboxes: order, wrap-around, and the
// halted flag that tells the interrupt handler to wake a vCPU.
import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestKernel, MAILBOX_EMPTY, hasCompletion, pollCompletion, postCompletion, resetMailboxes, setHalted } from "./kernel";

test("completions come out in order, across many wrap-arounds of the ring", () => {
  const k = new GuestKernel({ queueSize: 16, slots: 5, vcpus: 2 });
  assert.equal(k.mbCapacity, 6);
  let next = 0;
  for (let round = 0; round < 50; round++) {
    const n = 1 + (round % 5); // at most `slots` outstanding
    for (let i = 0; i < n; i++) postCompletion(k, 2, (next + i) % 5, (next + i) & 0xff);
    for (let i = 0; i < n; i++) {
      assert.ok(hasCompletion(k, 2));
      const c = pollCompletion(k, 2);
      assert.equal(c >>> 8, next % 5);
      assert.equal(c & 0xff, next & 0xff);
      next++;
    }
    assert.equal(pollCompletion(k, 2), MAILBOX_EMPTY);
    assert.equal(hasCompletion(k, 2), false);
    assert.equal(pollCompletion(k, 1), MAILBOX_EMPTY, "another vCPU's mailbox is untouched");
  }
});

test("posting tells the handler whether the vCPU is halted and must be woken", () => {
  const k = new GuestKernel({ queueSize: 16, slots: 8, vcpus: 2 });
  assert.equal(postCompletion(k, 1, 3, 0), false, "running vCPU: no IPI needed");
  setHalted(k, 2, 1);
  assert.equal(postCompletion(k, 2, 4, 0), true, "halted vCPU: wake it");
  setHalted(k, 2, 0);
  assert.equal(postCompletion(k, 2, 5, 0), false);
  resetMailboxes(k);
  assert.equal(hasCompletion(k, 1), false);
  assert.equal(hasCompletion(k, 2), false);
});

test("every slot has an owner word, shared by the threads that map the same memory", () => {
  const k = new GuestKernel({ queueSize: 16, slots: 8, vcpus: 2 });
  const other = new GuestKernel(k.geom, k.sab);
  k.slotOwner[5] = 2;
  assert.equal(other.slotOwner[5], 2);
  assert.equal(other.slotOwner.length, 8);
});
