#!/usr/bin/env node
// Runs every test file with node:test. Files are passed explicitly (Node 20 does not
// expand quoted globs). Unit tests first, then e2e suites (which start real processes).
// Extra arguments filter by path substring: `npm test -- virtqueue e2e/stack`.
import { spawnSync } from "node:child_process";
import { readdirSync, statSync } from "node:fs";
import { join, relative, resolve } from "node:path";

const root = resolve(import.meta.dirname, "..");
const skip = new Set(["node_modules", "build", ".git", "gen"]);
function find(dir, out = []) {
  for (const e of readdirSync(dir)) {
    if (skip.has(e)) continue;
    const p = join(dir, e);
    if (statSync(p).isDirectory()) find(p, out);
    else if (e.endsWith(".test.ts")) out.push(relative(root, p));
  }
  return out;
}
const filters = process.argv.slice(2);
const all = ["packages", "services", "cli", "e2e"].flatMap((d) => find(join(root, d))).sort();
const files = filters.length ? all.filter((f) => filters.some((x) => f.includes(x))) : all;
if (files.length === 0) {
  console.error(`no test files match ${filters.join(" ")}`);
  process.exit(1);
}
const unit = files.filter((f) => !f.startsWith("e2e/"));
const e2e = files.filter((f) => f.startsWith("e2e/"));
let failed = false;
for (const [label, set, conc] of [["unit", unit, 2], ["e2e", e2e, 1]]) {
  if (set.length === 0) continue;
  console.log(`# ${label}: ${set.length} files`);
  const r = spawnSync(process.execPath, ["--import", "tsx", "--test", `--test-concurrency=${conc}`, "--test-timeout=600000", ...set], {
    cwd: root,
    stdio: "inherit",
    env: { ...process.env, VIRTMESH_LOG_LEVEL: process.env.VIRTMESH_LOG_LEVEL ?? "warn" },
  });
  if (r.status !== 0) failed = true;
}
process.exit(failed ? 1 : 0);
