// Errors every command throws; main.ts prints them as one line. UsageError (a bad
// command line) exits 2, CliError (the command could not do its job) exits 1.
export class UsageError extends Error {
  override readonly name = "UsageError";
}

export class CliError extends Error {
  override readonly name = "CliError";
}
