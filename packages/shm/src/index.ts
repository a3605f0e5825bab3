export {
  DOORBELL_BYTES,
  Doorbell,
  MAX_ARRAY_BUFFER_BYTES,
  MAX_MAPPING_BYTES,
  PAGE_SIZE,
  SharedMapping,
  crc32c,
  mapFile,
} from "./shm";
export type { DoorbellCounters, MapFileOptions, SpinOptions, SpinSyncOptions } from "./shm";
export { measureBareRing, measureDoorbellPingPong } from "./bare-ring";
export type { BareRingResult, PingPongMode, PingPongResult } from "./bare-ring";
