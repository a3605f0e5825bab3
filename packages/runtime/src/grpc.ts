// Thin adapter so handlers are plain async functions: a thrown GrpcError becomes that
// status with its message; anything else becomes INTERNAL with the error's message.
import { status as Status, type sendUnaryData, type ServerUnaryCall } from "@grpc/grpc-js";

export class GrpcError extends Error {
  constructor(
    readonly code: Status,
    message: string,
  ) {
    super(message);
  }
}

export function unary<Req, Res>(fn: (req: Req, call: ServerUnaryCall<Req, Res>) => Promise<Res> | Res) {
  return (call: ServerUnaryCall<Req, Res>, cb: sendUnaryData<Res>): void => {
    Promise.resolve()
      .then(() => fn(call.request, call))
      .then(
        (res) => cb(null, res),
        (e: unknown) => {
          if (e instanceof GrpcError) cb({ code: e.code, details: e.message });
          else cb({ code: Status.INTERNAL, details: e instanceof Error ? e.message : String(e) });
        },
      );
  };
}
