import { credentials, Metadata } from "@grpc/grpc-js";
import { context, trace, SpanStatusCode } from "@opentelemetry/api";
import { balloon, callUnary, guest, migration, probe, sidecar, type UnaryMethod } from "@virtmesh/proto";
import { follow, formatReport, progressLine } from "./migrate";
import { shutdownTelemetry, type OtlpReceiver } from "@virtmesh/telemetry";
import { Stack } from "./stack";
import { stackOptions } from "./commands";
import { waitForTrace, renderSpanTree } from "./demo";
import type { ReceivedSpan } from "@virtmesh/telemetry";
import type { Values } from "./main";

const G = probe.Transport.TRANSPORT_GRPC;
const N = probe.Transport.TRANSPORT_NATS;

/** The probe route: every service, both hosts, alternating gRPC and NATS. */
export function demoRoute(src: string, dst: string, vm: string, vmHost: string): probe.ProbeHop[] {
  return [
    { service: "shm-sidecar", host: src, transport: N },
    { service: "vhost-worker", host: src, transport: G },
    { service: "completion-thread", host: src, transport: N },
    { service: "balloon-host", host: src, transport: G },
    { service: `guest-driver-${vm}`, host: vmHost, transport: N },
    { service: "shm-sidecar", host: dst, transport: G },
    { service: "vhost-worker", host: dst, transport: N },
  ];
}

export async function runDemo(v: Values, receiver: OtlpReceiver): Promise<number> {
  const say = (line: string) => process.stdout.write(`${line}\n`);
  const o = stackOptions(v, (line) => say(`  ${line}`));
  o.env = {
    OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
    OTEL_BSP_SCHEDULE_DELAY: "200",
  };
  const stack = new Stack(o);
  let interrupted = false;
  const onSignal = () => {
    if (interrupted) return;
    interrupted = true;
    say("interrupted: tearing down");
    void stack.stop().then(() => process.exit(130));
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);

  const t0 = Date.now();
  say(`virtmesh demo: hosts ${o.hosts.join(", ")}, ${o.vms[0]!.vm} on ${o.vms[0]!.host}`);
  try {
    await stack.start();
    const snap = stack.snapshot();
    say(`stack up in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${snap.services.length} services, NATS ${snap.nats.url}`);
    const mm = snap.services.find((s) => s.name === "migration-manager")!;
    const [src, dst] = [o.hosts[0]!, o.hosts[1] ?? o.hosts[0]!];
    const route = demoRoute(src, dst, o.vms[0]!.vm, o.vms[0]!.host);

    const tracer = trace.getTracer("virtmesh.cli");
    const root = tracer.startSpan("virtmesh demo");
    const traceId = root.spanContext().traceId;
    const client = new probe.ProbeServiceClient(mm.grpc, credentials.createInsecure());
    let res: probe.ProbeResponse;
    try {
      res = await context.with(trace.setSpan(context.active(), root), () =>
        new Promise<probe.ProbeResponse>((resolve, reject) =>
          client.probe({ route, payload: "demo" }, new Metadata(), { deadline: Date.now() + 20_000 }, (err, r) => (err ? reject(err) : resolve(r!))),
        ),
      );
    } catch (e) {
      root.setStatus({ code: SpanStatusCode.ERROR, message: (e as Error).message });
      throw e;
    } finally {
      root.end();
      client.close();
    }
    say("");
    say("probe path (one request through every service):");
    say(`  virtmesh-cli --gRPC--> migration-manager@cluster`);
    for (let i = 1; i < res.visits.length; i++) {
      const a = res.visits[i - 1]!;
      const b = res.visits[i]!;
      const via = b.arrivedBy === N ? "NATS" : "gRPC";
      say(`  ${a.service}@${a.host} --${via}--> ${b.service}@${b.host} (pid ${b.pid})`);
    }
    // Flush this process's spans, then wait for every service's batch to arrive.
    await shutdownTelemetry();
    const names = ["migration-manager", "shm-sidecar", "vhost-worker", "completion-thread", "balloon-host", "guest-driver", "virtmesh-cli"];
    const spans = await waitForTrace(receiver, traceId, names, 10_000);
    say("");
    say(`trace ${traceId} (${spans.length} spans from ${new Set(spans.map((s) => s.service)).size} processes):`);
    say(renderSpanTree(spans));
    say("");
    await workloads(snap.services, o.vms[0]!.vm, o.vms[0]!.host, say);
    if (o.hosts.length > 1) await liveMigration(snap.services, mm.grpc, o.vms[0]!.vm, src, dst, receiver, say);
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    if (!interrupted) {
      say("tearing down");
      await stack.stop();
    }
  }
  say(`demo finished in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  return 0;
}

type Svc = { instance: string; host: string; grpc: string };
/** The demo's gRPC calls: a generous deadline, two hosts share two cores. */
const call = <Req, Res>(c: object, fn: UnaryMethod<Req, Res>, req: Req): Promise<Res> => callUnary(c, fn, req, 60_000);


const MiB = 1024 * 1024;

/** The VM's I/O (verified fio on its virtio-blk disk) and its balloon, on the running stack. */
async function workloads(services: Svc[], vm: string, host: string, say: (line: string) => void): Promise<void> {
  const at = (instance: string) => services.find((s) => s.instance === instance && s.host === host)!.grpc;
  const g = new guest.GuestServiceClient(at(`guest-driver-${vm}`), credentials.createInsecure());
  const b = new balloon.BalloonServiceClient(at("balloon-host"), credentials.createInsecure());
  const m = new sidecar.SharedMemoryServiceClient(at("shm-sidecar"), credentials.createInsecure());
  try {
    say(`${vm}: fio randrw 4k, iodepth 16, 2 jobs, 3 s, verify crc32c on its virtio-blk disk (vhost-worker + completion-thread)`);
    const f = await call(g, g.runFio, { rw: "randrw", blockSize: 4096, iodepth: 16, numjobs: 2, sizeBytes: 16 * MiB, runtimeMs: 3000, verify: "crc32c", rwmixRead: 50, spinlock: "", pvSpinlock: "" });
    say(`  ${f.readIos} reads, ${f.writeIos} writes: ${f.iops.toFixed(0)} IOPS, ${f.mbPerS.toFixed(1)} MB/s, p50 ${f.latP50Us.toFixed(0)} us, p99 ${f.latP99Us.toFixed(0)} us, verify errors ${f.verifyErrors}`);
    const l = f.spinlock;
    if (l) say(`  jobs on ${l.vcpus - 1} guest vCPUs + the boot CPU; vq->lock (${l.kind} spinlock, PV ${l.pv ? "on" : "off"}): ${l.acquisitions} acquisitions, ${l.slowpath} contended, ${l.halts} halts, ${l.kicks} kicks`);

    const st = await call(g, g.getState, {});
    const usage = async () => (await call(m, m.memoryUsage, { vm })).allocatedBytes;
    // Until the balloon reaches its target, or stops moving (the guest has no free page left).
    const waitBalloon = async (pages: number) => {
      const deadline = Date.now() + 30_000;
      let last = -1;
      let still = 0;
      for (;;) {
        const s = await call(b, b.getStats, { vm });
        still = s.actualPages === last ? still + 1 : 0;
        last = s.actualPages;
        if (s.actualPages === pages || still >= 10 || Date.now() > deadline) return s;
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    const before = await usage();
    const target = Math.floor(st.memoryBytes / 4 / MiB) * MiB;
    say(`${vm}: balloon inflate to ${target / MiB} MiB of ${st.memoryBytes / MiB} MiB guest memory`);
    const t0 = Date.now();
    await call(b, b.setTarget, { vm, targetBytes: target });
    const inflated = await waitBalloon(target / 4096);
    const during = await usage();
    say(`  ${inflated.actualPages} of ${target / 4096} pages ballooned in ${Date.now() - t0} ms (${balloon.balloonModeToJSON(inflated.mode)}); guest memory file allocated ${(before / MiB).toFixed(1)} -> ${(during / MiB).toFixed(1)} MiB`);
    await call(b, b.setTarget, { vm, targetBytes: 0 });
    const deflated = await waitBalloon(0);
    say(`  deflated: ${deflated.actualPages} pages in the balloon`);
  } finally {
    g.close();
    b.close();
    m.close();
  }
}

/**
 * The story the product exists to tell: vm1 runs a verified fio and dirties memory on its
 * vCPUs, its balloon is inflated, and it live-migrates from src to dst while all of that
 * goes on; then the report, the integrity checks and the migration's trace.
 */
async function liveMigration(services: Svc[], mmAddr: string, vm: string, src: string, dst: string, receiver: OtlpReceiver, say: (line: string) => void): Promise<void> {
  const at = (instance: string, host: string) => services.find((s) => s.instance === instance && s.host === host)!.grpc;
  const g = new guest.GuestServiceClient(at(`guest-driver-${vm}`, src), credentials.createInsecure());
  const gd = new guest.GuestServiceClient(at(`guest-driver-${vm}`, dst), credentials.createInsecure());
  const b = new balloon.BalloonServiceClient(at("balloon-host", src), credentials.createInsecure());
  const bd = new balloon.BalloonServiceClient(at("balloon-host", dst), credentials.createInsecure());
  const mm = new migration.MigrationServiceClient(mmAddr, credentials.createInsecure());
  try {
    say("");
    say(`live migration of ${vm}: ${src} -> ${dst}`);
    const st = await call(g, g.getState, {});
    const ws = 16 * MiB;
    await call(g, g.startStress, { workingSetBytes: ws, dirtyRateBytesPerS: 32 * MiB, vcpus: 1 });
    say(`  ${vm} dirties a ${ws / MiB} MiB working set at 32 MiB/s on a vCPU (QEMU migration-test's walk)`);
    const balloonBytes = Math.floor(st.memoryBytes / 4 / MiB) * MiB;
    await call(b, b.setTarget, { vm, targetBytes: balloonBytes });
    const deadline = Date.now() + 30_000;
    let inflated = await call(b, b.getStats, { vm });
    while (inflated.actualPages < balloonBytes / 4096 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 200));
      inflated = await call(b, b.getStats, { vm });
    }
    say(`  balloon inflated to ${inflated.actualPages} pages (${((inflated.actualPages * 4096) / MiB).toFixed(0)} MiB): those pages are not sent`);
    // A verified fio that starts on src and finishes on dst; the call follows the VM.
    say(`  fio randrw 4k, iodepth 8, 6 s, verify crc32c runs across the migration`);
    const fio = callUnary(g, g.runFio, { rw: "randrw", blockSize: 4096, iodepth: 8, numjobs: 1, sizeBytes: 8 * MiB, runtimeMs: 6000, verify: "crc32c", rwmixRead: 50, spinlock: "", pvSpinlock: "" }, 120_000);
    fio.catch(() => undefined);
    await new Promise((r) => setTimeout(r, 1000));
    const started = await call(mm, mm.startMigration, {
      vm,
      sourceHost: src,
      destinationHost: dst,
      bandwidthBytesPerS: 512 * MiB,
      downtimeLimitMs: 300,
      autoConverge: true,
      dirtyReporting: migration.DirtyReporting.DIRTY_REPORTING_PRECOPY,
      skipBallooned: true,
      freePageHinting: false,
      maxTotalMs: 120_000,
      throttleInitialPct: 0,
      throttleIncrementPct: 0,
      throttleMaxPct: 0,
    });
    // One progress line a second (and at each phase change); on a terminal, redrawn in place.
    const tty = process.stdout.isTTY === true;
    let lastPhase = -1;
    let lastAt = 0;
    const final = await follow(mm, started.id, (s) => {
      const now = Date.now();
      if (s.phase === lastPhase && now - lastAt < 1000) return;
      const l = `  ${progressLine(s)}`;
      if (tty) process.stdout.write(`\r\x1b[K${l}`);
      else say(l);
      lastPhase = s.phase;
      lastAt = now;
    });
    if (tty) process.stdout.write(`\r\x1b[K  ${progressLine(final)}\n`);
    say("");
    for (const l of formatReport(final).trimEnd().split("\n")) say(l);
    if (final.phase !== migration.MigrationPhase.MIGRATION_PHASE_COMPLETED) throw new Error(`the migration ended ${migration.migrationPhaseToJSON(final.phase)}: ${final.error}`);
    const f = await fio;
    say(`  fio across the migration: ${f.readIos} reads, ${f.writeIos} writes, ${f.iops.toFixed(0)} IOPS, verify errors ${f.verifyErrors}`);
    const v = await call(gd, gd.verifyStress, {});
    say(`  the walk's pattern on ${dst}: ${v.pagesChecked} pages checked, ${v.mismatches} break it${v.firstMismatch ? ` (${v.firstMismatch})` : ""}`);
    const bs = await call(bd, bd.getStats, { vm });
    say(`  balloon on ${dst}: ${bs.actualPages} pages, target ${bs.targetPages}`);
    await call(gd, gd.stopStress, {});
    await call(bd, bd.setTarget, { vm, targetBytes: 0 });
    if (f.verifyErrors !== 0 || v.mismatches !== 0 || !final.memoryMatch) throw new Error("an integrity check failed (see above)");
    if (final.traceId) {
      const names = ["migration-manager", "shm-sidecar", "vhost-worker", "completion-thread", "balloon-host", "guest-driver"];
      const spans = await waitForTrace(receiver, final.traceId, names, 15_000);
      const hosts = new Set(spans.map((x) => x.service));
      say("");
      say(`migration trace ${final.traceId} (${spans.length} spans from ${hosts.size} services on both hosts):`);
      say(renderSpanTree(fewRounds(spans)));
      const jaeger = process.env.VIRTMESH_USER_OTLP_ENDPOINT;
      if (jaeger) say(`  in Jaeger: ${jaeger.replace(/:4318\/?$/, ":16686")}/trace/${final.traceId} (the UI of the collector OTEL_EXPORTER_OTLP_ENDPOINT names)`);
      else say("  set OTEL_EXPORTER_OTLP_ENDPOINT (e.g. Jaeger's http://localhost:4318) to see it in Jaeger");
    }
  } finally {
    for (const c of [g, gd, b, bd, mm]) c.close();
  }
}

/** The migration's span tree with the pre-copy rounds between the second and the last left out (a line says how many). */
function fewRounds(spans: ReceivedSpan[]): ReceivedSpan[] {
  const roundNo = (s: ReceivedSpan) => (/^round (\d+)$/.exec(s.name) ? Number(/^round (\d+)$/.exec(s.name)![1]) : -1);
  const rounds = spans.filter((s) => roundNo(s) >= 0);
  const last = Math.max(...rounds.map(roundNo), 0);
  const drop = new Set(rounds.filter((s) => roundNo(s) > 1 && roundNo(s) < last).map((s) => s.spanId));
  if (drop.size === 0) return spans;
  // Children of a dropped round go too.
  let grew = true;
  while (grew) {
    grew = false;
    for (const s of spans) {
      if (drop.has(s.spanId) || !drop.has(s.parentSpanId)) continue;
      drop.add(s.spanId);
      grew = true;
    }
  }
  const kept = spans.filter((s) => !drop.has(s.spanId));
  const first = rounds.find((s) => roundNo(s) === 1);
  if (first) kept.push({ ...first, spanId: `${first.spanId}-more`, name: `... rounds 2..${last - 1} (${last - 2} of them) left out here`, startNs: first.endNs, endNs: first.endNs, attributes: {} });
  return kept;
}
