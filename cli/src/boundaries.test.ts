// The repository's boundaries hold: eslint (the project's own config) refuses an import that
// reaches into another workspace's src/ by relative path, and accepts the package name.
import { test } from "node:test";
import assert from "node:assert/strict";
import { join, resolve } from "node:path";
import { ESLint } from "eslint";

const ROOT = resolve(__dirname, "..", "..");
const RULE = "no-restricted-imports";

async function ruleHits(file: string, code: string): Promise<string[]> {
  const eslint = new ESLint({ cwd: ROOT });
  const [r] = await eslint.lintText(code, { filePath: join(ROOT, file) });
  return (r?.messages ?? []).filter((m) => m.ruleId === RULE).map((m) => m.message);
}

test("a service reaching into another service's src/ is refused; its package name is not", async () => {
  const bad = await ruleHits("services/balloon-host/src/x.ts", 'import { balloonQueueSpecs } from "../../guest-driver/src/balloon";\nexport const q = balloonQueueSpecs;\n');
  assert.equal(bad.length, 1);
  assert.match(bad[0]!, /package name/);
  assert.deepEqual(await ruleHits("services/balloon-host/src/x.ts", 'import { balloonQueueSpecs } from "@virtmesh/balloon";\nexport const q = balloonQueueSpecs;\n'), []);
});

test("a library reaching into another library's src/ is refused; a relative import inside its own src/ is not", async () => {
  assert.equal((await ruleHits("packages/vfio/src/x.ts", 'import { DirtyLog } from "../../virtqueue/src/guest-memory";\nexport const d = DirtyLog;\n')).length, 1);
  assert.deepEqual(await ruleHits("packages/vfio/src/x.ts", 'import { VfioContainer } from "./container";\nexport const c = VfioContainer;\n'), []);
});

test("e2e may drive the launcher in cli/src, but not a service's src/ nor a bench's internals", async () => {
  assert.deepEqual(await ruleHits("e2e/x.test.ts", 'import { Stack } from "../cli/src/stack";\nexport const s = Stack;\n'), []);
  assert.equal((await ruleHits("e2e/x.test.ts", 'import { x } from "../services/shm-sidecar/src/layout";\nexport const y = x;\n')).length, 1);
  assert.equal((await ruleHits("e2e/x.test.ts", 'import { runRingBench } from "../cli/src/bench-ring/ring";\nexport const r = runRingBench;\n')).length, 1);
});
