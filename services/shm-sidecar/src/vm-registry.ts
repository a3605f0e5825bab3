// The VMs this sidecar serves, by name. Every method is synchronous, so
// handlers never interleave halfway through creating or destroying a VM.
import { status as Status } from "@grpc/grpc-js";
import type { sidecar } from "@virtmesh/proto";
import { GrpcError } from "@virtmesh/runtime";
import { checkMemoryBytes, checkVmName, placeQueues } from "./layout";
import { VmMemory } from "./vm-memory";

export class VmRegistry {
  private readonly vms = new Map<string, VmMemory>();

  constructor(
    readonly shmDir: string,
    readonly host: string,
    readonly maxVmBytes: number,
  ) {}

  create(req: sidecar.CreateVmRequest): VmMemory {
    const name = checkVmName("vm", req.vm);
    let memoryBytes: number;
    try {
      memoryBytes = checkMemoryBytes(req.memoryBytes, this.maxVmBytes);
    } catch (e) {
      // The destination of a migration out of memory: refused at setup, nothing created.
      if (req.incoming && e instanceof GrpcError) throw new GrpcError(e.code, `incoming vm '${name}' refused on host ${this.host}: ${e.message}`);
      throw e;
    }
    const placement = placeQueues(memoryBytes, req.queues);
    if (this.vms.has(name)) throw new GrpcError(Status.ALREADY_EXISTS, `vm '${name}' already exists on host ${this.host}`);
    // An incoming VM gets exactly the layout a normal one with the same arguments gets
    // (placeQueues is a function of them alone), empty memory and no dirty logging.
    const vm = VmMemory.create(this.shmDir, name, memoryBytes, placement, req.incoming);
    this.vms.set(name, vm);
    return vm;
  }

  /** The VM named in a request's `vm` field: INVALID_ARGUMENT for a bad name, NOT_FOUND for an unknown one. */
  get(name: string): VmMemory {
    checkVmName("vm", name);
    const vm = this.vms.get(name);
    if (!vm) throw new GrpcError(Status.NOT_FOUND, `vm '${name}' does not exist on host ${this.host}`);
    return vm;
  }

  list(): VmMemory[] {
    return [...this.vms.values()];
  }

  get size(): number {
    return this.vms.size;
  }

  /** Removes the VM; false when there was none (DestroyVm is idempotent). Returns the files it could not remove. */
  destroy(name: string): { existed: boolean; problems: string[] } {
    checkVmName("vm", name);
    const vm = this.vms.get(name);
    if (!vm) return { existed: false, problems: [] };
    this.vms.delete(name);
    return { existed: true, problems: vm.destroy() };
  }

  /** Shutdown: every VM unmapped and removed. Returns what could not be removed. */
  destroyAll(): string[] {
    const problems: string[] = [];
    for (const name of [...this.vms.keys()]) problems.push(...this.destroy(name).problems);
    return problems;
  }
}
