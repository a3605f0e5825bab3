// virtmesh lockbench: the seed-002 micro-benchmark on one configuration — N vCPU threads
// doing lock; counter++; unlock — with the lock statistics of __queue_lockstat.
import { runLockWorkload, isLockKind } from "@virtmesh/qspinlock";
import { UsageError, type Values } from "./main";

function intFlag(name: string, v: string | undefined, dflt: number, min: number, max: number): number {
  if (v === undefined) return dflt;
  if (!/^\d+$/.test(v) || Number(v) < min || Number(v) > max) throw new UsageError(`--${name} ${v} is not an integer in ${min}..${max}`);
  return Number(v);
}

export async function lockbench(v: Values, pos: string[]): Promise<number> {
  if (pos.length) throw new UsageError(`unexpected argument '${pos[0]}'`);
  const lock = v.lock ?? "queue";
  if (!isLockKind(lock)) throw new UsageError(`--lock ${lock} is not a lock kind (ticket or queue)`);
  if (v.pv !== undefined && v.pv !== "on" && v.pv !== "off") throw new UsageError(`--pv ${v.pv} must be on or off`);
  const pv = (v.pv ?? "on") === "on";
  const vcpus = intFlag("vcpus", v.vcpus, 4, 1, 64);
  const iterations = intFlag("iterations", v.iterations, 200_000, 1, 100_000_000);
  const hostCores = v["host-cores"] === undefined ? undefined : intFlag("host-cores", v["host-cores"], 1, 1, 1024);
  // The host's pause-loop exiting: a directed yield every N spins (0 = none, the default; KVM-like: 128).
  const pleWindow = intFlag("ple-window", v["ple-window"], 0, 0, 1 << 20);
  if (pleWindow & (pleWindow - 1)) throw new UsageError(`--ple-window ${pleWindow} must be 0 or a power of 2`);
  const r = await runLockWorkload({ lock, pv, vcpus, iterations, hostCores, unfair: v.unfair === true, timeoutMs: 300_000, pleWindow });
  if (v.json) {
    process.stdout.write(JSON.stringify(r, null, 2) + "\n");
  } else {
    process.stdout.write(
      `${lock} spinlock, PV ${pv ? "on" : "off"}${r.unfair ? ", unfair" : ""}${pleWindow ? `, host PLE every ${pleWindow} spins` : ""}: ${vcpus} vCPUs on ${r.hostCores} host cores (overcommit ${r.overcommit.toFixed(1)}x)\n` +
        `${r.ops} lock/unlock in ${r.elapsedMs.toFixed(1)} ms (${((r.ops / r.elapsedMs) * 1000).toFixed(0)} ops/s); counter ${r.counter} ${r.counter === r.ops ? "(exact)" : "(MUTUAL EXCLUSION BROKEN)"}\n` +
        `stats ${JSON.stringify(r.stats)}\n`,
    );
  }
  if (!r.ok) throw new UsageError(`lockbench failed: ${r.error ?? (r.timedOut ? "timed out" : "unknown error")}`);
  return r.counter === r.ops ? 0 : 1;
}
