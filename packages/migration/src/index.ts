// @virtmesh/migration: the pure parts of live migration (no I/O). The engine that drives
// the stack lives in services/migration-manager; the guest-driver, vhost-worker and
// balloon-host build and read the device-state envelope with this package.
export { crc32c } from "./crc32c";
export {
  DEVICE_STATE_MAGIC,
  DEVICE_STATE_VERSION,
  DEVICE_STATE_VERSIONS,
  DeviceState,
  DeviceStateError,
  decodeDeviceState,
  encodeDeviceState,
  type DecodeOptions,
  type DeviceStateErrorKind,
  type DeviceStateInput,
  type DeviceStateSection,
} from "./envelope";
export { PAGE_SIZE, bitmapBytes, newBitmap, testBit, setBit, clearBit, bitmapOr, bitmapOrInto, maskTail, popcount, setPfns } from "./bitmap";
export {
  AutoConverge,
  DEFAULT_DOWNTIME_LIMIT_MS,
  DEFAULT_MAX_TOTAL_MS,
  DEFAULT_THROTTLE_INCREMENT_PCT,
  DEFAULT_THROTTLE_INITIAL_PCT,
  DEFAULT_THROTTLE_MAX_PCT,
  DEFAULT_THROTTLE_TRIGGER_PCT,
  MAX_DOWNTIME_LIMIT_MS,
  MAX_TOTAL_MS_LIMIT,
  MigrationLimitError,
  THROTTLE_PERIOD_MS,
  dirtyRate,
  expectedDowntimeMs,
  measuredBandwidth,
  pastMaxTotal,
  resolveLimits,
  shouldSwitchover,
  throttleSteps,
  type AutoConvergeParams,
  type MigrationLimits,
  type MigrationLimitsInput,
  type ThrottleDecision,
} from "./convergence";
export { FINAL_PHASES, emptyRound, isFinalPhase, migrationStatus, phaseName, u32, u64, type MigrationCounters } from "./status";
