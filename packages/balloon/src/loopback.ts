// In-process transport: the device reads the driver's buffer in place (as a
// host reads a virtqueue data buffer in shared guest memory) and the driver
// resumes on the next microtask, standing in for kick + used-buffer interrupt.
// Used by the tests and the bench until the virtqueue transport is wired.

import type { BalloonDevice, BalloonQueue } from "./device";
import type { BalloonTransport } from "./driver";
import type { BalloonRequestError } from "./wire";

export class BalloonRefusedError extends Error {
  constructor(
    readonly queue: BalloonQueue,
    readonly error: BalloonRequestError,
  ) {
    super(`balloon device refused ${queue} buffer: ${error.kind}: ${error.message}`);
    this.name = "BalloonRefusedError";
  }
}

export class LoopbackTransport implements BalloonTransport {
  constructor(
    private readonly device: BalloonDevice,
    private readonly onSend?: (queue: BalloonQueue, buf: Uint8Array, len: number) => void,
  ) {}

  async send(queue: BalloonQueue, buf: Uint8Array, len: number): Promise<void> {
    this.onSend?.(queue, buf, len);
    const err = this.device.handle(queue, buf, len);
    if (err) throw new BalloonRefusedError(queue, err);
  }
}
