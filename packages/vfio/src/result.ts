// Typed results of the IOMMU container. Every failure carries the gRPC status
// the shm-sidecar answers with, the errno the kernel's vfio_iommu_type1 returns
// for the same input, and a message naming the field, the value and the rule.

/** gRPC status codes (grpc/status.proto) the container's failures map to. */
export const GRPC_STATUS = {
  OK: 0,
  INVALID_ARGUMENT: 3,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  OUT_OF_RANGE: 11,
} as const;

export type IommuErrorCode = Exclude<keyof typeof GRPC_STATUS, "OK">;

/** The errno vfio_iommu_type1 returns for the same request (for logs and the README table). */
export type VfioErrno = "EINVAL" | "EEXIST" | "ENOSPC" | "EPERM" | "E2BIG" | "ENOMEM" | "EFAULT";

export interface IommuError {
  readonly ok: false;
  readonly code: IommuErrorCode;
  readonly errno: VfioErrno;
  readonly message: string;
}

export type IommuResult<T extends object> = ({ readonly ok: true } & T) | IommuError;

export function iommuError(code: IommuErrorCode, errno: VfioErrno, message: string): IommuError {
  return { ok: false, code, errno, message };
}

/**
 * gRPC status number for a container result or error code, so a sidecar
 * handler is `if (!r.ok) callback({ code: grpcStatusCode(r), details: r.message })`.
 */
export function grpcStatusCode(r: IommuErrorCode | { readonly ok: true } | IommuError): number {
  if (typeof r === "string") return GRPC_STATUS[r];
  return r.ok ? GRPC_STATUS.OK : GRPC_STATUS[r.code];
}

/** A 64-bit unsigned request field: a safe-integer number (as ts-proto decodes uint64) or a bigint. */
export type U64 = number | bigint;

export const U64_MAX = (1n << 64n) - 1n;
const U32_MAX = 0xffff_ffff;

export function hex(v: bigint | number): string {
  return `0x${v.toString(16)}`;
}

/**
 * Parses a uint64 field. Numbers must be safe integers: beyond 2^53 a number
 * no longer names one address, so the caller must pass a bigint instead.
 */
export function parseU64(op: string, field: string, v: U64): bigint | IommuError {
  if (typeof v === "bigint") {
    if (v < 0n || v > U64_MAX) {
      return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: ${field} ${v} is not an unsigned 64-bit integer (0..2^64-1)`);
    }
    return v;
  }
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
    return iommuError(
      "INVALID_ARGUMENT",
      "EINVAL",
      `${op}: ${field} ${String(v)} is not an unsigned integer representable exactly as a number (0..2^53-1); pass a bigint for larger values`,
    );
  }
  return BigInt(v);
}

export function parseU32(op: string, field: string, v: number): number | IommuError {
  if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > U32_MAX) {
    return iommuError("INVALID_ARGUMENT", "EINVAL", `${op}: ${field} ${String(v)} is not an unsigned 32-bit integer (0..4294967295)`);
  }
  return v;
}

export function isError(v: unknown): v is IommuError {
  return typeof v === "object" && v !== null && (v as { ok?: unknown }).ok === false;
}
