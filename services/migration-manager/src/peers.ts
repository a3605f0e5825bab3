// The calls the migration engine makes, as plain async functions. Production binds them
// to gRPC clients found through the registry (grpc-peers.ts); tests bind them to fakes.
import type { balloon, guest, sidecar } from "@virtmesh/proto";

export interface SidecarCalls {
  describeVm(req: sidecar.VmRef): Promise<sidecar.VmLayout>;
  createVm(req: sidecar.CreateVmRequest): Promise<sidecar.VmLayout>;
  destroyVm(req: sidecar.VmRef): Promise<sidecar.DestroyVmResponse>;
  setDirtyLogging(req: sidecar.SetDirtyLoggingRequest): Promise<sidecar.SetDirtyLoggingResponse>;
  iommuInfo(req: sidecar.VmRef): Promise<sidecar.IommuInfoResponse>;
  dirtyPages(req: sidecar.DirtyPagesRequest): Promise<sidecar.DirtyPagesResponse>;
  startMigrationBitmap(req: sidecar.StartMigrationBitmapRequest): Promise<sidecar.StartMigrationBitmapResponse>;
  syncDirty(req: sidecar.SyncDirtyRequest): Promise<sidecar.SyncDirtyResponse>;
  /** Long: the whole round's pages go out before it answers. */
  sendDirty(req: sidecar.SendDirtyRequest, timeoutMs: number): Promise<sidecar.SendDirtyResponse>;
  stopMigrationBitmap(req: sidecar.VmRef): Promise<sidecar.StopMigrationBitmapResponse>;
  checksumMemory(req: sidecar.ChecksumMemoryRequest): Promise<sidecar.MemoryChecksum>;
}

export interface GuestCalls {
  getState(): Promise<guest.GuestState>;
  pause(): Promise<guest.GuestState>;
  resume(): Promise<guest.GuestState>;
  setThrottle(req: guest.ThrottleRequest): Promise<guest.GuestState>;
  getFreePageHint(): Promise<guest.FreePageHint>;
  saveState(req: guest.SaveStateRequest): Promise<guest.VmState>;
  loadState(req: guest.LoadStateRequest): Promise<guest.GuestState>;
  release(req: guest.ReleaseRequest): Promise<guest.GuestState>;
  abortIncoming(): Promise<guest.GuestState>;
}

export interface BalloonCalls {
  getBalloonedPages(req: balloon.VmRef): Promise<balloon.BalloonedPages>;
}

/** Resolves a host's services; each call may fail with a PeerError. */
export interface MigrationPeers {
  sidecar(host: string): Promise<SidecarCalls>;
  guest(host: string, vm: string): Promise<GuestCalls>;
  balloon(host: string): Promise<BalloonCalls>;
}

/** A failed call to another service: which call, on which instance, and the gRPC code. */
export class PeerError extends Error {
  override readonly name = "PeerError";
  constructor(
    message: string,
    readonly code: number,
  ) {
    super(message);
  }
}
