export { BuddyAllocator, BuddyError, MAX_ORDER, PAGE_SHIFT, PAGE_SIZE, type BuddyAllocatorOptions, type BuddyStats } from "./buddy";
export { PageRangeList } from "./ranges";
export { BalloonedPages, popcount } from "./ballooned";
export * from "./wire";
export { BalloonDevice, type BalloonDeviceCounters, type BalloonDeviceOptions, type BalloonQueue, type ReleaseFn } from "./device";
export {
  BalloonDriver,
  OOM_VBALLOON_DEFAULT_PAGES,
  type BalloonDriverOptions,
  type BalloonDriverTimings,
  type BalloonTransport,
  type VmEventCounters,
} from "./driver";
export { BalloonRefusedError, LoopbackTransport } from "./loopback";
export { SEED_003_REFERENCE, formatBalloonBench, runBalloonBench, runBalloonBenchWith, type BalloonBenchOptions, type BalloonBenchParams } from "./bench";
export * from "./config-page";
