import { test } from "node:test";
import assert from "node:assert/strict";
import { crc32c as jsCrc32c } from "@virtmesh/migration";
import fc from "fast-check";
import { status as Status } from "@grpc/grpc-js";
import type { sidecar } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import {
  checkPageBitmap,
  checksumPages,
  GuestPages,
  MigrationBitmap,
  pageBitmapBytes,
  SendFailed,
  sendDirtyPages,
  TokenBucket,
  type PageSink,
} from "./migration";

const PG = 4096;

function bitmapOf(pages: number, set: Iterable<number>): Uint8Array {
  const b = new Uint8Array(pageBitmapBytes(pages));
  for (const n of set) b[n >> 3]! |= 1 << (n & 7);
  return b;
}

function setBits(bm: MigrationBitmap): number[] {
  const out: number[] = [];
  for (let p = bm.nextDirty(0); p >= 0; p = bm.nextDirty(p + 1)) out.push(p);
  return out;
}

const invalidArg = (re: RegExp) => (e: unknown) => e instanceof GrpcError && e.code === Status.INVALID_ARGUMENT && re.test(e.message);

test("checkPageBitmap: empty or exactly ceil(pages/64)*8 bytes, no bit past the last page", () => {
  checkPageBitmap("skip_bitmap", new Uint8Array(0), 100);
  checkPageBitmap("skip_bitmap", bitmapOf(100, [0, 99]), 100);
  assert.equal(pageBitmapBytes(100), 16);
  assert.throws(() => checkPageBitmap("skip_bitmap", new Uint8Array(8), 100), invalidArg(/^skip_bitmap has 8 bytes; 100 guest pages need exactly 16/));
  assert.throws(() => checkPageBitmap("skip_bitmap", new Uint8Array(24), 100), invalidArg(/has 24 bytes/));
  const past = bitmapOf(128, [100]);
  assert.throws(() => checkPageBitmap("exclude_bitmap", past, 100), invalidArg(/^exclude_bitmap sets bit 100, past the last guest page 99/));
  const far = bitmapOf(128, [127]);
  assert.throws(() => checkPageBitmap("skip_bitmap", far, 100), invalidArg(/sets bit 127/));
});

test("MigrationBitmap: every page set but the skipped ones; the tail past the last page never set", () => {
  const bm = new MigrationBitmap(100, bitmapOf(100, [3, 64, 99]));
  assert.equal(bm.dirty, 97);
  assert.equal(bm.skipped, 3);
  assert.equal(bm.nextDirty(3), 4);
  assert.equal(bm.nextDirty(99), -1);
  assert.equal(bm.nextDirty(100), -1);
  assert.ok(bm.isSkipped(64) && !bm.isSkipped(65));
  assert.equal(setBits(bm).length, 97);
  const none = new MigrationBitmap(33);
  assert.equal(none.dirty, 33);
  assert.equal(none.skipped, 0);
  assert.deepEqual(setBits(none), Array.from({ length: 33 }, (_, i) => i));
});

test("MigrationBitmap: a sync counts only pages newly set; a skipped page written later is sent after all (migration_bitmap_sync)", () => {
  const bm = new MigrationBitmap(200, bitmapOf(200, [10]));
  for (let p = 0; p < 200; p++) if (p !== 5) bm.clear(p);
  assert.equal(bm.dirty, 1);
  // A log with an unaligned view (a gRPC buffer) and bits past the end (another process's stray bits).
  const raw = new Uint8Array(1 + 32);
  const log = raw.subarray(1);
  for (const n of [5, 10, 11, 199, 200, 255]) log[n >> 3]! |= 1 << (n & 7);
  assert.equal(bm.mergeLog(log), 3); // 10 (skipped, but written since), 11 and 199: 5 was set, 200+ no page
  assert.deepEqual(setBits(bm), [5, 10, 11, 199]);
  assert.equal(bm.isSkipped(10), false);
  // A VFIO bitmap of a mapping at gpa pfn 190 for 16 pages: only 10 pages are guest memory.
  const vfio = bitmapOf(16, [0, 9, 10, 15]);
  assert.equal(bm.mergeRange(vfio, 190, 16), 1); // 190; 199 already set; 200, 205 past the end
  assert.deepEqual(setBits(bm), [5, 10, 11, 190, 199]);
  assert.equal(bm.dirty, 5);
});

test("MigrationBitmap matches a Set model under clears, log merges and range merges (property)", () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 300 }),
      fc.array(fc.nat(299)),
      fc.array(
        fc.oneof(
          fc.record({ op: fc.constant("clear" as const), pfn: fc.nat(299) }),
          fc.record({ op: fc.constant("log" as const), pfns: fc.array(fc.nat(319)) }),
          fc.record({ op: fc.constant("range" as const), first: fc.nat(299), pfns: fc.array(fc.nat(63)) }),
        ),
      ),
      (pages, skipList, ops) => {
        const skip = new Set(skipList.filter((p) => p < pages));
        const bm = new MigrationBitmap(pages, bitmapOf(pages, skip));
        const model = new Set<number>();
        for (let p = 0; p < pages; p++) if (!skip.has(p)) model.add(p);
        for (const o of ops) {
          if (o.op === "clear") {
            if (o.pfn < pages) assert.equal(bm.clear(o.pfn), model.delete(o.pfn));
          } else if (o.op === "log") {
            const log = new Uint8Array(Math.max(8, pageBitmapBytes(320)));
            for (const n of o.pfns) log[n >> 3]! |= 1 << (n & 7);
            const before = model.size;
            for (const n of o.pfns) if (n < pages) model.add(n);
            assert.equal(bm.mergeLog(log), model.size - before);
          } else {
            const before = model.size;
            for (const n of o.pfns) if (o.first + n < pages) model.add(o.first + n);
            assert.equal(bm.mergeRange(bitmapOf(64, o.pfns), o.first, 64), model.size - before);
          }
          assert.equal(bm.dirty, model.size);
        }
        assert.deepEqual(setBits(bm), [...model].sort((a, b) => a - b));
      },
    ),
    { numRuns: 200 },
  );
});

test("TokenBucket: the burst goes at once, then bytes wait rate-long; the average rate holds (fake clock)", () => {
  const b = new TokenBucket(1_000_000, 0, 100_000); // 1 MB/s, 100 kB burst
  assert.equal(b.take(100_000, 0), 0);
  assert.equal(b.take(50_000, 0), 50); // 50 kB of debt: 50 ms
  // The sender waited 50 ms: the debt is paid, the next 10 kB wait 10 ms.
  assert.equal(b.take(10_000, 50), 10);
  // Idle for long: the bucket refills only up to the burst.
  assert.equal(b.take(100_000, 10_000), 0);
  assert.equal(b.take(1, 10_000), 0.001);

  // A batch larger than the burst still goes, and a long run averages the rate.
  const r = new TokenBucket(4096 * 10, 0, 4096); // 10 pages/s, burst 1 page
  let t = 0;
  for (let i = 0; i < 100; i++) t += r.take(4096 * 4, t);
  // 400 pages at 10 pages/s = 40 s, less the first page of burst.
  assert.ok(Math.abs(t - 39_900) < 1e-6, `t=${t}`);
  assert.throws(() => new TokenBucket(0, 0), /rate 0 must be positive/);
});

/** A PageSink that records batches; `full` makes write() report backpressure; `failAt` fails the call. */
class FakeSink implements PageSink {
  batches: sidecar.PageBatch[] = [];
  drains = 0;
  cancelled = false;
  private failed: Error | null = null;
  constructor(
    private readonly opts: { full?: boolean; failAtBatch?: number; failOnFinish?: boolean; onWrite?: (n: number) => void } = {},
  ) {}
  write(batch: sidecar.PageBatch): boolean {
    // A batch's buffer must stay intact after write(): copy to check later.
    this.batches.push({ ...batch, pfns: [...batch.pfns], data: Buffer.from(batch.data) });
    this.opts.onWrite?.(this.batches.length);
    if (this.opts.failAtBatch === this.batches.length) this.failed = new Error("connection reset");
    return !this.opts.full;
  }
  waitDrain(): Promise<void> {
    this.drains++;
    return Promise.resolve();
  }
  failure(): Error | null {
    return this.failed;
  }
  finish(): Promise<sidecar.ReceivePagesResponse> {
    if (this.opts.failOnFinish) this.failed = new Error("destination answered NOT_FOUND: vm 'x' does not exist");
    if (this.failed) return Promise.reject(this.failed);
    const pages = this.batches.reduce((n, b) => n + b.pfns.length, 0);
    return Promise.resolve({ pages, bytes: this.batches.reduce((n, b) => n + b.data.length, 0) });
  }
  cancel(): void {
    this.cancelled = true;
  }
}

/** Guest memory of `pages` pages; page p's first byte is fill(p) (0: the page stays zero). */
function guest(pages: number, fill: (p: number) => number, windowBytes?: number): { ram: Uint8Array; mem: GuestPages } {
  const ab = new ArrayBuffer(pages * PG);
  const ram = new Uint8Array(ab);
  for (let p = 0; p < pages; p++) {
    const v = fill(p);
    if (v) ram.fill(v, p * PG, p * PG + 16);
  }
  // A view, not a copy: offsets into the same buffer.
  const mem = new GuestPages(pages * PG, (off, len) => (off === 0 && len === ab.byteLength ? ab : ab.slice(off, off + len)), windowBytes);
  return { ram, mem };
}

function clock() {
  let t = 0;
  const slept: number[] = [];
  return {
    now: () => t,
    sleep: (ms: number) => {
      slept.push(ms);
      t += ms;
      return Promise.resolve();
    },
    slept,
  };
}

test("sendDirtyPages: every set page in pfn order, zero pages in zero batches, bits cleared, bytes counted", async () => {
  const pages = 40;
  const { mem } = guest(pages, (p) => (p % 3 === 0 ? 0 : p + 1));
  const bm = new MigrationBitmap(pages, bitmapOf(pages, [1, 2]));
  const sink = new FakeSink();
  const c = clock();
  const r = await sendDirtyPages(bm, mem, sink, { vm: "vm1", round: 0, batchPages: 8, bucket: null, ...c, abortReason: () => null });
  assert.equal(bm.dirty, 0);
  const zero = sink.batches.filter((b) => b.zero);
  const data = sink.batches.filter((b) => !b.zero);
  const zeroPfns = zero.flatMap((b) => b.pfns);
  const dataPfns = data.flatMap((b) => b.pfns);
  assert.deepEqual(zeroPfns, Array.from({ length: 14 }, (_, i) => i * 3)); // 0, 3, ..., 39
  assert.deepEqual(dataPfns, Array.from({ length: 40 }, (_, i) => i).filter((p) => p % 3 !== 0 && p !== 1 && p !== 2));
  for (const b of zero) assert.equal(b.data.length, 0);
  for (const b of sink.batches) assert.ok(b.pfns.length <= 8 && b.vm === "vm1" && b.round === 0);
  for (const b of data) {
    assert.equal(b.data.length, b.pfns.length * PG);
    b.pfns.forEach((p, i) => assert.equal(b.data[i * PG], p + 1, `page ${p}`));
  }
  assert.equal(r.pages, 38);
  assert.equal(r.zeroPages, 14);
  assert.equal(r.bytes, 24 * PG);
  assert.equal(r.batches, sink.batches.length);
  assert.equal(sink.drains, 0);
  assert.equal(c.slept.length, 0);
  // Nothing left: a second round sends nothing.
  const again = await sendDirtyPages(bm, mem, new FakeSink(), { vm: "vm1", round: 1, batchPages: 8, bucket: null, ...c, abortReason: () => null });
  assert.equal(again.pages, 0);
});

test("sendDirtyPages: waits for drain on backpressure and sleeps what the token bucket says", async () => {
  const pages = 64;
  const { mem } = guest(pages, (p) => p + 1);
  const bm = new MigrationBitmap(pages);
  const sink = new FakeSink({ full: true });
  const c = clock();
  const rate = 16 * PG; // 16 pages a second
  const r = await sendDirtyPages(bm, mem, sink, {
    vm: "vm1",
    round: 3,
    batchPages: 16,
    bucket: new TokenBucket(rate, c.now(), 16 * PG),
    ...c,
    abortReason: () => null,
  });
  assert.equal(sink.batches.length, 4);
  assert.equal(sink.drains, 4, "one wait per refused write");
  // 4 batches of 16 pages (+8 bytes per pfn) at 16 pages/s with one batch of burst: about 3 s of sleep.
  const slept = c.slept.reduce((a, b) => a + b, 0);
  assert.ok(slept > 3000 && slept < 3100, `slept ${slept} ms`);
  assert.equal(r.elapsedMs, slept);
});

test("sendDirtyPages: a failed stream puts every taken page back in the bitmap and cancels the call", async () => {
  const pages = 100;
  const { mem } = guest(pages, (p) => (p < 50 ? p + 1 : 0));
  const bm = new MigrationBitmap(pages, bitmapOf(pages, [7]));
  for (const failAtBatch of [1, 3]) {
    const sink = new FakeSink({ failAtBatch });
    await assert.rejects(
      sendDirtyPages(bm, mem, sink, { vm: "vm1", round: 0, batchPages: 10, bucket: null, ...clock(), abortReason: () => null }),
      (e: unknown) => e instanceof SendFailed && e.kind === "stream" && /connection reset/.test(e.message),
    );
    assert.equal(bm.dirty, 99, `after a failure at batch ${failAtBatch}`);
    assert.ok(sink.cancelled);
  }
  // The receiver refusing at the end (its answer) is a failure too.
  const sink = new FakeSink({ failOnFinish: true });
  await assert.rejects(
    sendDirtyPages(bm, mem, sink, { vm: "vm1", round: 0, batchPages: 10, bucket: null, ...clock(), abortReason: () => null }),
    /NOT_FOUND/,
  );
  assert.equal(bm.dirty, 99);
  assert.ok(!bm.test(7), "a skipped page is never put back");
  const ok = await sendDirtyPages(bm, mem, new FakeSink(), { vm: "vm1", round: 0, batchPages: 10, bucket: null, ...clock(), abortReason: () => null });
  assert.equal(ok.pages, 99);
});

test("sendDirtyPages: a page dirtied again while its batch is on the wire stays set for the next round; abort stops before reading", async () => {
  const pages = 32;
  const { ram, mem } = guest(pages, (p) => p + 1);
  const bm = new MigrationBitmap(pages);
  // After the first batch (pages 0..7) is written, the guest writes page 3 and a sync sets its bit again.
  const sink = new FakeSink({
    onWrite: (n) => {
      if (n === 1) {
        ram[3 * PG] = 0xee;
        bm.mergeLog(bitmapOf(pages, [3]));
      }
    },
  });
  const r = await sendDirtyPages(bm, mem, sink, { vm: "vm1", round: 0, batchPages: 8, bucket: null, ...clock(), abortReason: () => null });
  assert.equal(r.pages, 32);
  assert.deepEqual(setBits(bm), [3]);
  const next = new FakeSink();
  await sendDirtyPages(bm, mem, next, { vm: "vm1", round: 1, batchPages: 8, bucket: null, ...clock(), abortReason: () => null });
  assert.deepEqual(next.batches.map((b) => [b.pfns, b.data[0]]), [[[3], 0xee]]);

  // An abort (bitmap stopped, VM destroyed) is seen before the next page is read.
  const bm2 = new MigrationBitmap(pages);
  let reads = 0;
  const s2 = new FakeSink();
  await assert.rejects(
    sendDirtyPages(bm2, mem, s2, { vm: "vm1", round: 0, batchPages: 8, bucket: null, ...clock(), abortReason: () => (++reads > 10 ? "vm destroyed" : null) }),
    (e: unknown) => e instanceof SendFailed && e.kind === "aborted" && e.message === "vm destroyed",
  );
  assert.ok(s2.cancelled);
  assert.equal(bm2.dirty, 32, "taken pages are back (a retry after a caller's cancel resends them)");
});

test("checksumPages: crc32c chained over runs of pages not excluded (first pfn, count, bytes); across windows; zero pages counted", async () => {
  const pages = 50;
  const { ram, mem } = guest(pages, (p) => (p % 4 === 0 ? 0 : (p * 7) & 0xff || 1), 3 * PG);
  const exclude = bitmapOf(pages, [1, 2, 49]);
  // The reference, with the pure-JS crc32c of @virtmesh/migration: runs [0, 1) and [3, 49).
  let crc = 0;
  for (const [first, end] of [[0, 1], [3, 49]] as const) {
    const hdr = Buffer.alloc(16);
    hdr.writeBigUInt64LE(BigInt(first), 0);
    hdr.writeBigUInt64LE(BigInt(end - first), 8);
    crc = jsCrc32c(hdr, 0, 16, crc);
    crc = jsCrc32c(ram, first * PG, end * PG, crc);
  }
  let zero = 0;
  for (let p = 0; p < pages; p++) if (p !== 1 && p !== 2 && p !== 49 && p % 4 === 0) zero++;
  let pauses = 0;
  const sum = await checksumPages(mem, exclude, { yieldEvery: 1, pause: () => (pauses++, Promise.resolve()) });
  assert.deepEqual(sum, { digest: `crc32c:${crc.toString(16).padStart(8, "0")}`, pages: 47, zeroPages: zero });
  assert.equal(pauses, 2, "a yield after each run that leaves pages to look at");
  // No exclusion: every page; and a change in one byte changes the sum.
  const all = await checksumPages(mem, new Uint8Array(0));
  assert.equal(all.pages, 50);
  ram[20 * PG + 4095] ^= 1;
  const { mem: mem2 } = guest(pages, () => 0);
  assert.notEqual((await checksumPages(mem, new Uint8Array(0))).digest, all.digest);
  const z = await checksumPages(mem2, new Uint8Array(0));
  assert.equal(z.zeroPages, 50);
  await assert.rejects(
    checksumPages(mem, exclude, { yieldEvery: 1, pause: () => Promise.resolve(), alive: () => "vm 'x' was destroyed" }),
    (e: unknown) => e instanceof GrpcError && e.code === Status.ABORTED,
  );
});
