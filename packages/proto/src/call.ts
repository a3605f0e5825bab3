// Promise wrapper for a unary method of a generated grpc-js client, with a
// deadline. Rejects with the grpc-js ServiceError (its code and details intact).
import { Metadata, type CallOptions, type ServiceError } from "@grpc/grpc-js";

export type UnaryMethod<Req, Res> = (req: Req, md: Metadata, opts: Partial<CallOptions>, cb: (err: ServiceError | null, res?: Res) => void) => unknown;

export function callUnary<Req, Res>(client: object, method: UnaryMethod<Req, Res>, req: Req, timeoutMs = 10_000): Promise<Res> {
  return new Promise((resolve, reject) => {
    method.call(client, req, new Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(err) : resolve(res as Res)));
  });
}
