// Every refusal a service answers goes through here (ctx.addService wraps each handler
// that answers with a callback: unary and client-streaming calls): its message is cut to a
// short prefix, so a caller's huge string is never echoed back (a status message of a few
// hundred KB does not fit the HTTP/2 trailers and the call would hang until its deadline),
// and it is logged once at warn with the call's trace id (issue 16: every refusal logged).
import { status as Status, type ServiceDefinition, type UntypedServiceImplementation, type ServiceError, type sendUnaryData } from "@grpc/grpc-js";

/** Longest status message a service sends; longer ones keep this prefix and say how long they were. */
export const MAX_DETAILS = 512;

export function capDetails(details: string): string {
  if (details.length <= MAX_DETAILS) return details;
  return `${details.slice(0, MAX_DETAILS - 40)}… (${details.length} characters, cut)`;
}

export type RefusalLog = (fields: { method: string; code: number; codeName: string }, message: string) => void;

const CODE_NAMES = Object.fromEntries(Object.entries(Status).filter(([, v]) => typeof v === "number").map(([k, v]) => [v, k])) as Record<number, string>;

type Handler = (call: unknown, cb?: sendUnaryData<unknown>) => void;

/** The implementation with each callback-answering handler's refusals capped and logged. */
export function guardRefusals<I extends UntypedServiceImplementation>(def: ServiceDefinition<I>, impl: I, log: RefusalLog): I {
  const out: Record<string, unknown> = { ...impl };
  for (const [name, m] of Object.entries(def)) {
    const h = impl[name as keyof I] as unknown as Handler | undefined;
    // Server-streaming handlers end with call.emit("error"): they answer no callback.
    if (typeof h !== "function" || m.responseStream) continue;
    out[name] = (call: unknown, cb: sendUnaryData<unknown>) =>
      h(call, (err, value, ...rest) => {
        if (err) {
          const e = err as Partial<ServiceError>;
          const code = e.code ?? Status.UNKNOWN;
          const details = capDetails(e.details ?? e.message ?? "");
          log({ method: m.path, code, codeName: CODE_NAMES[code] ?? String(code) }, details);
          return cb({ ...e, code, details, message: details }, value, ...(rest as []));
        }
        return cb(err, value, ...(rest as []));
      });
  }
  return out as I;
}
