export * from "./constants";
export * from "./completion-ring";
export * from "./crc32c";
export * from "./verify";
export * from "./request";
