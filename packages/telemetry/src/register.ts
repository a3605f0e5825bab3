// Preload entry: `node --require tsx/cjs --require @virtmesh/telemetry/register main.ts`.
import { startTelemetry } from "./sdk";

startTelemetry();
