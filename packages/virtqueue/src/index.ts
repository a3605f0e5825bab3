export * from "./constants";
export * from "./event-idx";
export * from "./guest-memory";
export * from "./layout";
export * from "./chain-error";
export * from "./device";
export * from "./driver";
