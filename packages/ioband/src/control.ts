// The blkio-cgroup control language of seed 001: the cgroupfs files blkio.devices and
// blkio.settings (mm/biotrack.c) and the dm-ioband side that serves them
// (ioband_cgroup_* in drivers/md/dm-ioband-ctl.c). The IobandService gRPC handlers
// call these functions and publish the change events on NATS.
import { CgroupTree, ROOT_CGROUP_ID, type BlkioCgroup } from "./cgroup";
import type { IobandDevice, IobandHead } from "./device";
import type { IobandRequest } from "./group";
import { fail, type ControlError, type ControlResult } from "./result";
import { EACCES, EBUSY, EINVAL, ENODEV, ENOENT, strictStrtol } from "./strtol";

export type IobandChangeEvent =
  | { kind: "device"; device: string; head: string; argv: string[] }
  | { kind: "settings"; device: string; head: string; cgroup: string; cgroupId: number; action: "attach" | "update" | "detach"; value: string | null }
  | { kind: "cgroup"; action: "create" | "remove"; cgroup: string; cgroupId: number }
  | { kind: "vm-device"; vm: string; device: string; cgroup: string; cgroupId: number };

/** The state the control functions work on: one per host (vhost-worker). */
export interface IobandControlContext {
  readonly cgroups: CgroupTree;
  /** ioband_device_list */
  readonly devices: IobandDevice<IobandRequest>[];
  /** Called after every successful change; the service publishes it on NATS. */
  readonly onChange?: (event: IobandChangeEvent) => void;
}

export function createIobandControl(opts: { onChange?: (event: IobandChangeEvent) => void } = {}): IobandControlContext {
  return { cgroups: new CgroupTree(), devices: [], onChange: opts.onChange };
}

/** A cgroupfs write is at most a page; longer lines are refused before parsing. */
export const MAX_LINE_BYTES = 4096;

const ERRNO_NAMES: Record<number, string> = { [EINVAL]: "EINVAL", [ENODEV]: "ENODEV", [EACCES]: "EACCES", [EBUSY]: "EBUSY", [ENOENT]: "ENOENT" };

/** Map a kernel return value to a typed error; the message names the function and errno. */
function errnoResult(r: number, where: string, what: string): ControlError {
  const errno = -r;
  const name = ERRNO_NAMES[errno] ?? `errno ${errno}`;
  const code = errno === EACCES ? "PERMISSION_DENIED" : errno === ENODEV || errno === ENOENT ? "NOT_FOUND" : errno === EBUSY ? "FAILED_PRECONDITION" : "INVALID_ARGUMENT";
  return fail(code, `${what} (${where}: ${name})`);
}

/** argv_split(): words separated by any run of whitespace. */
function argvSplit(line: string): string[] {
  return line.split(/\s+/).filter((w) => w.length > 0);
}

function lookupCgroup(ctx: IobandControlContext, cgroup: string): BlkioCgroup | ControlError {
  const cg = ctx.cgroups.lookup(cgroup);
  return cg ?? fail("NOT_FOUND", `cgroup ${JSON.stringify(cgroup)} does not exist`);
}

function checkLine(line: string): ControlError | null {
  if (Buffer.byteLength(line) > MAX_LINE_BYTES) return fail("INVALID_ARGUMENT", `line longer than ${MAX_LINE_BYTES} bytes`);
  return null;
}

/** All heads, in device-list then head order (list_for_each_entry over g_heads). */
function* allHeads(ctx: IobandControlContext): Generator<IobandHead<IobandRequest>> {
  for (const dp of ctx.devices) for (const h of dp.heads) yield h;
}

/** Register an ioband device; share and head names must be unique on the host. */
export function addIobandDevice(ctx: IobandControlContext, dev: IobandDevice<IobandRequest>): ControlResult {
  const names = new Set<string>();
  for (const dp of ctx.devices) {
    names.add(dp.name);
    for (const h of dp.heads) names.add(h.name);
  }
  if (names.has(dev.name)) return fail("INVALID_ARGUMENT", `ioband name ${dev.name} already in use`);
  for (const h of dev.heads) if (names.has(h.name)) return fail("INVALID_ARGUMENT", `ioband name ${h.name} already in use`);
  ctx.devices.push(dev);
  return { ok: true };
}

/** blkio.devices read: blkio_devs_read() -> ioband_cgroup_show_device(). Same text in every cgroup. */
export function readDevices(ctx: IobandControlContext): ControlResult {
  let text = "";
  for (const dp of ctx.devices) text += dp.showDevice();
  return { ok: true, text };
}

/**
 * blkio.devices write: "<share-or-device> <param> <value>".
 * blkio_devs_write(): `if (cgrp != cgrp->top_cgroup) return -EACCES;` before parsing.
 * ioband_cgroup_config_device(): `if (argc < 1) return -EINVAL;`, the name is looked up
 * as a share name (first head) then as a device name, else -ENODEV; then
 * __ioband_message(--argc, &argv[1]).
 */
export function writeDevices(ctx: IobandControlContext, cgroup: string, line: string): ControlResult {
  const cg = lookupCgroup(ctx, cgroup);
  if ("code" in cg) return cg;
  if (cg.parent !== null) return errnoResult(-EACCES, "blkio_devs_write", "blkio.devices can be written in the root cgroup only");
  const bad = checkLine(line);
  if (bad) return bad;
  const argv = argvSplit(line);
  if (argv.length < 1) return errnoResult(-EINVAL, "ioband_cgroup_config_device", "expected <share-or-device> <param> <value>");
  let found: IobandHead<IobandRequest> | undefined;
  for (const dp of ctx.devices) {
    if (dp.name === argv[0]) {
      found = dp.heads[0];
      break;
    }
    found = dp.heads.find((h) => h.name === argv[0]);
    if (found) break;
  }
  if (!found) return errnoResult(-ENODEV, "ioband_cgroup_config_device", `no ioband share or device named ${JSON.stringify(argv[0])}`);
  const rest = argv.slice(1);
  // attach/detach name a cgroup id: it must be a live cgroup (the kernel takes any id).
  if ((rest[0] === "attach" || rest[0] === "detach") && rest.length === 2) {
    const id = strictStrtol(rest[1]!);
    if (id !== null && id > 0 && !ctx.cgroups.lookup(id)) return errnoResult(-ENOENT, "blkio_cgroup_lookup", `no blkio cgroup with id ${rest[1]}`);
  }
  const r = found.device.message(rest, found);
  if (r < 0) return errnoResult(r, "__ioband_message", `cannot apply ${JSON.stringify(rest.join(" "))} to ${argv[0]}`);
  ctx.onChange?.({ kind: "device", device: found.device.name, head: found.name, argv: rest });
  return { ok: true };
}

/**
 * blkio.settings read: ioband_cgroup_show_group(). For each cgroup-type head where the
 * cgroup has a group (the root always: `(id == 1) ? head : ioband_group_find(head, id)`):
 *   seq_puts(m, name); g_show_group (" weight=%d" / " range-bw=%d:%d"); seq_putc(m, '\n');
 */
export function readSettings(ctx: IobandControlContext, cgroup: string): ControlResult {
  const cg = lookupCgroup(ctx, cgroup);
  if ("code" in cg) return cg;
  let text = "";
  for (const head of allHeads(ctx)) {
    const gp = head.find(cg.id);
    if (!gp) continue;
    text += `${head.name}${head.device.policy.showGroup(gp)}\n`;
  }
  return { ok: true, text };
}

/**
 * blkio.settings write: "<device> <value>" attaches or updates, "<device>" detaches.
 * ioband_cgroup_config_group(): `if (argc != 1 && argc != 2) return -EINVAL;`, the
 * device is a head name else -ENODEV; one argument: `(id == 1) ? -EINVAL :
 * ioband_group_detach(head, id)`; two: attach with the value, or g_set_param(gp, NULL, value).
 */
export function writeSettings(ctx: IobandControlContext, cgroup: string, line: string): ControlResult {
  const cg = lookupCgroup(ctx, cgroup);
  if ("code" in cg) return cg;
  const bad = checkLine(line);
  if (bad) return bad;
  const argv = argvSplit(line);
  if (argv.length !== 1 && argv.length !== 2) return errnoResult(-EINVAL, "ioband_cgroup_config_group", "expected <device> [<value>]");
  let head: IobandHead<IobandRequest> | undefined;
  for (const h of allHeads(ctx)) {
    if (h.name === argv[0]) {
      head = h;
      break;
    }
  }
  if (!head) return errnoResult(-ENODEV, "ioband_cgroup_config_group", `no ioband device named ${JSON.stringify(argv[0])}`);
  const dp = head.device;
  const base = { kind: "settings" as const, device: dp.name, head: head.name, cgroup: cg.path, cgroupId: cg.id };
  if (argv.length === 1) {
    if (cg.id === ROOT_CGROUP_ID) return errnoResult(-EINVAL, "ioband_cgroup_config_group", "the root cgroup cannot be detached");
    const r = dp.detachGroup(head, cg.id);
    if (r < 0) return errnoResult(r, "ioband_group_detach", `cgroup ${cg.path} is not attached to ${head.name}`);
    ctx.onChange?.({ ...base, action: "detach", value: null });
    return { ok: true };
  }
  const value = argv[1]!;
  const gp = head.find(cg.id);
  if (!gp) {
    const r = dp.attachGroup(head, cg.id, value);
    if (r < 0) return errnoResult(r, "ioband_group_attach", `invalid ${dp.policy.name} value ${JSON.stringify(value)}`);
    ctx.onChange?.({ ...base, action: "attach", value });
  } else {
    const r = dp.policy.setParam(gp, null, value);
    if (r < 0) return errnoResult(r, "g_set_param", `invalid ${dp.policy.name} value ${JSON.stringify(value)}`);
    ctx.onChange?.({ ...base, action: "update", value });
  }
  return { ok: true };
}

export type CgroupResult = { ok: true; path: string; id: number } | ControlError;

/** mkdir in the blkio hierarchy (CreateCgroup). */
export function createCgroup(ctx: IobandControlContext, path: string): CgroupResult {
  const cg = ctx.cgroups.create(path);
  if ("code" in cg) return cg;
  ctx.onChange?.({ kind: "cgroup", action: "create", cgroup: cg.path, cgroupId: cg.id });
  return { ok: true, path: cg.path, id: cg.id };
}

/** rmdir: blkio_cgroup_destroy() -> ioband_ops->remove_group(): detached from every device. */
export function removeCgroup(ctx: IobandControlContext, path: string): ControlResult {
  const found = ctx.cgroups.lookup(path);
  if (!found) return fail("NOT_FOUND", `cgroup ${JSON.stringify(path)} does not exist`);
  const cg = ctx.cgroups.remove(path);
  if ("code" in cg) return cg;
  for (const head of allHeads(ctx)) {
    if (head.groups.has(cg.id)) {
      head.device.detachGroup(head, cg.id);
      ctx.onChange?.({ kind: "settings", device: head.device.name, head: head.name, cgroup: cg.path, cgroupId: cg.id, action: "detach", value: null });
    }
  }
  ctx.onChange?.({ kind: "cgroup", action: "remove", cgroup: cg.path, cgroupId: cg.id });
  return { ok: true };
}

export function listCgroups(ctx: IobandControlContext): { path: string; id: number }[] {
  return ctx.cgroups.list().map((c) => ({ path: c.path, id: c.id }));
}

/** AttachDevice: charge a VM's block device to a cgroup (when it is set up, or to move it). */
export function attachVmDevice(ctx: IobandControlContext, vm: string, device: string, cgroup: string): ControlResult {
  const cg = ctx.cgroups.attachVmDevice(vm, device, cgroup);
  if ("code" in cg) return cg;
  ctx.onChange?.({ kind: "vm-device", vm, device, cgroup: cg.path, cgroupId: cg.id });
  return { ok: true };
}
