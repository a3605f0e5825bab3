import assert from "node:assert/strict";
import { existsSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import fc from "fast-check";
import { MAX_ARRAY_BUFFER_BYTES, PAGE_SIZE, mapFile, type SharedMapping } from "./index";
import { startChild, tempShmDir, type TestChild } from "./test-support";

const dir = tempShmDir();
const children: TestChild[] = [];
const mappings: SharedMapping[] = [];
let fileNo = 0;
const fresh = (): string => join(dir, `f${fileNo++}`);
const track = (m: SharedMapping): SharedMapping => {
  mappings.push(m);
  return m;
};

after(async () => {
  await Promise.all(children.map((c) => c.kill()));
  for (const m of mappings) m.unmap();
  rmSync(dir, { recursive: true, force: true });
});

describe("mapFile across processes", () => {
  test("two processes map the same file and see each other's writes", async () => {
    const path = fresh();
    const m = track(mapFile(path, 2 * PAGE_SIZE, { create: true }));
    const w = new Int32Array(m.buffer);
    const child = startChild(["map-write", path, String(2 * PAGE_SIZE)]);
    children.push(child);
    await child.waitFor((x) => x.ready === true, "ready");
    assert.equal(Atomics.load(w, 1), 0x0c0ffee, "parent sees the child's write");
    Atomics.store(w, 2, 0x0beef);
    const seen = await child.waitFor((x) => x.sawParent === true, "child to see the parent's write");
    assert.equal(seen.parentWord, 0x0beef);
    assert.equal(await child.exited, 0);
  });

  test("Atomics.add from two processes on the mapped Int32Array gives the exact total", async () => {
    const path = fresh();
    const m = track(mapFile(path, PAGE_SIZE, { create: true }));
    const w = new Int32Array(m.buffer);
    const iters = 300_000;
    const child = startChild(["atomics-add", path, String(iters)]);
    children.push(child);
    await child.waitFor((x) => x.ready === true, "ready");
    Atomics.store(w, 0, 1);
    for (let i = 0; i < iters; i++) Atomics.add(w, 1, 1);
    await child.waitFor((x) => x.done === true, "done");
    assert.equal(await child.exited, 0);
    assert.equal(Atomics.load(w, 1), 2 * iters);
  });

  test("releaseRange drops allocatedBytes and every mapping reads zeros there", async () => {
    const path = fresh();
    const pages = 16;
    const size = pages * PAGE_SIZE;
    const m = track(mapFile(path, size, { create: true }));
    assert.equal(m.allocatedBytes(), 0, "a new file is sparse");
    new Uint8Array(m.buffer).fill(0xa5);
    const full = m.allocatedBytes();
    assert.ok(full >= size, `allocated ${full} after touching ${size} bytes`);

    const other = track(mapFile(path, size)); // a second mapping of the same file
    m.releaseRange(4 * PAGE_SIZE, 8 * PAGE_SIZE);
    // Read allocatedBytes before touching the hole: on tmpfs any access,
    // even a read, through a shared mapping allocates the page again.
    assert.equal(full - m.allocatedBytes(), 8 * PAGE_SIZE);

    const child = startChild(["read-zero", path, String(size), String(4 * PAGE_SIZE), String(8 * PAGE_SIZE)]);
    children.push(child);
    assert.equal((await child.waitFor((x) => "zero" in x, "read-zero")).zero, true, "another process reads zeros");
    const a = new Uint8Array(m.buffer);
    const b = new Uint8Array(other.buffer);
    for (let i = 0; i < size; i += 509) {
      const expect = i >= 4 * PAGE_SIZE && i < 12 * PAGE_SIZE ? 0 : 0xa5;
      assert.equal(a[i], expect, `byte ${i}`);
      assert.equal(b[i], expect, `byte ${i} via the second mapping`);
    }
    assert.equal(statSync(path).size, size, "the file keeps its size");
  });

  test("a 16 GiB mapping is sparse; views reach its end", () => {
    const size = 16 * 2 ** 30;
    const m = track(mapFile(fresh(), size, { create: true }));
    assert.equal(m.size, size);
    assert.equal(m.allocatedBytes(), 0);
    if (size > MAX_ARRAY_BUFFER_BYTES) assert.throws(() => m.buffer, RangeError);
    const tail = new Int32Array(m.view(size - 2 * PAGE_SIZE, 2 * PAGE_SIZE));
    tail[0] = 7;
    tail[tail.length - 1] = 9;
    assert.equal(m.allocatedBytes(), 2 * PAGE_SIZE);
    m.releaseRange(size - 2 * PAGE_SIZE, 2 * PAGE_SIZE);
    assert.equal(m.allocatedBytes(), 0);
    m.unmap();
    assert.equal(tail.length, 0, "the view is detached by unmap");
  });
});

describe("mapFile lifecycle", () => {
  test("unmap detaches the buffers, is idempotent, and later calls fail clearly", () => {
    const path = fresh();
    const m = mapFile(path, PAGE_SIZE, { create: true });
    const buf = m.buffer;
    const w = new Int32Array(buf);
    const v = m.view(0, 64);
    w[0] = 1;
    m.unmap();
    m.unmap();
    assert.equal(m.mapped, false);
    assert.equal(buf.byteLength, 0);
    assert.equal(v.byteLength, 0);
    assert.equal(w.length, 0);
    assert.throws(() => Atomics.add(w, 0, 1), TypeError);
    assert.throws(() => m.allocatedBytes(), /unmapped/);
    assert.throws(() => m.releaseRange(0, PAGE_SIZE), /unmapped/);
    assert.throws(() => m.view(0, 4), /unmapped/);
    rmSync(path);
    assert.equal(existsSync(path), false);
  });

  test("create is exclusive, open needs an existing file at least `size` long, mode is exact", () => {
    const path = fresh();
    const m = track(mapFile(path, PAGE_SIZE, { create: true, mode: 0o640 }));
    assert.equal(statSync(path).mode & 0o7777, 0o640);
    assert.throws(() => mapFile(path, PAGE_SIZE, { create: true }), (e: NodeJS.ErrnoException) => e.code === "EEXIST");
    assert.throws(() => mapFile(join(dir, "missing"), PAGE_SIZE), (e: NodeJS.ErrnoException) => e.code === "ENOENT");
    assert.throws(() => mapFile(path, PAGE_SIZE + 1), RangeError);
    assert.throws(() => mapFile(dir, PAGE_SIZE), (e: NodeJS.ErrnoException) => e.code === "EISDIR");
    const small = fresh();
    writeFileSync(small, "abc");
    const s = track(mapFile(small, 2));
    assert.equal(new Uint8Array(s.buffer)[1], "b".charCodeAt(0));
    m.unmap();
  });
});

describe("argument validation", () => {
  test("mapFile rejects bad arguments with TypeError/RangeError", () => {
    const p = join(dir, "never-created");
    const bad: Array<[() => unknown, typeof TypeError | typeof RangeError]> = [
      [() => mapFile(42 as unknown as string, PAGE_SIZE), TypeError],
      [() => mapFile("", PAGE_SIZE), TypeError],
      [() => mapFile(p + "\0x", PAGE_SIZE, { create: true }), TypeError],
      [() => mapFile(p, 1.5, { create: true }), TypeError],
      [() => mapFile(p, "4096" as unknown as number, { create: true }), TypeError],
      [() => mapFile(p, NaN, { create: true }), TypeError],
      [() => mapFile(p, 0, { create: true }), RangeError],
      [() => mapFile(p, -4096, { create: true }), RangeError],
      [() => mapFile(p, 2 ** 60, { create: true }), RangeError],
      [() => mapFile(p, PAGE_SIZE, { create: "yes" as unknown as boolean }), TypeError],
      [() => mapFile(p, PAGE_SIZE, { create: true, mode: 0o10000 }), RangeError],
      [() => mapFile(p, PAGE_SIZE, { create: true, mode: -1 }), RangeError],
      [() => mapFile(p, PAGE_SIZE, null as unknown as object), TypeError],
    ];
    for (const [call, kind] of bad) assert.throws(call, kind);
    assert.equal(existsSync(p), false, "a rejected call creates nothing");
  });

  test("releaseRange and view check alignment and bounds (property)", () => {
    const size = 8 * PAGE_SIZE + 100; // a partial last page
    const m = track(mapFile(fresh(), size, { create: true }));
    assert.throws(() => m.releaseRange(1, PAGE_SIZE), /page size/);
    assert.throws(() => m.releaseRange(0, 100), /page size/);
    assert.throws(() => m.releaseRange(0, size + PAGE_SIZE), RangeError);
    assert.throws(() => m.releaseRange(-PAGE_SIZE, PAGE_SIZE), RangeError);
    assert.throws(() => m.releaseRange(0.5, PAGE_SIZE), TypeError);
    assert.throws(() => m.view(size, 1), RangeError);
    m.releaseRange(8 * PAGE_SIZE, 100); // the tail page may be partial
    fc.assert(
      fc.property(fc.integer({ min: -2 * PAGE_SIZE, max: size + PAGE_SIZE }), fc.integer({ min: -PAGE_SIZE, max: size + PAGE_SIZE }), (off, len) => {
        const valid =
          off >= 0 && len >= 0 && off + len <= size && off % PAGE_SIZE === 0 && (len % PAGE_SIZE === 0 || off + len === size);
        if (valid) {
          m.releaseRange(off, len);
        } else {
          assert.throws(() => m.releaseRange(off, len), RangeError);
        }
        const viewOk = off >= 0 && len >= 0 && off + len <= size;
        if (viewOk) assert.equal(m.view(off, len).byteLength, len);
        else assert.throws(() => m.view(off, len), RangeError);
      }),
      { numRuns: 300 },
    );
  });
});

test("the temp dir holds only what the tests still track", () => {
  for (const name of readdirSync(dir)) assert.match(name, /^f\d+$|^never-created$/);
});
