// The control plane's refusals: the errno the vhost ioctl would return (mapped to a
// gRPC status by handlers.ts).

/** A control-plane refusal carrying the errno the vhost ioctl would return. */
export class VhostError extends Error {
  constructor(
    readonly errno: "EPERM" | "EBUSY" | "EINVAL" | "EOPNOTSUPP" | "ENOBUFS" | "EFAULT" | "ENOENT" | "ETIMEDOUT",
    message: string,
  ) {
    super(`${errno}: ${message}`);
  }
}
