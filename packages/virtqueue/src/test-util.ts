// Shared helpers for the tests: a guest memory with one queue laid out at 0 and
// a data area after it (a mock driver building rings in a plain buffer).
import { DirtyLog, GuestMemory } from "./guest-memory";
import { splitQueueLayout, type SplitQueueLayout } from "./layout";
import { DeviceQueue, type QueueConfig } from "./device";
import { DriverQueue, indirectAreaBytes } from "./driver";

export interface Harness {
  mem: GuestMemory;
  layout: SplitQueueLayout;
  cfg: QueueConfig;
  driver: DriverQueue;
  device: DeviceQueue;
  /** First free guest-physical byte after rings and indirect area (4 KiB aligned). */
  dataAddr: number;
  vcpuLog: DirtyLog;
  deviceLog: DirtyLog;
}

export function harness(opts: { size?: number; eventIdx?: boolean; indirect?: boolean; notifyOnEmpty?: boolean; memSize?: number; maxIndirect?: number; shared?: boolean } = {}): Harness {
  const size = opts.size ?? 8;
  const memSize = opts.memSize ?? 1 << 20;
  const buffer = opts.shared ? new SharedArrayBuffer(memSize) : new ArrayBuffer(memSize);
  const vcpuLog = DirtyLog.create(memSize, false);
  const deviceLog = DirtyLog.create(memSize, false);
  const mem = new GuestMemory(buffer, { vcpuLog, deviceLog });
  const layout = splitQueueLayout(size, 0);
  const cfg: QueueConfig = { ...layout, eventIdx: opts.eventIdx ?? false, indirect: opts.indirect ?? false, notifyOnEmpty: opts.notifyOnEmpty ?? false };
  const maxIndirect = opts.maxIndirect ?? Math.min(size, 8);
  const indirectAddr = Math.ceil(layout.end / 16) * 16;
  const driver = new DriverQueue(mem, cfg, opts.indirect ? { indirectArea: { addr: indirectAddr, maxIndirect } } : {});
  const device = new DeviceQueue(mem, cfg);
  const after = indirectAddr + (opts.indirect ? indirectAreaBytes(size, maxIndirect) : 0);
  const dataAddr = Math.ceil(after / 4096) * 4096;
  return { mem, layout, cfg, driver, device, dataAddr, vcpuLog, deviceLog };
}
