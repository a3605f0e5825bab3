// Generated gRPC stubs, one namespace per API. Regenerate with `npm run proto`;
// CI fails when regenerating changes the committed files (`npm run proto:check`).
export * as health from "./gen/grpc/health/v1/health";
export * as probe from "./gen/virtmesh/common/v1/probe";
export * as sidecar from "./gen/virtmesh/sidecar/v1/sidecar";
export * as vhost from "./gen/virtmesh/vhost/v1/vhost";
export * as completion from "./gen/virtmesh/completion/v1/completion";
export * as balloon from "./gen/virtmesh/balloon/v1/balloon";
export * as migration from "./gen/virtmesh/migration/v1/migration";
export * as guest from "./gen/virtmesh/guest/v1/guest";
export * as ioband from "./gen/virtmesh/ioband/v1/ioband";
export { callUnary, type UnaryMethod } from "./call";
