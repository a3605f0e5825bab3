// `virtmesh bench balloon`: the seed's experiment. An idle guest (8 GiB; 2 GiB
// with --quick) whose RAM is a real sparse file mapped MAP_SHARED inflates its
// balloon to 7/8 of memory and deflates again, once per mode, in one run. The
// seed's four inflate stages are timed separately:
//   a  allocate      guest allocator hands pages to the balloon driver
//   b  send to host  encode buffers + hand them over (device time subtracted)
//   c  translate     device decodes and validates buffers into page ranges
//   d  release       device punches holes in the guest-memory file
// Freed memory is read from the file's allocated blocks, before and after.

import { existsSync, unlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type BenchResult, type BenchRow, formatTable, machineInfo } from "@virtmesh/bench";
import { mapFile, MAX_ARRAY_BUFFER_BYTES } from "@virtmesh/shm";
import { BuddyAllocator, PAGE_SIZE } from "./buddy";
import { BalloonDevice, type ReleaseFn } from "./device";
import { type BalloonTransport, BalloonDriver } from "./driver";
import { STAT_BALLOONED, STAT_RELEASE_CALLS, STAT_RELEASE_MS, STAT_TRANSLATE_MS, ThreadHandoff } from "./bench-host";
import { LoopbackTransport } from "./loopback";
import { type BalloonMode, PAGE_BITMAP_BUFFER_SIZE, VIRTIO_BALLOON_F_MUST_TELL_HOST, featureBit, featuresForMode } from "./wire";

const GIB = 2 ** 30;
const MIB = 2 ** 20;

/** The only typed-in figures: what the seed quotes (8 GB idle guest, inflate to 7 GB). */
export const SEED_003_REFERENCE = {
  source: "seed 003, [PATCH kernel v4 4/7] virtio-balloon: speed up inflate/deflate process",
  guest_gib: 8,
  inflate_gib: 7,
  pfn_ms: 4126,
  bitmap_ms: 590,
  pfn_stage_share_pct: { a_allocate: 6.5, b_send: 68.3, c_translate: 6.1, d_madvise: 19 },
} as const;

export interface BalloonBenchOptions {
  quick: boolean;
  onProgress?: (line: string) => void;
  /** Directory for the guest-memory file; default $VIRTMESH_SHM_DIR, else /dev/shm, else the temp dir. */
  shmDir?: string;
}

export interface BalloonBenchParams {
  guestBytes: number;
  inflateBytes: number;
  /** Guest kernel memory at the bottom of RAM, never free (holds the allocator metadata and balloon buffers). */
  reservedBytes: number;
  shmDir: string;
  quick: boolean;
  /** Also run PFN lists with the host coalescing them, to separate wire format from bulk release. */
  pfnCoalescedRow: boolean;
  /**
   * "thread" (default): the device runs on its own thread over a second mapping
   * of the guest-memory file, kicked and acknowledged through futex words in
   * shared memory. "loopback": same thread, one await per buffer.
   */
  handoff?: "thread" | "loopback";
}

/** The device side as the bench sees it, wherever it runs. */
interface HostSide {
  handoff: "thread" | "loopback";
  transport: BalloonTransport;
  translateMs(): number;
  releaseMs(): number;
  releaseCalls(): number;
  ballooned(): number;
  stop(): Promise<void>;
}

interface Variant {
  name: string;
  mode: BalloonMode;
  coalescePfn: boolean;
}

interface GuestRam {
  backend: string;
  /** Bytes [0, reservedBytes) of guest memory, for the allocator metadata and the driver's buffers. */
  reserved: ArrayBuffer;
  /** Whether a second thread can map the file (the shm addon is there). */
  shared: boolean;
  touchAll(): void;
  allocatedBytes(): number;
  release: ReleaseFn;
  close(): void;
}

export async function runBalloonBench(opts: BalloonBenchOptions): Promise<BenchResult> {
  const shmDir = opts.shmDir ?? process.env.VIRTMESH_SHM_DIR ?? (existsSync("/dev/shm") ? "/dev/shm" : tmpdir());
  const params: BalloonBenchParams = opts.quick
    ? // The extra PFN row costs a full re-touch of guest memory; --quick skips it to stay within a minute.
      { guestBytes: 2 * GIB, inflateBytes: 1.75 * GIB, reservedBytes: 64 * MIB, shmDir, quick: true, pfnCoalescedRow: false }
    : { guestBytes: 8 * GIB, inflateBytes: 7 * GIB, reservedBytes: 64 * MIB, shmDir, quick: false, pfnCoalescedRow: true };
  return runBalloonBenchWith(params, opts.onProgress);
}

export async function runBalloonBenchWith(p: BalloonBenchParams, onProgress: (line: string) => void = () => {}): Promise<BenchResult> {
  const pages = p.guestBytes / PAGE_SIZE;
  const targetPages = p.inflateBytes / PAGE_SIZE;
  const reservedPages = p.reservedBytes / PAGE_SIZE;
  if (!Number.isInteger(pages) || !Number.isInteger(targetPages) || !Number.isInteger(reservedPages)) throw new RangeError("sizes must be whole pages");
  if (targetPages > pages - reservedPages) throw new RangeError("cannot inflate past the guest's free memory");
  const metaBytes = BuddyAllocator.metadataBytes(pages);
  const bufOffset = Math.ceil(metaBytes / PAGE_SIZE) * PAGE_SIZE;
  if (bufOffset + PAGE_BITMAP_BUFFER_SIZE > p.reservedBytes) throw new RangeError("reserved memory too small for the allocator metadata");

  const variants: Variant[] = [
    { name: "pfn", mode: "pfn", coalescePfn: false },
    ...(p.pfnCoalescedRow ? [{ name: "pfn+host-coalesce", mode: "pfn" as const, coalescePfn: true }] : []),
    { name: "bitmap", mode: "bitmap", coalescePfn: false },
    { name: "reporting", mode: "reporting", coalescePfn: false },
  ];

  let handoff = p.handoff ?? "thread";
  let handoffNote = "";
  const startHost = async (v: Variant, features: number): Promise<HostSide> => {
    if (handoff === "thread" && ram.shared) {
      try {
        const h = await ThreadHandoff.start({ path, size: p.guestBytes, reservedBytes: p.reservedBytes, bufOffset, guestPages: pages, features, coalescePfn: v.coalescePfn });
        return {
          handoff: "thread",
          transport: h,
          translateMs: () => h.stats[STAT_TRANSLATE_MS]!,
          releaseMs: () => h.stats[STAT_RELEASE_MS]!,
          releaseCalls: () => h.stats[STAT_RELEASE_CALLS]!,
          ballooned: () => h.stats[STAT_BALLOONED]!,
          stop: () => h.stop(),
        };
      } catch (e) {
        handoff = "loopback";
        handoffNote = ` (host thread failed to start: ${(e as Error).message})`;
        onProgress(`host thread unavailable, using the in-process loopback${handoffNote}`);
      }
    }
    handoff = "loopback";
    const device = new BalloonDevice({ guestPages: pages, features, release: ram.release, coalescePfn: v.coalescePfn });
    return {
      handoff: "loopback",
      transport: new LoopbackTransport(device),
      translateMs: () => device.counters.translateMs,
      releaseMs: () => device.counters.releaseMs,
      releaseCalls: () => device.counters.releaseCalls,
      ballooned: () => device.ballooned.count,
      stop: async () => {},
    };
  };

  const path = join(p.shmDir, `virtmesh-balloon-bench-${process.pid}-${Date.now()}.mem`);
  const ram = await openGuestRam(path, p.guestBytes, p.reservedBytes);
  onProgress(`guest memory: ${path} (${p.guestBytes / GIB} GiB, ${ram.backend}); inflating ${p.inflateBytes / GIB} GiB per mode`);
  const rows: BenchRow[] = [];
  try {
    for (const v of variants) {
      const t = performance.now();
      ram.touchAll();
      const allocatedBefore = ram.allocatedBytes();
      onProgress(`${v.name}: guest memory touched (${(allocatedBefore / GIB).toFixed(2)} GiB allocated, ${(performance.now() - t).toFixed(0)} ms)`);

      const features = featuresForMode(v.mode, featureBit(VIRTIO_BALLOON_F_MUST_TELL_HOST));
      const allocator = new BuddyAllocator(pages, { reservedPages, metadata: { buffer: ram.reserved, byteOffset: 0 } });
      const host = await startHost(v, features);
      let row: BenchRow;
      try {
        const driver = new BalloonDriver({
          allocator,
          transport: host.transport,
          features,
          buffer: new Uint8Array(ram.reserved, bufOffset, PAGE_BITMAP_BUFFER_SIZE),
        });

        const t0 = performance.now();
        await driver.setTarget(targetPages);
        const inflateMs = performance.now() - t0;
        const allocatedAfter = ram.allocatedBytes();
        if (driver.numPages !== targetPages || host.ballooned() !== targetPages) {
          throw new Error(`${v.name}: balloon holds ${driver.numPages} pages (host ${host.ballooned()}), expected ${targetPages}`);
        }
        const a = driver.timings.allocMs;
        const c = host.translateMs();
        const d = host.releaseMs();
        const b = driver.timings.sendMs - c - d;
        const sum = a + b + c + d;
        const inflateBuffers = driver.timings.buffers;
        const releaseCalls = host.releaseCalls();

        driver.resetTimings();
        const t1 = performance.now();
        await driver.setTarget(0);
        const deflateMs = performance.now() - t1;
        if (host.ballooned() !== 0 || allocator.freePages !== pages - reservedPages) throw new Error(`${v.name}: deflate left the balloon inconsistent`);

        row = {
          mode: v.name,
          handoff: host.handoff,
          inflate_ms: round(inflateMs),
          a_allocate_ms: round(a),
          b_send_ms: round(b),
          c_translate_ms: round(c),
          d_release_ms: round(d),
          a_pct: pct(a, sum),
          b_pct: pct(b, sum),
          c_pct: pct(c, sum),
          d_pct: pct(d, sum),
          buffers: inflateBuffers,
          release_calls: releaseCalls,
          freed_bytes: allocatedBefore - allocatedAfter,
          deflate_ms: round(deflateMs),
          deflate_buffers: driver.timings.buffers,
        };
      } finally {
        await host.stop();
      }
      rows.push(row);
      onProgress(
        `${v.name}: inflate ${row.inflate_ms} ms (a ${row.a_pct}% b ${row.b_pct}% c ${row.c_pct}% d ${row.d_pct}%), ` +
          `${row.buffers} buffers, ${row.release_calls} release calls, freed ${(Number(row.freed_bytes) / GIB).toFixed(3)} GiB; deflate ${row.deflate_ms} ms`,
      );
    }
  } finally {
    ram.close();
    try {
      unlinkSync(path);
    } catch {
      // already gone
    }
  }

  const byMode = (name: string) => rows.find((r) => r.mode === name)!;
  const pfn = byMode("pfn");
  const bitmap = byMode("bitmap");
  const reporting = byMode("reporting");
  const summary: BenchResult["summary"] = {
    pfn_ms: pfn.inflate_ms!,
    bitmap_ms: bitmap.inflate_ms!,
    reporting_ms: reporting.inflate_ms!,
    freed_bytes_bitmap: bitmap.freed_bytes!,
    freed_bytes_pfn: pfn.freed_bytes!,
    freed_bytes_reporting: reporting.freed_bytes!,
    // What the guest and device code spend (a+b+c) apart from the kernel's page release (d).
    bitmap_stages_abc_ms: round(Number(bitmap.a_allocate_ms) + Number(bitmap.b_send_ms) + Number(bitmap.c_translate_ms)),
    bitmap_release_gib_per_s: round(Number(bitmap.freed_bytes) / GIB / (Number(bitmap.d_release_ms) / 1000)),
    bitmap_speedup_vs_pfn: round(Number(pfn.inflate_ms) / Number(bitmap.inflate_ms)),
    goal_bitmap_under_590ms: Number(bitmap.inflate_ms) < SEED_003_REFERENCE.bitmap_ms,
    goal_bitmap_5x_pfn: Number(pfn.inflate_ms) >= 5 * Number(bitmap.inflate_ms),
  };
  if (p.pfnCoalescedRow) summary.pfn_host_coalesce_ms = byMode("pfn+host-coalesce").inflate_ms!;
  for (const [name, r] of [["pfn", pfn], ["bitmap", bitmap], ["reporting", reporting]] as const) {
    summary[`${name}_share_a_pct`] = r.a_pct!;
    summary[`${name}_share_b_pct`] = r.b_pct!;
    summary[`${name}_share_c_pct`] = r.c_pct!;
    summary[`${name}_share_d_pct`] = r.d_pct!;
  }
  return {
    bench: "balloon",
    machine: machineInfo(),
    params: {
      guest_bytes: p.guestBytes,
      inflate_bytes: p.inflateBytes,
      reserved_bytes: p.reservedBytes,
      page_size: PAGE_SIZE,
      quick: p.quick,
      scaled: p.quick ? "quick: 2 GiB guest inflating 1.75 GiB (the seed's 8 GiB / 7 GiB scaled by 1/4)" : null,
      guest_memory: ram.backend,
      shm_dir: p.shmDir,
      transport:
        "per row (column handoff). thread: device on its own thread over a second MAP_SHARED mapping of the guest-memory file; kick and used-buffer ack " +
        "through futex words (Atomics.wait/notify) in shared memory; the driver sleeps until the ack. loopback: driver and device in one thread, " +
        "the device reads the driver's buffer in place, one await per buffer" +
        handoffNote,
      pfn_release: "page by page, as QEMU's balloon_page() per PFN; pfn+host-coalesce merges adjacent PFNs of a buffer",
      features: "MUST_TELL_HOST plus the mode's feature (PAGE_BITMAP=3 / REPORTING=5)",
    },
    rows,
    summary,
    reference: SEED_003_REFERENCE,
  };
}

/** The table with the seed's breakdown beside it, for the terminal. */
export function formatBalloonBench(r: BenchResult): string {
  const ref = SEED_003_REFERENCE;
  const s = ref.pfn_stage_share_pct;
  return [
    formatTable(r.rows, ["mode", "handoff", "inflate_ms", "a_allocate_ms", "b_send_ms", "c_translate_ms", "d_release_ms", "a_pct", "b_pct", "c_pct", "d_pct", "buffers", "release_calls", "freed_bytes", "deflate_ms"]),
    "",
    `seed 003 (${ref.guest_gib} GB guest, inflate ${ref.inflate_gib} GB): PFN ${ref.pfn_ms} ms (a ${s.a_allocate}% b ${s.b_send}% c ${s.c_translate}% d ${s.d_madvise}%), bitmap ${ref.bitmap_ms} ms`,
    `this run: PFN ${r.summary.pfn_ms} ms (a ${r.summary.pfn_share_a_pct}% b ${r.summary.pfn_share_b_pct}% c ${r.summary.pfn_share_c_pct}% d ${r.summary.pfn_share_d_pct}%), ` +
      `bitmap ${r.summary.bitmap_ms} ms (${r.summary.bitmap_speedup_vs_pfn}x), reporting ${r.summary.reporting_ms} ms, bitmap freed ${r.summary.freed_bytes_bitmap} bytes`,
  ].join("\n");
}

async function openGuestRam(path: string, size: number, reservedBytes: number): Promise<GuestRam> {
  // The addon is required: without punch-hole release the bench would measure nothing.
  const m = mapFile(path, size, { create: true });
  const chunk = Math.min(GIB, MAX_ARRAY_BUFFER_BYTES);
  return {
    backend: "sparse file mapped MAP_SHARED via @virtmesh/shm; release = fallocate(PUNCH_HOLE)",
    shared: true,
    reserved: m.view(0, reservedBytes),
    touchAll() {
      // One write per page above the guest kernel's memory: the idle guest has used all its RAM once.
      for (let off = reservedBytes; off < size; off += chunk) {
        const v = new Uint8Array(m.view(off, Math.min(chunk, size - off)));
        for (let i = 0; i < v.length; i += PAGE_SIZE) v[i] = 1;
      }
    },
    allocatedBytes: () => m.allocatedBytes(),
    release: (offset, length) => m.releaseRange(offset, length),
    close: () => m.unmap(),
  };
}

function round(x: number): number {
  return Math.round(x * 100) / 100;
}
function pct(x: number, total: number): number {
  return total > 0 ? Math.round((x / total) * 1000) / 10 : 0;
}
