// How fast one nats-server serves the JetStream KV operations the cluster registry and the
// migration state use (docs/scaling.md quotes its output). Starts its own nats-server
// (the project's @virtmesh/nats startNatsServer: file store, one server), measures, stops it
// and removes its store.
// Run: node --require tsx/cjs deploy/measure-kv.ts [ops=5000] [inflight=64]
import { connectNats, drainNats, startNatsServer } from "@virtmesh/nats";
import { Kvm, KvWatchInclude } from "@nats-io/kv";

async function main(): Promise<void> {
  const ops = Number(process.argv[2] || 5000);
  const inflight = Number(process.argv[3] || 64);
  const server = await startNatsServer();
  const nc = await connectNats(server.url, "measure-kv", 10_000);
  try {
    const kv = await new Kvm(nc).create("measure-kv", { history: 1 });
    // A registry entry is ~200 bytes of JSON; a MigrationStatus a few hundred.
    const value = new TextEncoder().encode(JSON.stringify({ service: "vhost-worker", host: "host-0", grpc: "10.0.0.1:7102", pid: 1234, startedAt: new Date().toISOString(), meta: { vm: "vm1", shmDir: "/var/lib/virtmesh/shm" } }));
    const keyOf = (i: number) => `svc.host-${i % 1000}.s${i}`;
    const rate = async (label: string, n: number, conc: number, op: (i: number) => Promise<unknown>) => {
      const t0 = process.hrtime.bigint();
      let next = 0;
      await Promise.all(
        Array.from({ length: conc }, async () => {
          while (next < n) await op(next++);
        }),
      );
      const s = Number(process.hrtime.bigint() - t0) / 1e9;
      process.stdout.write(`${label.padEnd(34)} ${n} ops  ${(n / s).toFixed(0).padStart(7)} ops/s  (${((s / n) * 1e6).toFixed(0)} us/op)\n`);
    };
    await rate("put, 1 in flight", ops, 1, (i) => kv.put(keyOf(i), value));
    await rate("get, 1 in flight", ops, 1, (i) => kv.get(keyOf(i)));
    await rate(`put, ${inflight} in flight`, ops, inflight, (i) => kv.put(keyOf(ops + i), value));
    await rate(`get, ${inflight} in flight`, ops, inflight, (i) => kv.get(keyOf(ops + i)));
    // A watcher (what a service does to follow the registry) sees every update.
    let seen = 0;
    const w = await kv.watch({ key: "svc.>", include: KvWatchInclude.UpdatesOnly });
    const done = (async () => {
      for await (const _e of w) if (++seen >= ops) break;
    })();
    await rate(`put with 1 watcher, ${inflight} in flight`, ops, inflight, (i) => kv.put(keyOf(i), value));
    await done;
    process.stdout.write(`keys in bucket: ${(await kv.status()).values}, value ${value.length} bytes, nats-server ${server.url}\n`);
    await kv.destroy();
  } finally {
    await drainNats(nc);
    await server.stop();
  }
}

main().catch((e: Error) => {
  process.stderr.write(`measure-kv: ${e.message}\n`);
  process.exit(1);
});
