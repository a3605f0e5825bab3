// Typed results of the control language. The codes are the gRPC status names the
// IobandService handlers return; each mirrors the errno the seed's function returns.

export type ControlErrorCode = "PERMISSION_DENIED" | "NOT_FOUND" | "INVALID_ARGUMENT" | "FAILED_PRECONDITION";

export interface ControlOk {
  ok: true;
  text?: string;
}

export interface ControlError {
  ok: false;
  code: ControlErrorCode;
  message: string;
}

export type ControlResult = ControlOk | ControlError;

export function fail(code: ControlErrorCode, message: string): ControlError {
  return { ok: false, code, message };
}
