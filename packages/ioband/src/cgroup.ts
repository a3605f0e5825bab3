// The host-side blkio cgroup hierarchy (mm/biotrack.c of seed 001): a root "/" and
// named children, each with a numeric id that ioband groups are keyed by.
import { fail, type ControlError } from "./result";

/** The root blkio cgroup's id, the id dm-ioband's cgroup code treats as the head group. */
export const ROOT_CGROUP_ID = 1;

export interface BlkioCgroup {
  readonly path: string;
  readonly id: number;
  readonly parent: BlkioCgroup | null;
  readonly children: Map<string, BlkioCgroup>;
}

// A cgroupfs directory name: no '/', not "." or "..", printable and short (NAME_MAX).
const NAME_RE = /^[A-Za-z0-9_.:@+-]{1,255}$/;

export class CgroupTree {
  readonly root: BlkioCgroup;
  private readonly byPath = new Map<string, BlkioCgroup>();
  private readonly byId = new Map<number, BlkioCgroup>();
  /** "vm/device" -> cgroup id: which cgroup a VM's block device is charged to. */
  private readonly vmDevices = new Map<string, number>();

  constructor() {
    this.root = { path: "/", id: ROOT_CGROUP_ID, parent: null, children: new Map() };
    this.byPath.set("/", this.root);
    this.byId.set(ROOT_CGROUP_ID, this.root);
  }

  lookup(pathOrId: string | number): BlkioCgroup | undefined {
    if (typeof pathOrId === "number") return this.byId.get(pathOrId);
    return this.byPath.get(normalizePath(pathOrId) ?? "");
  }

  /** All cgroups, root first, then in creation order. */
  list(): BlkioCgroup[] {
    return [...this.byPath.values()];
  }

  /** mkdir in the blkio hierarchy: the parent must exist, the name must be new. */
  create(path: string): BlkioCgroup | ControlError {
    const norm = normalizePath(path);
    if (norm === null || norm === "/") return fail("INVALID_ARGUMENT", `invalid cgroup path ${JSON.stringify(path)}`);
    if (this.byPath.has(norm)) return fail("INVALID_ARGUMENT", `cgroup ${norm} already exists`);
    const cut = norm.lastIndexOf("/");
    const parentPath = cut === 0 ? "/" : norm.slice(0, cut);
    const parent = this.byPath.get(parentPath);
    if (!parent) return fail("NOT_FOUND", `parent cgroup ${parentPath} does not exist`);
    // The idr hands out the lowest free id; the root holds 1.
    let id = ROOT_CGROUP_ID + 1;
    while (this.byId.has(id)) id++;
    const cg: BlkioCgroup = { path: norm, id, parent, children: new Map() };
    parent.children.set(norm.slice(cut + 1), cg);
    this.byPath.set(norm, cg);
    this.byId.set(id, cg);
    return cg;
  }

  /**
   * rmdir: the root cannot go, nor a cgroup with children or with a VM device still
   * charged to it (cgroupfs refuses to remove a cgroup that has tasks: EBUSY).
   * The caller (IobandControl) detaches it from every ioband device, as
   * blkio_cgroup_destroy() calls ioband_ops->remove_group().
   */
  remove(path: string): BlkioCgroup | ControlError {
    const cg = this.lookup(path);
    if (!cg) return fail("NOT_FOUND", `cgroup ${path} does not exist`);
    if (cg.parent === null) return fail("INVALID_ARGUMENT", "the root cgroup cannot be removed");
    if (cg.children.size > 0) return fail("FAILED_PRECONDITION", `cgroup ${cg.path} has child cgroups`);
    for (const [key, id] of this.vmDevices) {
      if (id === cg.id) return fail("FAILED_PRECONDITION", `cgroup ${cg.path} still holds VM device ${key}`);
    }
    cg.parent.children.delete(cg.path.slice(cg.path.lastIndexOf("/") + 1));
    this.byPath.delete(cg.path);
    this.byId.delete(cg.id);
    return cg;
  }

  /** Charge a VM's block device to a cgroup (set up or move). */
  attachVmDevice(vm: string, device: string, path: string): BlkioCgroup | ControlError {
    if (!NAME_RE.test(vm) || !NAME_RE.test(device)) return fail("INVALID_ARGUMENT", "vm and device must be non-empty names without spaces or '/'");
    const cg = this.lookup(path);
    if (!cg) return fail("NOT_FOUND", `cgroup ${path} does not exist`);
    this.vmDevices.set(`${vm}/${device}`, cg.id);
    return cg;
  }

  /** The cgroup id a VM device's requests carry; unattached devices belong to the root. */
  cgroupIdOf(vm: string, device: string): number {
    return this.vmDevices.get(`${vm}/${device}`) ?? ROOT_CGROUP_ID;
  }
}

/** "/a/b/" -> "/a/b"; null when a component is not a valid directory name. */
export function normalizePath(path: string): string | null {
  if (!path.startsWith("/")) return null;
  const parts = path.split("/").filter((p) => p.length > 0);
  for (const p of parts) if (p === "." || p === ".." || !NAME_RE.test(p)) return null;
  return "/" + parts.join("/");
}
