import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["**/node_modules/**", "**/build/**", "packages/proto/src/gen/**", "**/*.cjs"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { process: "readonly", console: "readonly", Buffer: "readonly", setTimeout: "readonly", clearTimeout: "readonly", setInterval: "readonly", clearInterval: "readonly", setImmediate: "readonly", URL: "readonly", __dirname: "readonly", require: "readonly", module: "readonly", SharedArrayBuffer: "readonly", Atomics: "readonly", performance: "readonly", AbortController: "readonly", AbortSignal: "readonly", TextEncoder: "readonly", TextDecoder: "readonly", queueMicrotask: "readonly", structuredClone: "readonly" } },
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_", caughtErrorsIgnorePattern: "^_" }],
      "@typescript-eslint/no-explicit-any": "error",
      "no-constant-condition": ["error", { checkLoops: false }],
      // The CLI loads command modules lazily with require() so that OpenTelemetry can be
      // started before @grpc/grpc-js is first required.
      "@typescript-eslint/no-require-imports": "off",
      // Workspaces meet through their package names (@virtmesh/x), never by reaching into
      // another workspace's src/ by relative path (CONTRIBUTING.md, Layout).
      "no-restricted-imports": ["error", { patterns: [{ regex: "^(\\.\\./)+([^./][^/]*/)+src(/|$)", message: "import another workspace by its package name (@virtmesh/...), not by a relative path into its src/" }] }],
    },
  },
  {
    // e2e drives the product through the root package's launcher and CLI (cli/src), but
    // reaches services and libraries only by package name, and no bench's internals.
    files: ["e2e/**"],
    rules: {
      "no-restricted-imports": ["error", { patterns: [{ regex: "^\\.\\./(services|packages)/|^\\.\\./cli/src/bench-", message: "e2e imports services and libraries by package name (@virtmesh/...), and no bench's internals" }] }],
    },
  },
);
