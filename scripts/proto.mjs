#!/usr/bin/env node
// Regenerates packages/proto/src/gen from proto/ with buf + ts-proto.
// With --check, generates into a temporary directory and fails if the committed
// stubs differ (CI's proto drift check).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative, resolve } from "node:path";

const root = resolve(import.meta.dirname, "..");
const check = process.argv.includes("--check");
const buf = join(root, "node_modules/.bin/buf");
const committed = join(root, "packages/proto/src/gen");

function walk(dir) {
  const out = [];
  for (const e of readdirSync(dir)) {
    const p = join(dir, e);
    if (statSync(p).isDirectory()) out.push(...walk(p));
    else out.push(p);
  }
  return out;
}

execFileSync(buf, ["lint"], { cwd: join(root, "proto"), stdio: "inherit" });
if (!check) {
  rmSync(committed, { recursive: true, force: true });
  execFileSync(buf, ["generate"], { cwd: join(root, "proto"), stdio: "inherit" });
  console.log(`generated ${walk(committed).length} files into ${relative(root, committed)}`);
  process.exit(0);
}

const tmp = mkdtempSync(join(tmpdir(), "virtmesh-proto-"));
try {
  const template = readFileSync(join(root, "proto/buf.gen.yaml"), "utf8")
    .replace("local: ../node_modules/.bin/protoc-gen-ts_proto", `local: ${join(root, "node_modules/.bin/protoc-gen-ts_proto")}`)
    .replace("out: ../packages/proto/src/gen", `out: ${tmp}/gen`);
  writeFileSync(join(tmp, "buf.gen.yaml"), template);
  execFileSync(buf, ["generate", "--template", join(tmp, "buf.gen.yaml")], { cwd: join(root, "proto"), stdio: "inherit" });
  const fresh = walk(join(tmp, "gen")).map((f) => relative(join(tmp, "gen"), f)).sort();
  const old = walk(committed).map((f) => relative(committed, f)).sort();
  const drift = [];
  for (const f of new Set([...fresh, ...old])) {
    let a = null, b = null;
    try { a = readFileSync(join(tmp, "gen", f), "utf8"); } catch { /* missing */ }
    try { b = readFileSync(join(committed, f), "utf8"); } catch { /* missing */ }
    if (a !== b) drift.push(f);
  }
  if (drift.length) {
    console.error(`proto drift: regenerating changes ${drift.join(", ")}; run 'npm run proto' and commit the result`);
    process.exit(1);
  }
  console.log(`proto stubs up to date (${fresh.length} files)`);
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
