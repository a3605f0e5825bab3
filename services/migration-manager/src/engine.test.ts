// The engine's loop and the manager's rules against a simulated pair of hosts: a source
// whose guest dirties pages between syncs (fewer when throttled), a destination that
// receives them, and every call logged so the order of the protocol can be checked.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { status as Status } from "@grpc/grpc-js";
import { guest, migration, sidecar } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { isFinalPhase, throttleSteps } from "@virtmesh/migration";
import { MigrationManager, type MigrationStore } from "./manager";
import { PeerError, type GuestCalls, type MigrationPeers, type SidecarCalls } from "./peers";

const P = migration.MigrationPhase;
const RS = guest.RunState;
const PAGE = 4096;

interface WorldOpts {
  pages?: number;
  /** Pages the running guest writes before sync n (1-based), at throttle pct. */
  dirty?: (n: number, throttlePct: number) => number;
  bandwidth?: number;
  vfioMappings?: number;
}

class World {
  readonly pages: number;
  readonly src: Uint8Array;
  readonly dst: Uint8Array;
  readonly bitmap: Uint8Array;
  readonly calls: string[] = [];
  srcState = RS.RUN_STATE_RUNNING;
  dstState = RS.RUN_STATE_INCOMING;
  placement = "src";
  throttle = 0;
  throttles: string[] = [];
  syncs = 0;
  walk = 0;
  dstVm = false;
  dirtyLogging = false;
  bitmapOn = false;
  /** Runs before the named call ("src.sidecar.syncDirty", "dst.guest.resume", ...). */
  hooks = new Map<string, () => void | Promise<void>>();
  /** The named call fails with this error. */
  fail = new Map<string, Error>();
  corruptDst = false;
  constructor(readonly opts: WorldOpts = {}) {
    this.pages = opts.pages ?? 512;
    this.src = new Uint8Array(this.pages);
    for (let i = 0; i < this.pages; i += 3) this.src[i] = 1 + (i % 200); // a third of the pages non-zero
    this.dst = new Uint8Array(this.pages);
    this.bitmap = new Uint8Array(this.pages);
  }

  private async enter(name: string): Promise<void> {
    this.calls.push(name);
    await new Promise((r) => setImmediate(r));
    const h = this.hooks.get(name);
    if (h) await h();
    const f = this.fail.get(name);
    if (f) throw f;
  }

  layout(): sidecar.VmLayout {
    return sidecar.VmLayout.fromPartial({
      vm: "vm1",
      memoryBytes: this.pages * PAGE,
      pageSize: PAGE,
      reservedAddr: (this.pages - 4) * PAGE,
      reservedBytes: 4 * PAGE,
      queues: [{ device: "blk0", index: 0, size: 256, descAddr: (this.pages - 4) * PAGE, availAddr: (this.pages - 3) * PAGE, usedAddr: (this.pages - 2) * PAGE }],
    });
  }

  private guestWrites(): number {
    if (this.srcState !== RS.RUN_STATE_RUNNING) return 0;
    const n = this.opts.dirty ? this.opts.dirty(this.syncs, this.throttle) : 0;
    for (let k = 0; k < n; k++) {
      const pfn = this.walk++ % (this.pages - 4);
      this.src[pfn] = (this.src[pfn]! + 1) & 0xff;
      this.dirtyLog.add(pfn);
    }
    return n;
  }
  private dirtyLog = new Set<number>();

  private sum(mem: Uint8Array, exclude: Uint8Array): sidecar.MemoryChecksum {
    const h = createHash("sha256");
    let pages = 0;
    for (let p = 0; p < this.pages; p++) {
      if (exclude.length && exclude[p >> 3]! & (1 << (p & 7))) continue;
      h.update(Uint8Array.of(p & 0xff, mem[p]!));
      pages++;
    }
    return { digest: h.digest("hex"), pages, zeroPages: 0 };
  }

  sidecar(side: "src" | "dst"): SidecarCalls {
    // eslint-disable-next-line @typescript-eslint/no-this-alias -- the fakes close over the world
    const w = this;
    const mem = side === "src" ? this.src : this.dst;
    const at = (n: string) => this.enter(`${side}.sidecar.${n}`);
    return {
      describeVm: async () => (await at("describeVm"), w.layout()),
      createVm: async (r) => {
        await at("createVm");
        assert.equal(r.incoming, true);
        w.dstVm = true;
        return w.layout();
      },
      destroyVm: async () => (await at("destroyVm"), (w.dstVm = false), { existed: true }),
      setDirtyLogging: async (r) => (await at(`setDirtyLogging(${r.enabled})`), (w.dirtyLogging = r.enabled), { enabled: r.enabled }),
      iommuInfo: async () => (await at("iommuInfo"), { iovaPgsizes: PAGE, dirtyTracking: false, pinnedPages: 0, mappings: w.opts.vfioMappings ?? 0 }),
      dirtyPages: async (r) => (await at(`dirtyPages(${r.flags})`), { bitmap: Buffer.alloc(0), dirty: 0 }),
      startMigrationBitmap: async (r) => {
        await at("startMigrationBitmap");
        w.bitmapOn = true;
        let skipped = 0;
        for (let p = 0; p < w.pages; p++) {
          const skip = r.skipBitmap.length > 0 && (r.skipBitmap[p >> 3]! & (1 << (p & 7))) !== 0;
          w.bitmap[p] = skip ? 0 : 1;
          if (skip) skipped++;
        }
        return { pages: w.pages, dirty: w.pages - skipped, skipped };
      },
      syncDirty: async (r) => {
        await at(`syncDirty(${r.vfioReport})`);
        w.syncs++;
        const wrote = w.guestWrites();
        let newDirty = 0;
        for (const p of w.dirtyLog) {
          if (w.bitmap[p]) continue;
          w.bitmap[p] = 1;
          newDirty++;
        }
        w.dirtyLog.clear();
        const remaining = w.bitmap.reduce((a, b) => a + b, 0);
        return { dirtyVcpu: wrote, dirtyDevice: 0, dirtyVfio: 0, newDirty, remaining };
      },
      sendDirty: async (r) => {
        await at(`sendDirty(${r.round})`);
        let pages = 0;
        let zero = 0;
        for (let p = 0; p < w.pages; p++) {
          if (!w.bitmap[p]) continue;
          w.bitmap[p] = 0;
          w.dst[p] = w.src[p]!;
          pages++;
          if (w.src[p] === 0) zero++;
        }
        if (w.corruptDst) w.dst[1] = (w.dst[1]! + 7) & 0xff;
        const bytes = (pages - zero) * PAGE;
        return { pages, zeroPages: zero, bytes, elapsedUs: Math.max(1, Math.round((bytes / (w.opts.bandwidth ?? 100e6)) * 1e6)) };
      },
      stopMigrationBitmap: async () => (await at("stopMigrationBitmap"), (w.bitmapOn = false), { existed: true }),
      checksumMemory: async (r) => (await at("checksumMemory"), w.sum(mem, r.excludeBitmap)),
    };
  }

  guest(side: "src" | "dst"): GuestCalls {
    // eslint-disable-next-line @typescript-eslint/no-this-alias -- the fakes close over the world
    const w = this;
    const at = (n: string) => this.enter(`${side}.guest.${n}`);
    const st = () => guest.GuestState.fromPartial({ vm: "vm1", host: side, state: side === "src" ? w.srcState : w.dstState });
    const set = (s: guest.RunState) => {
      if (side === "src") w.srcState = s;
      else w.dstState = s;
    };
    return {
      getState: async () => (await at("getState"), st()),
      pause: async () => (await at("pause"), set(RS.RUN_STATE_PAUSED), st()),
      resume: async () => {
        await at("resume");
        set(RS.RUN_STATE_RUNNING);
        if (side === "dst") w.placement = "dst";
        return st();
      },
      setThrottle: async (r) => {
        await at("setThrottle");
        w.throttles.push(`${side}:${r.pct}`);
        if (side === "src") w.throttle = r.pct;
        return st();
      },
      getFreePageHint: async () => (await at("getFreePageHint"), { pages: w.pages, free: 0, bitmap: Buffer.alloc(w.pages / 8) }),
      saveState: async (r) => (await at(`saveState(${r.dryRun})`), { state: Buffer.from("device-state"), saveUs: 500, fioRun: "" }),
      loadState: async (r) => {
        await at("loadState");
        assert.equal(Buffer.from(r.state).toString(), "device-state");
        set(RS.RUN_STATE_PAUSED);
        return st();
      },
      release: async () => (await at("release"), set(RS.RUN_STATE_INCOMING), (w.dirtyLogging = false), (w.bitmapOn = false), st()),
      abortIncoming: async () => (await at("abortIncoming"), set(RS.RUN_STATE_INCOMING), (w.dstVm = false), st()),
    };
  }

  peers(): MigrationPeers {
    return {
      sidecar: async (h) => this.sidecar(h as "src" | "dst"),
      guest: async (h) => this.guest(h as "src" | "dst"),
      balloon: async () => ({ getBalloonedPages: async () => ({ vm: "vm1", pages: this.pages, ballooned: 8, bitmap: Buffer.from([0, 0xff, ...new Array<number>(this.pages / 8 - 2).fill(0)]) }) }),
    };
  }
}

class MemStore implements MigrationStore {
  readonly m = new Map<string, migration.MigrationStatus>();
  async put(s: migration.MigrationStatus) {
    this.m.set(s.id, migration.MigrationStatus.fromJSON(migration.MigrationStatus.toJSON(s)));
  }
  async get(id: string) {
    return this.m.get(id);
  }
  async list() {
    return [...this.m.values()];
  }
}

function setup(w: World, store = new MemStore()) {
  const published: migration.MigrationStatus[] = [];
  const mgr = new MigrationManager({
    peers: w.peers(),
    store,
    cluster: {
      vmHost: async () => w.placement,
      hosts: async () => ["dst", "src"],
      registered: async () => true,
    },
    publish: (s) => published.push(s),
    throttlePeriodMs: 0,
  });
  return { mgr, store, published };
}

async function finish(mgr: MigrationManager, id: string): Promise<migration.MigrationStatus> {
  return new Promise((resolve) => {
    void mgr.watch(id, (s, final) => {
      if (final) resolve(s);
    });
  });
}

const req = (over: Partial<migration.StartMigrationRequest> = {}) => migration.StartMigrationRequest.fromPartial({ vm: "vm1", destinationHost: "dst", ...over });

/** The source runs, logs nothing, and the destination holds nothing. */
function assertRolledBack(w: World): void {
  assert.equal(w.srcState, RS.RUN_STATE_RUNNING);
  assert.equal(w.throttle, 0);
  assert.equal(w.dirtyLogging, false);
  assert.equal(w.bitmapOn, false);
  assert.equal(w.dstState, RS.RUN_STATE_INCOMING);
  assert.equal(w.dstVm, false);
  assert.equal(w.placement, "src");
}

test("a guest dirtying slower than the link converges: pre-copy rounds, stop-and-copy, memory matches", async () => {
  const w = new World({ dirty: (n) => Math.max(0, 200 - 60 * n), bandwidth: 4096 * 1000 });
  const { mgr, published, store } = setup(w);
  const first = await mgr.start(req({ downtimeLimitMs: 100 }));
  assert.equal(first.phase, P.MIGRATION_PHASE_SETUP);
  assert.equal(first.id, "vm1-1");
  const s = await finish(mgr, first.id);
  assert.equal(s.phase, P.MIGRATION_PHASE_COMPLETED, s.error);
  assert.equal(s.error, "");
  assert.ok(s.memoryMatch);
  assert.equal(s.sourceChecksum, s.destinationChecksum);
  assert.deepEqual(w.dst, w.src);
  assert.equal(w.placement, "dst");
  assert.equal(w.dstState, RS.RUN_STATE_RUNNING);
  assert.equal(w.srcState, RS.RUN_STATE_INCOMING); // released
  assert.ok(s.rounds.length >= 2, `rounds ${s.rounds.length}`);
  assert.equal(s.rounds[0]!.round, 0);
  assert.equal(s.rounds[0]!.pages, w.pages);
  assert.ok(s.zeroPages > 0);
  assert.ok(s.expectedDowntimeMs <= 100);
  assert.ok(s.transferredBytes > 0);
  assert.equal(s.round, w.syncs);
  // The switchover protocol, in order.
  const order = ["src.guest.pause", "src.guest.saveState(false)", "src.sidecar.syncDirty(0)", `src.sidecar.sendDirty(${s.rounds.at(-1)!.round})`, "dst.guest.loadState", "dst.guest.resume", "src.guest.release"];
  let at = w.calls.indexOf(order[0]!);
  for (const c of order.slice(1)) {
    const i = w.calls.indexOf(c, at + 1);
    assert.ok(i > at, `${c} after ${w.calls[at]} in ${w.calls.join(" ")}`);
    at = i;
  }
  // KV and NATS saw every phase, ending with the final one.
  const phases = [...new Set(published.map((x) => x.phase))];
  assert.deepEqual(phases, [P.MIGRATION_PHASE_SETUP, P.MIGRATION_PHASE_PRECOPY, P.MIGRATION_PHASE_STOP_AND_COPY, P.MIGRATION_PHASE_COMPLETED]);
  assert.equal(store.m.get(s.id)!.phase, P.MIGRATION_PHASE_COMPLETED);
  await assert.rejects(mgr.cancel(s.id), (e: unknown) => e instanceof GrpcError && e.code === Status.FAILED_PRECONDITION);
});

test("ballooned pages are skipped and left out of the checksum", async () => {
  const w = new World({ dirty: () => 0 });
  const { mgr } = setup(w);
  const s = await finish(mgr, (await mgr.start(req({ skipBallooned: true }))).id);
  assert.equal(s.phase, P.MIGRATION_PHASE_COMPLETED, s.error);
  assert.equal(s.skippedPages, 8);
  assert.equal(s.rounds[0]!.pages, w.pages - 8);
  assert.ok(s.memoryMatch);
});

test("a guest outrunning the link without auto-converge fails at max_total_ms and keeps running on the source", async () => {
  const w = new World({ dirty: () => 300, bandwidth: 4096 * 100 });
  const { mgr } = setup(w);
  const s = await finish(mgr, (await mgr.start(req({ maxTotalMs: 200, downtimeLimitMs: 50 }))).id);
  assert.equal(s.phase, P.MIGRATION_PHASE_FAILED);
  assert.match(s.error, /did not converge within max_total_ms 200/);
  assert.match(s.error, /auto-converge off/);
  assert.ok(!w.calls.includes("src.guest.pause"));
  assertRolledBack(w);
  assert.ok(w.calls.includes("dst.guest.abortIncoming"));
});

test("auto-converge throttles 20, 30, ... until the guest fits in the downtime limit", async () => {
  // 300 pages per sync unthrottled; the link sends 100 pages in the 50 ms limit.
  const w = new World({ dirty: (_n, pct) => Math.round(300 * (1 - pct / 100)), bandwidth: 4096 * 2000 });
  const { mgr } = setup(w);
  const s = await finish(mgr, (await mgr.start(req({ autoConverge: true, downtimeLimitMs: 50 }))).id);
  assert.equal(s.phase, P.MIGRATION_PHASE_COMPLETED, s.error);
  const srcSteps = w.throttles.filter((t) => t.startsWith("src:")).map((t) => Number(t.slice(4)));
  assert.deepEqual(srcSteps, throttleSteps(20, 10, 99).slice(0, srcSteps.length));
  assert.ok(srcSteps.length >= 2);
  assert.ok(s.throttlePct >= 20);
  assert.ok(s.rounds.some((r) => r.throttlePct > 0));
  // The destination does not inherit the throttle.
  assert.equal(w.throttles.at(-1), "dst:0");
});

test("cancel in pre-copy: the source runs on untouched, the destination is aborted", async () => {
  const w = new World({ dirty: () => 300, bandwidth: 4096 * 100 });
  const { mgr } = setup(w);
  let id = "";
  w.hooks.set("src.sidecar.sendDirty(2)", () => {
    mgr.cancel(id).then((c) => assert.equal(c.phase, P.MIGRATION_PHASE_CANCELLING), assert.fail);
  });
  id = (await mgr.start(req({ downtimeLimitMs: 10 }))).id;
  const s = await finish(mgr, id);
  assert.equal(s.phase, P.MIGRATION_PHASE_CANCELLED);
  assert.equal(s.error, "cancelled by request");
  assert.ok(!w.calls.includes("src.guest.pause"));
  assert.ok(!w.calls.includes("src.sidecar.sendDirty(3)"));
  assertRolledBack(w);
});

test("cancel during stop-and-copy before the destination resumed: the source resumes", async () => {
  const w = new World({ dirty: () => 0 });
  const { mgr } = setup(w);
  let id = "";
  w.hooks.set("src.guest.saveState(false)", async () => {
    await mgr.cancel(id);
  });
  id = (await mgr.start(req())).id;
  const s = await finish(mgr, id);
  assert.equal(s.phase, P.MIGRATION_PHASE_CANCELLED);
  assert.ok(!w.calls.includes("dst.guest.loadState"));
  assert.ok(w.calls.lastIndexOf("src.guest.resume") > w.calls.indexOf("src.guest.pause"));
  assertRolledBack(w);
});

test("a checksum mismatch fails the migration before the destination loads anything", async () => {
  const w = new World({ dirty: () => 0 });
  w.corruptDst = true;
  const { mgr } = setup(w);
  const s = await finish(mgr, (await mgr.start(req())).id);
  assert.equal(s.phase, P.MIGRATION_PHASE_FAILED);
  assert.match(s.error, /guest memory differs/);
  assert.equal(s.memoryMatch, false);
  assert.ok(!w.calls.includes("dst.guest.loadState"));
  assertRolledBack(w);
});

test("the destination refusing the VM (out of memory) fails setup; the source is never paused", async () => {
  const w = new World();
  w.fail.set("dst.sidecar.createVm", new PeerError("RESOURCE_EXHAUSTED: vm1 is 2 MiB, above VIRTMESH_MAX_VM_BYTES", Status.RESOURCE_EXHAUSTED));
  const { mgr } = setup(w);
  const s = await finish(mgr, (await mgr.start(req())).id);
  assert.equal(s.phase, P.MIGRATION_PHASE_FAILED);
  assert.match(s.error, /CreateVm\(vm1, incoming\) on shm-sidecar@dst: RESOURCE_EXHAUSTED/);
  assert.ok(!w.calls.includes("src.guest.pause"));
  assert.ok(!w.calls.includes("src.sidecar.setDirtyLogging(true)"));
  assertRolledBack(w);
});

test("the destination failing to load the state: the source resumes (its devices restarted by its VMM)", async () => {
  const w = new World();
  w.fail.set("dst.guest.loadState", new PeerError("INVALID_ARGUMENT: device state version 9 is not one this build knows (1)", Status.INVALID_ARGUMENT));
  const { mgr } = setup(w);
  const s = await finish(mgr, (await mgr.start(req())).id);
  assert.equal(s.phase, P.MIGRATION_PHASE_FAILED);
  assert.match(s.error, /LoadState on guest-driver-vm1@dst: INVALID_ARGUMENT: device state version 9/);
  assertRolledBack(w);
});

test("a lost answer to the destination's Resume is not a failure when the destination runs", async () => {
  const w = new World();
  w.hooks.set("dst.guest.resume", () => {
    w.dstState = RS.RUN_STATE_RUNNING;
    w.placement = "dst";
    throw new PeerError("DEADLINE_EXCEEDED: deadline exceeded", Status.DEADLINE_EXCEEDED);
  });
  const { mgr } = setup(w);
  const s = await finish(mgr, (await mgr.start(req())).id);
  assert.equal(s.phase, P.MIGRATION_PHASE_COMPLETED, s.error);
  assert.equal(w.srcState, RS.RUN_STATE_INCOMING);
});

test("StartMigration validates before anything runs", async () => {
  const w = new World();
  const { mgr } = setup(w);
  const code = (c: number) => (e: unknown) => e instanceof GrpcError && e.code === c;
  await assert.rejects(mgr.start(req({ vm: "VM 1" })), code(Status.INVALID_ARGUMENT));
  await assert.rejects(mgr.start(req({ destinationHost: "src" })), code(Status.INVALID_ARGUMENT));
  await assert.rejects(mgr.start(req({ destinationHost: "nowhere" })), code(Status.NOT_FOUND));
  await assert.rejects(mgr.start(req({ sourceHost: "dst", destinationHost: "src" })), code(Status.FAILED_PRECONDITION));
  await assert.rejects(mgr.start(req({ throttleMaxPct: 100 })), code(Status.INVALID_ARGUMENT));
  await assert.rejects(mgr.start(req({ dirtyReporting: 7 as migration.DirtyReporting })), code(Status.INVALID_ARGUMENT));
  w.dstState = RS.RUN_STATE_RUNNING;
  await assert.rejects(mgr.start(req()), (e: unknown) => code(Status.FAILED_PRECONDITION)(e) && /not RUN_STATE_INCOMING/.test((e as Error).message));
  w.dstState = RS.RUN_STATE_INCOMING;
  assert.deepEqual(w.calls.filter((c) => !c.endsWith("getState")), []);
  // One migration per VM.
  w.hooks.set("src.sidecar.describeVm", () => new Promise((r) => setTimeout(r, 50)));
  const first = await mgr.start(req());
  await assert.rejects(mgr.start(req()), code(Status.ALREADY_EXISTS));
  const s = await finish(mgr, first.id);
  assert.ok(isFinalPhase(s.phase));
  assert.equal((await mgr.list()).length, 1);
  await assert.rejects(mgr.get("nope"), code(Status.NOT_FOUND));
});

test("a manager restarted mid-migration fails it cleanly: source resumed, destination aborted", async () => {
  const w = new World();
  w.srcState = RS.RUN_STATE_PAUSED;
  w.dstVm = true;
  w.dirtyLogging = true;
  w.bitmapOn = true;
  w.throttle = 40;
  const store = new MemStore();
  const stale = migration.MigrationStatus.fromPartial({ id: "vm1-3", vm: "vm1", sourceHost: "src", destinationHost: "dst", phase: P.MIGRATION_PHASE_STOP_AND_COPY, throttlePct: 40, startedAtMs: Date.now() - 1000 });
  await store.put(stale);
  const { mgr } = setup(w, store);
  const r = await mgr.recover();
  assert.deepEqual(r.stale, ["vm1-3"]);
  await assert.rejects(mgr.start(req()), (e: unknown) => e instanceof GrpcError && e.code === Status.ALREADY_EXISTS);
  await r.done;
  const s = await mgr.get("vm1-3");
  assert.equal(s.phase, P.MIGRATION_PHASE_FAILED);
  assert.match(s.error, /migration-manager restarted during stop-and-copy/);
  assertRolledBack(w);
  // The next migration gets the next id.
  const next = await mgr.start(req());
  assert.equal(next.id, "vm1-4");
  assert.equal((await finish(mgr, next.id)).phase, P.MIGRATION_PHASE_COMPLETED);
});

test("a manager restarted after the destination resumed completes the migration", async () => {
  const w = new World();
  w.dstState = RS.RUN_STATE_RUNNING;
  w.placement = "dst";
  w.srcState = RS.RUN_STATE_PAUSED;
  const store = new MemStore();
  await store.put(migration.MigrationStatus.fromPartial({ id: "vm1-1", vm: "vm1", sourceHost: "src", destinationHost: "dst", phase: P.MIGRATION_PHASE_STOP_AND_COPY }));
  const { mgr } = setup(w, store);
  await (await mgr.recover()).done;
  const s = await mgr.get("vm1-1");
  assert.equal(s.phase, P.MIGRATION_PHASE_COMPLETED);
  assert.equal(w.srcState, RS.RUN_STATE_INCOMING);
  assert.ok(!w.calls.includes("src.guest.resume"));
});
