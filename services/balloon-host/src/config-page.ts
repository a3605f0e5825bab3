// The balloon config page is the device's ABI shared with the guest: it lives in
// @virtmesh/balloon (packages/balloon/src/config-page.ts).
export { ATTACHED_MAGIC, BALLOON_CONFIG_DEVICE, BALLOON_DEVICE, BALLOON_QUEUES, BALLOON_QUEUE_INDEX, BalloonConfigPage, CFG_ACTUAL, CFG_ATTACHED, CFG_FEATURES, CFG_GENERATION, CFG_NUM_PAGES, CFG_REFUSED, CONFIG_BYTES, CONFIG_WORDS, balloonQueueSpecs } from "@virtmesh/balloon";
