// Errors every command throws; main.ts prints them as one line. UsageError (a bad
// command line) exits 2, CliError (the command could not do its job) exits 1.
// A CliError that carries grpc-js's raw connection failure ("No connection established.
// Last error: Error: connect ECONNREFUSED …") is rewritten into one line that names the
// service and says what `status` knows of it (issue 16): dead, restarting, given up.
import { defaultStateDir, pidAlive, readState } from "./state";

export class UsageError extends Error {
  override readonly name = "UsageError";
}

export class CliError extends Error {
  override readonly name = "CliError";

  constructor(message: string) {
    super(rewriteConnectionFailure(message));
  }
}

/** grpc-js's words for "nothing answers at that address" (UNAVAILABLE before or during a call). */
const CONNECTION_FAILURE =
  /No connection established|failed to connect to all addresses|Connection dropped|Connection refused|ECONNREFUSED|ECONNRESET|EHOSTUNREACH|ENETUNREACH|read ETIMEDOUT|Received RST_STREAM|Call cancelled by the server's shutdown/i;

/** Whether `e` (a grpc ServiceError, an Error or a message) is a failure to reach the service. */
export function isConnectionFailure(e: unknown): boolean {
  const o = e as { code?: number; details?: string; message?: string } | undefined;
  const text = typeof e === "string" ? e : `${o?.details ?? ""} ${o?.message ?? ""}`;
  if (typeof e !== "string" && o?.code !== undefined && o.code !== 14 /* UNAVAILABLE */) return false;
  return CONNECTION_FAILURE.test(text);
}

function why(raw: string): string {
  if (/ECONNREFUSED|Connection refused/i.test(raw)) return "connection refused";
  if (/ECONNRESET|Connection dropped|RST_STREAM/i.test(raw)) return "connection dropped";
  if (/shutdown/i.test(raw)) return "it was shutting down";
  return "no connection";
}

/**
 * What `virtmesh status` would say of `instance` on `host`, from the launcher's state.json:
 * e.g. "status: died (killed by SIGKILL), being restarted (restart 1)". Empty without a stack.
 */
export function statusOf(instance: string, host: string, stateDir = defaultStateDir()): string {
  const s = readState(stateDir);
  if (!s) return `status: no stack is running from ${stateDir}`;
  if (!pidAlive(s.supervisorPid)) return `status: the stack's supervisor (pid ${s.supervisorPid}) is gone; run 'virtmesh down' then 'virtmesh up'`;
  const r = s.services.find((x) => x.instance === instance && x.host === host);
  if (!r) return `status: the stack does not run ${instance} on host ${host}`;
  const exit = r.exit ? ` (${r.exit})` : "";
  switch (r.state) {
    case "failed":
      return `status: it kept dying${exit}; the launcher gave up after ${r.restarts} restarts (see launcher.log; restart the stack)`;
    case "exited":
      return r.restartAt
        ? `status: it died${exit}; the launcher restarts it at ${r.restartAt.slice(11, 23)} (restart ${r.restarts}); try again in a few seconds`
        : `status: it died${exit} and is not being restarted (see launcher.log)`;
    case "starting":
      return r.restarts > 0 ? `status: it died${exit} and is being restarted (restart ${r.restarts}); try again in a few seconds` : "status: starting";
    case "stopped":
      return "status: stopped (the stack is shutting down)";
    case "running":
      return pidAlive(r.pid)
        ? `status: running (pid ${r.pid}${r.restarts ? `, restarted ${r.restarts} times` : ""}); try again`
        : `status: its process (pid ${r.pid}) is gone; the launcher has not noticed yet`;
  }
}

/** One line for a call that could not reach `instance@host`. */
export function connectionFailure(what: string, instance: string, host: string, cause: unknown, stateDir?: string): CliError {
  const o = cause as { details?: string; message?: string } | undefined;
  const raw = typeof cause === "string" ? cause : (o?.details ?? o?.message ?? String(cause));
  return new CliError(`${what}: ${instance}@${host} is unreachable (${why(raw)}); ${statusOf(instance, host, stateDir)}`);
}

const SERVICE_AT_HOST = /([a-z0-9][a-z0-9._-]*)@([a-z0-9][a-z0-9._-]*)/i;

function rewriteConnectionFailure(message: string): string {
  const m = CONNECTION_FAILURE.exec(message);
  if (!m) return message;
  // The command's own words come first ("GetStats(vm1) on balloon-host@src: <grpc text>").
  const cut = message.lastIndexOf(": ", m.index);
  const head = (cut >= 0 ? message.slice(0, cut) : "").replace(/:?\s*\d+ [A-Z_]+$/, "");
  const raw = message.slice(cut >= 0 ? cut + 2 : 0);
  if (head.includes("is unreachable (")) return message; // already ours
  const who = SERVICE_AT_HOST.exec(head);
  const prefix = head ? `${head}: ` : "";
  if (!who) return `${prefix}the service is unreachable (${why(raw)}); see 'virtmesh status'`;
  return `${prefix}${who[1]}@${who[2]} is unreachable (${why(raw)}); ${statusOf(who[1]!, who[2]!)}`;
}
