export { ClientCache } from "./clients";
export { runService, die, type ServiceContext, type ServiceHooks, type ServiceDefinitionOptions, type ClientCtor } from "./service";
export { HealthImplementation } from "./health";
export { ProbeRouter, ProbeError, checkRoute } from "./probe";
export { unary, GrpcError } from "./grpc";
export { guardRefusals, capDetails, MAX_DETAILS, type RefusalLog } from "./refusals";
