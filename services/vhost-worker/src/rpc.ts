// Promise wrapper for a generated grpc-js client method, with a deadline.
import type { Client, Metadata, CallOptions, ServiceError } from "@grpc/grpc-js";
import { Metadata as Md } from "@grpc/grpc-js";

type Method<Req, Res> = (req: Req, md: Metadata, opts: Partial<CallOptions>, cb: (err: ServiceError | null, res?: Res) => void) => unknown;

export function callUnary<C extends Client, Req, Res>(client: C, method: Method<Req, Res>, req: Req, timeoutMs = 10_000): Promise<Res> {
  return new Promise((resolve, reject) => {
    method.call(client, req, new Md(), { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(err) : resolve(res as Res)));
  });
}
