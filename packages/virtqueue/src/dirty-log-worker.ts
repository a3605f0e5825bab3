// Worker for dirty-log.test.ts: marks pages through DirtyLog.markRange on a
// shared bitmap while the main thread harvests. Never imported.
import { parentPort, workerData } from "node:worker_threads";
import { DirtyLog, DIRTY_PAGE_SIZE } from "./guest-memory";

const { sab, pages, start, step, rounds } = workerData as { sab: SharedArrayBuffer; pages: number; start: number; step: number; rounds: number };
const log = new DirtyLog(sab, pages * DIRTY_PAGE_SIZE);
for (let r = 0; r < rounds; r++) {
  for (let p = start; p < pages; p += step) log.markRange(p * DIRTY_PAGE_SIZE + 100, 1);
  // and a multi-page range that covers whole words
  log.markRange(start * DIRTY_PAGE_SIZE, 64 * DIRTY_PAGE_SIZE);
}
parentPort!.postMessage("done");
