// Shared by e2e/balloon*.test.ts: a real nats-server, the real shm-sidecar and
// balloon-host processes for one host, gRPC clients, NATS event capture, and
// guests whose memory this process maps MAP_SHARED.
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { credentials, Metadata, type ServiceError } from "@grpc/grpc-js";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { BuddyAllocator, PAGE_SIZE } from "@virtmesh/balloon";
import { connectNats, Registry, startNatsServer, type NatsServerHandle } from "@virtmesh/nats";
import { balloon, sidecar } from "@virtmesh/proto";
import { mapFile, type SharedMapping } from "@virtmesh/shm";
import { GuestMemory } from "@virtmesh/virtqueue";
import { balloonQueueSpecs, createGuestAllocator } from "@virtmesh/svc-guest-driver/balloon";
import { ROOT } from "./helpers";

type Unary<Req, Res> = (req: Req, md: Metadata, opts: { deadline: number }, cb: (e: ServiceError | null, r?: Res) => void) => unknown;

export function call<Req, Res>(client: object, method: Unary<Req, Res>, req: Req): Promise<Res> {
  return new Promise((resolve, reject) =>
    method.call(client, req, new Metadata(), { deadline: Date.now() + 10_000 }, (e, r) => (e ? reject(e) : resolve(r!))),
  );
}

export async function waitFor<T>(what: string, f: () => Promise<T | undefined> | T | undefined, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export interface BalloonEvent {
  subject: string;
  body: Record<string, unknown>;
}

export interface Guest {
  vm: string;
  layout: sidecar.VmLayout;
  mapping: SharedMapping;
  memory: GuestMemory;
  allocator: BuddyAllocator;
  ramPages: number;
  reservedPages: number;
}

export class BalloonStack {
  nats!: NatsServerHandle;
  nc!: NatsConnection;
  sidecar!: sidecar.SharedMemoryServiceClient;
  balloon!: balloon.BalloonServiceClient;
  readonly events: BalloonEvent[] = [];
  private readonly children: Array<{ name: string; child: ChildProcess; exit: Promise<unknown>; stderr: () => string }> = [];
  private readonly mappings: SharedMapping[] = [];
  private sub?: Subscription;
  private tmp = "";

  constructor(readonly host: string) {}

  private env: NodeJS.ProcessEnv = {};

  async start(): Promise<void> {
    this.nats = await startNatsServer();
    this.tmp = mkdtempSync("/dev/shm/virtmesh-test-");
    this.env = {
      ...process.env,
      NATS_URL: this.nats.url,
      VIRTMESH_HOST: this.host,
      VIRTMESH_SHM_DIR: join(this.tmp, "shm"),
      OTEL_SDK_DISABLED: "true",
    };
    this.nc = await connectNats(this.nats.url, "balloon-e2e");
    this.sub = this.nc.subscribe("virtmesh.vm.*.>", {
      callback: (err, msg) => {
        if (err) return;
        try {
          this.events.push({ subject: msg.subject, body: JSON.parse(msg.string()) as Record<string, unknown> });
        } catch {
          // not JSON: not ours
        }
      },
    });
    this.registry = await Registry.open(this.nc);
    const sc = this.spawnService("shm-sidecar");
    const bh = this.spawnService("balloon-host");
    this.sidecar = new sidecar.SharedMemoryServiceClient((await this.registered("shm-sidecar", sc)).grpc, credentials.createInsecure());
    this.balloon = new balloon.BalloonServiceClient((await this.registered("balloon-host", bh)).grpc, credentials.createInsecure());
  }

  private registry!: Registry;

  private spawnService(name: string): number {
    const child = spawn(process.execPath, ["--require", "tsx/cjs", join(ROOT, "services", name, "src", "main.ts")], {
      cwd: ROOT,
      env: this.env,
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    child.stderr?.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-8000)));
    const exit = new Promise((resolve) => child.once("exit", resolve));
    this.children.push({ name, child, exit, stderr: () => stderr });
    return child.pid!;
  }

  /** The registry entry written by the process `pid` (a restarted service overwrites its predecessor's). */
  private async registered(name: string, pid: number) {
    return waitFor(`${name} (pid ${pid}) to register`, async () => {
      const e = await this.registry.getService(this.host, name);
      return e && e.pid === pid ? e : undefined;
    }, 30_000).catch((e: Error) => {
      const c = this.children.find((x) => x.child.pid === pid);
      throw new Error(`${e.message}; ${name} stderr: ${c?.stderr().slice(-1500)}`);
    });
  }

  /** SIGKILLs balloon-host and starts a new one; the client follows it. */
  async restartBalloonHost(): Promise<void> {
    const old = this.children.find((c) => c.name === "balloon-host" && c.child.exitCode === null && c.child.signalCode === null)!;
    old.child.kill("SIGKILL");
    await old.exit;
    this.balloon.close();
    const pid = this.spawnService("balloon-host");
    this.balloon = new balloon.BalloonServiceClient((await this.registered("balloon-host", pid)).grpc, credentials.createInsecure());
  }

  stderr(name: string): string {
    return this.children.find((x) => x.name === name)?.stderr() ?? "";
  }

  /** A VM with the balloon queues, its memory mapped here, a buddy allocator over guest RAM with its metadata in guest memory. */
  async createGuest(vm: string, memoryBytes: number): Promise<Guest> {
    const layout = await call(this.sidecar, this.sidecar.createVm, { incoming: false, vm, memoryBytes, queues: balloonQueueSpecs(64) });
    const mapping = mapFile(layout.memoryPath, layout.memoryBytes);
    this.mappings.push(mapping);
    const memory = new GuestMemory(mapping.buffer);
    const ramPages = layout.reservedAddr / PAGE_SIZE;
    // As a guest-driver would: fixed areas first (here 64 KiB), then the allocator's metadata.
    const allocator = createGuestAllocator(memory, layout, 64 * 1024);
    const reservedPages = Math.ceil((64 * 1024 + BuddyAllocator.metadataBytes(ramPages)) / PAGE_SIZE);
    assert.equal(allocator.freePages, ramPages - reservedPages);
    return { vm, layout, mapping, memory, allocator, ramPages, reservedPages };
  }

  async allocatedBytes(vm: string): Promise<number> {
    return (await call(this.sidecar, this.sidecar.memoryUsage, { vm })).allocatedBytes;
  }

  async stats(vm: string): Promise<balloon.BalloonStats> {
    return call(this.balloon, this.balloon.getStats, { vm });
  }

  async ballooned(vm: string): Promise<balloon.BalloonedPages> {
    return call(this.balloon, this.balloon.getBalloonedPages, { vm });
  }

  async stop(): Promise<void> {
    for (const m of this.mappings) m.unmap();
    this.sidecar?.close();
    this.balloon?.close();
    // SIGTERM: both services have clean shutdowns (the sidecar removes its files).
    for (const c of [...this.children].reverse()) {
      if (c.child.exitCode === null && c.child.signalCode === null) {
        c.child.kill("SIGTERM");
        const t = setTimeout(() => c.child.kill("SIGKILL"), 10_000);
        await c.exit;
        clearTimeout(t);
      }
    }
    this.sub?.unsubscribe();
    await this.nc?.close();
    await this.nats?.stop();
    if (this.tmp) rmSync(this.tmp, { recursive: true, force: true });
  }
}

/** Makes every guest RAM page above the allocator metadata resident (a read-modify-write per page), as a running guest would. */
export function touchRam(g: Guest): void {
  const b = g.memory.bytes;
  for (let p = g.reservedPages; p < g.ramPages; p++) {
    const o = p * PAGE_SIZE + PAGE_SIZE - 1;
    b[o] = b[o]!;
  }
}

/** Bit `pfn` of a BalloonedPages bitmap. */
export function bit(bitmap: Uint8Array, pfn: number): boolean {
  return ((bitmap[pfn >>> 3]! >>> (pfn & 7)) & 1) === 1;
}

export function popcountBytes(bitmap: Uint8Array): number {
  let n = 0;
  for (const x of bitmap) for (let v = x; v; v &= v - 1) n++;
  return n;
}

export function assertNear(actual: number, expected: number, tolerance: number, what: string): void {
  assert.ok(Math.abs(actual - expected) <= tolerance, `${what}: ${actual} not within ${tolerance} of ${expected}`);
}
