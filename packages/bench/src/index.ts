// The `virtmesh bench <name> --json FILE` contract (BRIEF.md, "Contracts"):
// {"bench", "machine", "params", "rows", "summary", "reference"}. Every figure in
// rows and summary comes from the run; reference holds the figures the seed quotes.
import { cpus, totalmem, release, platform, arch } from "node:os";
import { writeFileSync } from "node:fs";
import * as hdr from "hdr-histogram-js";

export type BenchRow = Record<string, string | number | boolean | null>;

export interface BenchResult {
  bench: string;
  machine: MachineInfo;
  params: Record<string, unknown>;
  rows: BenchRow[];
  summary: Record<string, number | string | boolean | null>;
  reference: Record<string, unknown>;
}

export interface MachineInfo {
  cpus: number;
  cpu_model: string;
  memory_bytes: number;
  node: string;
  os: string;
}

export function machineInfo(): MachineInfo {
  const c = cpus();
  return {
    cpus: c.length,
    cpu_model: c[0]?.model ?? "unknown",
    memory_bytes: totalmem(),
    node: process.version,
    os: `${platform()} ${release()} ${arch()}`,
  };
}

export function writeBenchJson(file: string, result: BenchResult): void {
  writeFileSync(file, JSON.stringify(result, null, 2) + "\n");
}

/** Latency recorder in nanoseconds (HdrHistogram, 3 significant digits). */
export class LatencyHistogram {
  private readonly h = hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: 3 });
  record(ns: number): void {
    this.h.recordValue(ns < 1 ? 1 : ns);
  }
  percentileUs(p: number): number {
    return this.h.getValueAtPercentile(p) / 1000;
  }
  get count(): number {
    return this.h.totalCount;
  }
  reset(): void {
    this.h.reset();
  }
  /** The recorded values, compressed, to hand to another thread or process (see merge). */
  encode(): string {
    return hdr.encodeIntoCompressedBase64(this.h);
  }
  /** Adds the values of an encode()d histogram (e.g. one per worker thread) to this one. */
  merge(encoded: string): void {
    this.h.add(hdr.decodeFromCompressedBase64(encoded));
  }
}

/** Formats rows as an aligned text table for the terminal. */
export function formatTable(rows: BenchRow[], columns?: string[]): string {
  if (rows.length === 0) return "(no rows)";
  const cols = columns ?? Object.keys(rows[0]!);
  const cell = (v: unknown) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(2)) : String(v ?? ""));
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (vals: string[]) => vals.map((v, i) => v.padStart(widths[i]!)).join("  ");
  return [line(cols), line(widths.map((w) => "-".repeat(w))), ...rows.map((r) => line(cols.map((c) => cell(r[c]))))].join("\n");
}
