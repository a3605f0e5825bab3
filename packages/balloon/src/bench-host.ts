// The bench's balloon-host side on its own thread: a BalloonDevice over the
// same guest-memory file (mapped a second time), woken through a futex word in
// shared memory the way a kick reaches the device, acknowledging through
// another (the used-buffer interrupt). Stands in for the balloon-host process
// until the services exist; the guest side is ThreadHandoff below.

import { Worker } from "node:worker_threads";
import { join } from "node:path";
import type { BalloonQueue } from "./device";
import type { BalloonTransport } from "./driver";
import { BalloonRefusedError } from "./loopback";
import type { BalloonRequestError } from "./wire";

export const HANDOFF_QUEUES: BalloonQueue[] = ["inflate", "deflate", "reporting", "stats"];
// Int32 slots of the control block.
export const CTL_KICK = 0;
export const CTL_ACK = 1;
export const CTL_QUEUE = 2;
export const CTL_LEN = 3;
export const CTL_RESULT = 4;
export const CTL_STOP = 5;
export const CTL_ERRLEN = 6;
// Float64 slots (byte offset 64): the device's own clocks and counters.
export const STAT_TRANSLATE_MS = 0;
export const STAT_RELEASE_MS = 1;
export const STAT_RELEASE_CALLS = 2;
export const STAT_BALLOONED = 3;
export const CTL_BYTES = 64 + 8 * 8 + 4096;

export interface HostWorkerData {
  path: string;
  size: number;
  reservedBytes: number;
  bufOffset: number;
  guestPages: number;
  features: number;
  coalescePfn: boolean;
  ctl: SharedArrayBuffer;
}

export class ThreadHandoff implements BalloonTransport {
  private readonly ctl: Int32Array;
  readonly stats: Float64Array;
  private readonly errBytes: Uint8Array;

  private constructor(
    private readonly worker: Worker,
    sab: SharedArrayBuffer,
  ) {
    this.ctl = new Int32Array(sab, 0, 16);
    this.stats = new Float64Array(sab, 64, 8);
    this.errBytes = new Uint8Array(sab, 128, 4096);
  }

  /** Starts the host thread; resolves once its device is ready. */
  static async start(data: Omit<HostWorkerData, "ctl">): Promise<ThreadHandoff> {
    const sab = new SharedArrayBuffer(CTL_BYTES);
    const entry = join(__dirname, "bench-host-worker.ts");
    // tsx's CommonJS hook in the worker, whatever flags the parent ran with and
    // whatever the working directory (resolved from this package, not the cwd).
    const tsx = require.resolve("tsx/cjs");
    const worker = new Worker(`require(${JSON.stringify(tsx)}); require(${JSON.stringify(entry)});`, { eval: true, workerData: { ...data, ctl: sab } });
    await new Promise<void>((resolve, reject) => {
      worker.once("message", () => resolve());
      worker.once("error", reject);
      worker.once("exit", (code) => reject(new Error(`balloon host thread exited with ${code} before it was ready`)));
    });
    worker.removeAllListeners();
    return new ThreadHandoff(worker, sab);
  }

  /** Kick, then sleep until the device has used the buffer (virtballoon's wait_event on vb->acked). */
  async send(queue: BalloonQueue, _buf: Uint8Array, len: number): Promise<void> {
    const ctl = this.ctl;
    ctl[CTL_QUEUE] = HANDOFF_QUEUES.indexOf(queue);
    ctl[CTL_LEN] = len;
    const ack = Atomics.load(ctl, CTL_ACK);
    Atomics.add(ctl, CTL_KICK, 1);
    Atomics.notify(ctl, CTL_KICK, 1);
    const deadline = performance.now() + 120_000;
    while (Atomics.load(ctl, CTL_ACK) === ack) {
      // A host thread that died never acks: give up rather than hang the bench.
      if (performance.now() > deadline) throw new Error(`balloon host thread did not acknowledge a ${queue} buffer within 120 s`);
      Atomics.wait(ctl, CTL_ACK, ack, 1000);
    }
    if (ctl[CTL_RESULT] !== 0) {
      const err = JSON.parse(Buffer.from(this.errBytes.subarray(0, ctl[CTL_ERRLEN])).toString("utf8")) as BalloonRequestError;
      throw new BalloonRefusedError(queue, err);
    }
  }

  async stop(): Promise<void> {
    const exited = new Promise<void>((resolve) => this.worker.once("exit", () => resolve()));
    Atomics.store(this.ctl, CTL_STOP, 1);
    Atomics.add(this.ctl, CTL_KICK, 1);
    Atomics.notify(this.ctl, CTL_KICK, 1);
    const timer = setTimeout(() => void this.worker.terminate(), 5000);
    await exited;
    clearTimeout(timer);
  }
}
