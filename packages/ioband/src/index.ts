export { CgroupTree, ROOT_CGROUP_ID, normalizePath, type BlkioCgroup } from "./cgroup";
export { IobandGroup, RequestQueue, type IobandRequest } from "./group";
export { POLICY_NAMES, type IobandPolicy, type IobandDeviceState, type PolicyName } from "./policy";
export { WeightPolicy, DEFAULT_WEIGHT, DEFAULT_TOKENPOOL } from "./weight";
export { RangeBwPolicy, RANGE_BW_UNIT_BYTES } from "./rangebw";
export { IobandDevice, IobandHead, DEFAULT_IO_LIMIT, DEFAULT_IO_THROTTLE, IOBAND_NAME_MAX, type IobandDeviceOptions, type SubmitResult } from "./device";
export {
  createIobandControl,
  addIobandDevice,
  readDevices,
  writeDevices,
  readSettings,
  writeSettings,
  createCgroup,
  removeCgroup,
  listCgroups,
  attachVmDevice,
  MAX_LINE_BYTES,
  type IobandControlContext,
  type IobandChangeEvent,
  type CgroupResult,
} from "./control";
export { type ControlResult, type ControlError, type ControlOk, type ControlErrorCode } from "./result";
export { strictStrtol } from "./strtol";
export { simulateShares, type SimulateOptions, type SimulateResult, type SimGroup } from "./simulate";
export { runIobandBench } from "./bench";
