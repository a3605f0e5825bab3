// IobandService: the blkio-cgroup control language of seed 001 over gRPC. Reads return the
// text of blkio.devices / blkio.settings; writes carry the line one would echo into them.
// Every field is checked here before the control language sees it; the control
// language's errors (errnos of the seed's functions) come back as gRPC statuses.
import { status as Status } from "@grpc/grpc-js";
import { checkName, ConfigError } from "@virtmesh/config";
import {
  createCgroup,
  listCgroups,
  MAX_LINE_BYTES,
  normalizePath,
  readDevices,
  readSettings,
  removeCgroup,
  writeDevices,
  writeSettings,
  type ControlErrorCode,
  type ControlResult,
} from "@virtmesh/ioband";
import { ioband } from "@virtmesh/proto";
import { GrpcError, unary } from "@virtmesh/runtime";
import type { IobandHost } from "./host";

/** PATH_MAX: longer cgroup paths are refused before they are parsed. */
export const MAX_CGROUP_PATH_BYTES = 4096;

const STATUS: Record<ControlErrorCode, Status> = {
  PERMISSION_DENIED: Status.PERMISSION_DENIED,
  NOT_FOUND: Status.NOT_FOUND,
  INVALID_ARGUMENT: Status.INVALID_ARGUMENT,
  FAILED_PRECONDITION: Status.FAILED_PRECONDITION,
};

function invalid(message: string): GrpcError {
  return new GrpcError(Status.INVALID_ARGUMENT, message);
}

/** A value for a message: quoted, and cut short so a huge field cannot flood the log. */
function quote(v: string): string {
  return JSON.stringify(v.length > 64 ? `${v.slice(0, 64)}…` : v);
}

function checkString(field: string, v: unknown): string {
  if (typeof v !== "string") throw invalid(`${field} must be a string`);
  return v;
}

/** A cgroup path: absolute, each component a cgroupfs directory name, no "." or "..". */
export function checkCgroupPath(field: string, v: unknown): string {
  const s = checkString(field, v);
  if (s === "") throw invalid(`${field} is required (the root cgroup is "/")`);
  if (Buffer.byteLength(s) > MAX_CGROUP_PATH_BYTES) throw invalid(`${field} is longer than ${MAX_CGROUP_PATH_BYTES} bytes`);
  if (normalizePath(s) === null) throw invalid(`${field} ${quote(s)} is not a cgroup path: absolute, components of letters, digits and _.:@+-, no '.' or '..'`);
  return s;
}

/** A control-language line: at most a page (a cgroupfs write), printable text and whitespace. */
export function checkLine(v: unknown): string {
  const s = checkString("line", v);
  if (Buffer.byteLength(s) > MAX_LINE_BYTES) throw invalid(`line is longer than ${MAX_LINE_BYTES} bytes`);
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u0008\u000b\u000e-\u001f\u007f]/.test(s)) throw invalid("line contains control characters");
  return s;
}

function checkVmName(field: string, v: unknown): string {
  const s = checkString(field, v);
  try {
    return checkName(field, s);
  } catch (e) {
    if (e instanceof ConfigError) throw invalid(e.message.replace(`'${s}'`, quote(s)));
    throw e;
  }
}

/** A ControlResult's error as the matching gRPC status with the control language's message. */
export function orThrow(r: ControlResult): string {
  if (!r.ok) throw new GrpcError(STATUS[r.code], r.message);
  return r.text ?? "";
}

export function iobandService(host: IobandHost): ioband.IobandServiceServer {
  const ctl = host.control;
  const exists = (cgroup: string) => {
    if (!ctl.cgroups.lookup(cgroup)) throw new GrpcError(Status.NOT_FOUND, `cgroup ${quote(cgroup)} does not exist`);
  };
  return {
    // blkio.devices reads the same in every cgroup; the cgroup must still exist.
    readDevices: unary((req: ioband.CgroupRef) => {
      const cgroup = checkCgroupPath("cgroup", req.cgroup);
      exists(cgroup);
      return { text: orThrow(readDevices(ctl)) };
    }),
    writeDevices: unary((req: ioband.WriteRequest) => {
      const cgroup = checkCgroupPath("cgroup", req.cgroup);
      const line = checkLine(req.line);
      orThrow(writeDevices(ctl, cgroup, line));
      return {};
    }),
    readSettings: unary((req: ioband.CgroupRef) => {
      const cgroup = checkCgroupPath("cgroup", req.cgroup);
      return { text: orThrow(readSettings(ctl, cgroup)) };
    }),
    writeSettings: unary((req: ioband.WriteRequest) => {
      const cgroup = checkCgroupPath("cgroup", req.cgroup);
      const line = checkLine(req.line);
      orThrow(writeSettings(ctl, cgroup, line));
      return {};
    }),
    createCgroup: unary((req: ioband.CreateCgroupRequest) => {
      const path = checkCgroupPath("path", req.path);
      const r = createCgroup(ctl, path);
      if (!r.ok) throw new GrpcError(STATUS[r.code], r.message);
      return { path: r.path, id: r.id };
    }),
    removeCgroup: unary((req: ioband.CgroupRef) => {
      const cgroup = checkCgroupPath("cgroup", req.cgroup);
      orThrow(removeCgroup(ctl, cgroup));
      return {};
    }),
    listCgroups: unary((_req: ioband.ListCgroupsRequest) => ({ cgroups: listCgroups(ctl) })),
    attachDevice: unary((req: ioband.AttachDeviceRequest) => {
      const vm = checkVmName("vm", req.vm);
      const device = checkVmName("device", req.device);
      const cgroup = checkCgroupPath("cgroup", req.cgroup);
      orThrow(host.attachVmDevice(vm, device, cgroup));
      return {};
    }),
  };
}
