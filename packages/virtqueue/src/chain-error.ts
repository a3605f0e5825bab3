// Typed errors for bad descriptor chains. Returned (not thrown) by the device
// side's hot path; every code names the virtio 1.2 rule it enforces.

export enum ChainErrorCode {
  /** avail->idx moved more than Queue Size past last_avail_idx. */
  AvailIdxOutOfRange = "AVAIL_IDX_OUT_OF_RANGE",
  /** avail->ring[] holds a head index >= Queue Size. */
  HeadOutOfRange = "HEAD_OUT_OF_RANGE",
  /** A `next` index >= Queue Size (or >= the indirect table's len/16). */
  DescIndexOutOfRange = "DESC_INDEX_OUT_OF_RANGE",
  /** addr + len reaches past the end of guest memory. */
  AddressOutOfRange = "ADDRESS_OUT_OF_RANGE",
  /** addr + len wraps past 2^64. */
  AddressOverflow = "ADDRESS_OVERFLOW",
  /** A descriptor is visited twice: the chain loops. */
  DescriptorLoop = "DESCRIPTOR_LOOP",
  /** More descriptors than Queue Size. */
  ChainTooLong = "CHAIN_TOO_LONG",
  /** More than 2^32 bytes in total. */
  ChainTooBig = "CHAIN_TOO_BIG",
  /** A device-readable descriptor after a device-writable one. */
  ReadableAfterWritable = "READABLE_AFTER_WRITABLE",
  /** VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC. */
  IndirectNotNegotiated = "INDIRECT_NOT_NEGOTIATED",
  /** VIRTQ_DESC_F_INDIRECT inside an indirect table. */
  NestedIndirect = "NESTED_INDIRECT",
  /** VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT. */
  IndirectWithNext = "INDIRECT_WITH_NEXT",
  /** Indirect table len not a multiple of 16. */
  IndirectLenNotMultiple = "INDIRECT_LEN_NOT_MULTIPLE_OF_16",
  /** Indirect table len 0: no descriptor at index 0. */
  IndirectTableEmpty = "INDIRECT_TABLE_EMPTY",
}

/** The spec section each check enforces (virtio 1.2 cs01 numbering). */
export const CHAIN_ERROR_SECTION: Readonly<Record<ChainErrorCode, string>> = {
  [ChainErrorCode.AvailIdxOutOfRange]: "§2.7.13.3 / §2.7 (at most Queue Size buffers queued)",
  [ChainErrorCode.HeadOutOfRange]: "§2.7.6 / §2.7.5 (ring entries index the Queue Size descriptor table)",
  [ChainErrorCode.DescIndexOutOfRange]: "§2.7.5 / §2.7.5.3 (next indexes the table: Queue Size or len/16 entries)",
  [ChainErrorCode.AddressOutOfRange]: "§2.7.5 (addr is a guest-physical address) / §2.1.2",
  [ChainErrorCode.AddressOverflow]: "§2.7.5 (le64 addr + le32 len must not wrap)",
  [ChainErrorCode.DescriptorLoop]: "§2.7.5.2 (loops in the descriptor chain are forbidden)",
  [ChainErrorCode.ChainTooLong]: "§2.7.5.3.1 (no chain longer than the Queue Size) / §2.7.5",
  [ChainErrorCode.ChainTooBig]: "§2.7.5.2 (no chain longer than 2^32 bytes in total)",
  [ChainErrorCode.ReadableAfterWritable]: "§2.7.4.2 (device-writable elements after device-readable ones)",
  [ChainErrorCode.IndirectNotNegotiated]: "§2.7.5.3.1 (INDIRECT only if VIRTIO_F_INDIRECT_DESC)",
  [ChainErrorCode.NestedIndirect]: "§2.7.5.3.1 (no INDIRECT within an indirect descriptor)",
  [ChainErrorCode.IndirectWithNext]: "§2.7.5.3.1 (not both INDIRECT and NEXT)",
  [ChainErrorCode.IndirectLenNotMultiple]: "§2.7.5.3 (table is desc[len / 16])",
  [ChainErrorCode.IndirectTableEmpty]: "§2.7.5.3 (first indirect descriptor at index 0)",
};

/**
 * A rejected chain. `head` is the chain's head index when known (the device can
 * then discard it by returning it on the used ring with len 0), else -1.
 * `fatal` errors are ring-level corruption: the queue has entered NEEDS_RESET
 * (§2.1.2) and pops nothing more until reset.
 */
export class ChainError {
  readonly section: string;
  constructor(
    readonly code: ChainErrorCode,
    readonly head: number,
    /** Index (in the table being walked) of the offending descriptor, or -1. */
    readonly descIndex: number,
    /** True when the offending descriptor was inside an indirect table. */
    readonly inIndirect: boolean,
    readonly fatal: boolean,
    readonly detail: string,
  ) {
    this.section = CHAIN_ERROR_SECTION[code];
  }

  get message(): string {
    const where = this.descIndex >= 0 ? ` at ${this.inIndirect ? "indirect " : ""}descriptor ${this.descIndex}` : "";
    const head = this.head >= 0 ? ` (chain head ${this.head})` : "";
    return `${this.code}: ${this.detail}${where}${head}; virtio 1.2 ${this.section}`;
  }

  toString(): string {
    return `ChainError ${this.message}`;
  }

  /** For callers that want to throw it. */
  toError(): Error {
    const e = new Error(this.message);
    e.name = "ChainError";
    return e;
  }
}
