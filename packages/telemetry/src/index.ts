export { startTelemetry, shutdownTelemetry, telemetryStarted, startSpanWithId, type TelemetryOptions } from "./sdk";
export { createLogger, type Logger } from "./logger";
export { tracedPublish, tracedRequest, extractContext, withConsumerSpan } from "./nats";
export { OtlpReceiver, parseOtlpJson, renderSpanTree, type ReceivedSpan } from "./receiver";
