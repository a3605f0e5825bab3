#!/usr/bin/env node
// Set-up shared by `npm start` and `npm test` (their pre-scripts) on a fresh machine:
// Node version, npm packages (npm ci), the native shm addon, and nats-server.
// Uses nothing but Node itself, so it runs before any dependency is installed.
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { join, resolve } from "node:path";

const root = resolve(import.meta.dirname, "..");
const say = (m) => process.stderr.write(`setup: ${m}\n`);
const fail = (m) => {
  process.stderr.write(`setup: ${m}\n`);
  process.exit(1);
};

const [maj, min] = process.versions.node.split(".").map(Number);
if (maj < 20 || (maj === 20 && min < 19)) fail(`Node ${process.versions.node} is too old: virtmesh needs Node 20.19 or newer`);

const lock = join(root, "package-lock.json");
const installed = join(root, "node_modules", ".package-lock.json");
const addon = join(root, "packages", "shm", "build", "Release", "virtmesh_shm.node");
if (!existsSync(installed) || statSync(installed).mtimeMs < statSync(lock).mtimeMs) {
  // npm install, not npm ci: some registries lack @bufbuild/buf's optional binaries for
  // other platforms, which npm ci counts as a lock-file mismatch.
  say("installing npm packages (npm install)");
  const r = spawnSync("npm", ["install", "--no-audit", "--no-fund"], { cwd: root, stdio: "inherit" });
  if (r.status !== 0) fail("npm install failed (see above)");
}
const addonSource = join(root, "packages", "shm", "native", "shm.cc");
if (!existsSync(addon) || statSync(addon).mtimeMs < statSync(addonSource).mtimeMs) {
  say("building the shared-memory addon (node-gyp)");
  const r = spawnSync("npm", ["rebuild", "@virtmesh/shm"], { cwd: root, stdio: "inherit" });
  if (r.status !== 0 || !existsSync(addon)) fail("building packages/shm failed: it needs python3, make and g++ (apt-get install build-essential python3)");
}

const hasNats = () => {
  try {
    execFileSync(process.env.NATS_SERVER_BIN ?? "nats-server", ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
};
if (!process.env.NATS_URL && !hasNats()) {
  const root_ = process.getuid?.() === 0;
  const apt = spawnSync("sh", ["-c", "command -v apt-get"], { stdio: "ignore" }).status === 0;
  if (root_ && apt) {
    say("installing nats-server (apt-get install nats-server)");
    spawnSync("apt-get", ["update", "-qq"], { stdio: "inherit" });
    const r = spawnSync("apt-get", ["install", "-y", "-qq", "nats-server"], { stdio: "inherit", env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } });
    if (r.status !== 0 || !hasNats()) fail("apt-get install nats-server failed");
  } else {
    fail("nats-server not found on PATH: install it with 'sudo apt-get install nats-server' (or set NATS_URL to a running server)");
  }
}
