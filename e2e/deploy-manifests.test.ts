// The deployment files, checked without Docker images or a cluster (issue 13):
// - docker-compose.yml alone and with deploy/compose.hostnet.yml are accepted by
//   `docker-compose config` (Debian's 1.29) when it is on PATH, and say what they must
//   (incoming guest-driver on dst, healthchecks, depends_on conditions, memory limits,
//   host networking with distinct ports in the override);
// - deploy/healthcheck.cjs (the containers' probe) tells SERVING from NOT_SERVING and from
//   nothing listening, against a real grpc.health.v1 server;
// - every Kubernetes manifest, the base and each overlay rendered (the kustomize subset the
//   overlays use: resources, namespace, strategic-merge and JSON6902 patches; compared with
//   `kubectl kustomize` when kubectl is on PATH), validates against the Kubernetes API
//   schemas of the npm package kubernetes-models (ajv validators generated from the
//   Kubernetes OpenAPI document), and has resource limits everywhere.
// Whatever cannot run here is skipped with the reason printed, never silently.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawnSync } from "node:child_process";
import { existsSync, readFileSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { Server, ServerCredentials, status as GrpcStatus } from "@grpc/grpc-js";
import { health } from "@virtmesh/proto";

const ROOT = resolve(__dirname, "..");
const K8S = join(ROOT, "deploy", "k8s");
const OVERLAYS = ["one-host", "many-hosts"];

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type Obj = { [k: string]: Json };
const isObj = (v: unknown): v is Obj => typeof v === "object" && v !== null && !Array.isArray(v);

function onPath(cmd: string): boolean {
  return spawnSync("sh", ["-c", `command -v ${cmd}`], { encoding: "utf8" }).status === 0;
}

function skipWith(t: { skip: (m: string) => void }, reason: string): void {
  // Printed as well as reported: a skipped check must never pass for a checked one.
  console.log(`# skipped: ${reason}`);
  t.skip(reason);
}

// ---- YAML ---------------------------------------------------------------------------
// The `yaml` package (to be added as a devDependency); js-yaml is accepted meanwhile.
// Loaded by name at run time so that the type check does not need it installed.
interface YamlLib {
  parseAll(text: string): Json[];
}
function loadYaml(): YamlLib | string {
  const tried: string[] = [];
  for (const id of ["yaml", "js-yaml"]) {
    try {
      const m = require(id) as { parseAllDocuments?: (s: string) => { toJSON(): Json }[]; loadAll?: (s: string) => Json[] };
      if (m.parseAllDocuments) {
        const p = m.parseAllDocuments;
        return { parseAll: (s) => p(s).map((d) => d.toJSON()).filter((d) => d !== null) };
      }
      if (m.loadAll) {
        const l = m.loadAll;
        return { parseAll: (s) => l(s).filter((d) => d !== null && d !== undefined) };
      }
    } catch (e) {
      tried.push(`${id}: ${(e as Error).message.split("\n")[0]}`);
    }
  }
  return `no YAML parser (npm package 'yaml'): ${tried.join("; ")}`;
}

// ---- docker-compose ------------------------------------------------------------------
function composeConfig(files: string[], envFile = true): { code: number | null; out: string; err: string } {
  const args = [...(envFile ? ["--env-file", "deploy/.env"] : []), ...files.flatMap((f) => ["-f", f]), "config"];
  const r = spawnSync("docker-compose", args, { cwd: ROOT, encoding: "utf8", timeout: 60_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** Names the README's configuration table documents, plus those only containers use. */
function documentedEnv(): Set<string> {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  const names = new Set<string>();
  for (const line of readme.split("\n")) {
    if (!line.startsWith("| `")) continue;
    const cell = line.split("|")[1] ?? "";
    for (const m of cell.matchAll(/`([A-Z][A-Z0-9_]+)`/g)) names.add(m[1]!);
  }
  // SERVICE picks the service in the one image (deploy/Dockerfile); VIRTMESH_INCOMING is the
  // migration design's incoming guest-driver; VIRTMESH_IMAGE_DIRS is vhost-worker's image
  // allow-list; the last ones belong to third-party images (NATS, Jaeger, the receiver).
  for (const n of ["SERVICE", "VIRTMESH_INCOMING", "VIRTMESH_IMAGE_DIRS", "GOMEMLIMIT", "COLLECTOR_OTLP_ENABLED", "MEMORY_MAX_TRACES", "OTLP_RECEIVER_BIND", "OTLP_RECEIVER_PORT", "POD_NAME"]) names.add(n);
  return names;
}

const VIRTMESH_SERVICES = [
  "migration-manager",
  ...["src", "dst"].flatMap((h) => ["shm-sidecar", "vhost-worker", "completion-thread", "balloon-host", "guest-driver-vm1"].map((s) => `${h}-${s}`)),
];

test("docker-compose 1.29 accepts docker-compose.yml, and it says what issue 13 asks", (t) => {
  if (!onPath("docker-compose")) return skipWith(t, "docker-compose is not on PATH (Debian: apt-get install docker-compose)");
  const yaml = loadYaml();
  for (const envFile of [false, true]) {
    const r = composeConfig(["docker-compose.yml"], envFile);
    assert.equal(r.code, 0, `docker-compose config${envFile ? " --env-file deploy/.env" : ""} refused the file:\n${r.err}`);
  }
  if (typeof yaml === "string") return skipWith(t, `content checks: ${yaml}`);
  const cfg = yaml.parseAll(composeConfig(["docker-compose.yml"]).out)[0];
  assert.ok(isObj(cfg) && isObj(cfg.services));
  const services = cfg.services as Record<string, Obj>;
  assert.deepEqual(Object.keys(services).sort(), ["jaeger", "nats", ...VIRTMESH_SERVICES].sort());
  const known = documentedEnv();
  for (const [name, s] of Object.entries(services)) {
    assert.ok(s.mem_limit, `${name}: no mem_limit`);
    for (const k of Object.keys((s.environment as Obj | undefined) ?? {})) assert.ok(known.has(k), `${name}: ${k} is not in README's configuration table`);
    if (!VIRTMESH_SERVICES.includes(name)) continue;
    const env = s.environment as Record<string, string>;
    assert.ok(isObj(s.healthcheck), `${name}: no healthcheck`);
    assert.deepEqual((s.healthcheck as Obj).test, ["CMD", "node", "deploy/healthcheck.cjs"]);
    assert.ok(isObj(s.depends_on), `${name}: no depends_on`);
    const conds = Object.values(s.depends_on as Record<string, Obj>).map((d) => d.condition);
    assert.ok(conds.includes("service_healthy"), `${name}: depends on nothing being healthy`);
    assert.match(env.NATS_URL!, /^nats:\/\/nats:\d+$/);
    if (name !== "migration-manager") {
      const host = name.split("-")[0]!;
      assert.equal(env.VIRTMESH_HOST, host);
      // 1.29 prints volumes in the short form (source:target:mode), v2 in the long one.
      const mounts = (s.volumes as Json[]).map((v) => (isObj(v) ? `${String(v.source)}:${String(v.target)}` : String(v).split(":").slice(0, 2).join(":")));
      assert.ok(mounts.includes(`${host}-shm:${env.VIRTMESH_SHM_DIR}`), `${name}: not on ${host}-shm (${mounts.join(", ")})`);
    }
  }
  assert.equal(services["src-guest-driver-vm1"]!.environment && (services["src-guest-driver-vm1"]!.environment as Obj).VIRTMESH_INCOMING, "0");
  assert.equal((services["dst-guest-driver-vm1"]!.environment as Obj).VIRTMESH_INCOMING, "1");
  assert.equal((services.nats!.command as string[]).includes("-js"), true);
  const vols = cfg.volumes as Record<string, Obj>;
  for (const h of ["src", "dst"]) assert.equal((vols[`${h}-shm`]!.driver_opts as Obj).type, "tmpfs");
});

test("docker-compose 1.29 accepts docker-compose.yml + deploy/compose.hostnet.yml: host network, 127.0.0.1, distinct ports", (t) => {
  if (!onPath("docker-compose")) return skipWith(t, "docker-compose is not on PATH (Debian: apt-get install docker-compose)");
  const r = composeConfig(["docker-compose.yml", "deploy/compose.hostnet.yml"]);
  assert.equal(r.code, 0, `docker-compose config refused the override:\n${r.err}`);
  const yaml = loadYaml();
  if (typeof yaml === "string") return skipWith(t, `content checks: ${yaml}`);
  const cfg = yaml.parseAll(r.out)[0] as Obj;
  const services = cfg.services as Record<string, Obj>;
  const ports = new Map<string, string>();
  for (const [name, s] of Object.entries(services)) {
    assert.equal(s.network_mode, "host", `${name} is not on the host network`);
    const env = (s.environment ?? {}) as Record<string, string>;
    if (!VIRTMESH_SERVICES.includes(name)) continue;
    assert.equal(env.VIRTMESH_GRPC_BIND, "127.0.0.1");
    assert.equal(env.VIRTMESH_ADVERTISE_ADDR, "127.0.0.1");
    assert.match(env.NATS_URL!, /^nats:\/\/127\.0\.0\.1:\d+$/);
    assert.match(env.OTEL_EXPORTER_OTLP_ENDPOINT!, /^http:\/\/127\.0\.0\.1:\d+$/);
    const p = env.VIRTMESH_GRPC_PORT!;
    assert.ok(!ports.has(p), `${name} and ${ports.get(p)} both on port ${p}`);
    ports.set(p, name);
  }
  // Jaeger (no image here) is the project's OTLP receiver, on the port the services export to.
  const rx = services.jaeger!;
  assert.deepEqual(rx.command, ["node", "--require", "tsx/cjs", "deploy/otlp-receiver.ts"]);
  const otlp = (services["src-shm-sidecar"]!.environment as Record<string, string>).OTEL_EXPORTER_OTLP_ENDPOINT!;
  assert.equal(otlp, `http://127.0.0.1:${(rx.environment as Record<string, string>).OTLP_RECEIVER_PORT}`);
  assert.ok(!ports.has(String((rx.environment as Obj).OTLP_RECEIVER_PORT)));
});

// ---- the containers' health probe -------------------------------------------------------
test("deploy/healthcheck.cjs: exit 0 only when grpc.health.v1 says SERVING", async () => {
  let serving = health.HealthCheckResponse_ServingStatus.SERVING;
  const server = new Server();
  server.addService(health.HealthService, {
    check: (_call, cb) => cb(null, { status: serving }),
    watch: (call) => call.emit("error", { code: GrpcStatus.UNIMPLEMENTED, details: "watch" }),
  } satisfies health.HealthServer);
  const port = await new Promise<number>((res, rej) => server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
  // Asynchronously: the server answers from this process's event loop.
  const probe = (p: number) =>
    new Promise<{ status: number | null; stderr: string }>((res) => {
      execFile(process.execPath, [join(ROOT, "deploy", "healthcheck.cjs")], { env: { ...process.env, VIRTMESH_GRPC_PORT: String(p), VIRTMESH_GRPC_BIND: "0.0.0.0", HEALTHCHECK_TIMEOUT_MS: "20000" }, timeout: 30_000 }, (e, _out, stderr) =>
        res({ status: e ? (typeof e.code === "number" ? e.code : null) : 0, stderr: String(stderr) }),
      );
    });
  try {
    const ok = await probe(port);
    assert.equal(ok.status, 0, ok.stderr);
    serving = health.HealthCheckResponse_ServingStatus.NOT_SERVING;
    const not = await probe(port);
    assert.equal(not.status, 1);
    assert.match(not.stderr, /NOT_SERVING/);
  } finally {
    await new Promise<void>((r) => server.tryShutdown(() => r()));
  }
  const none = await probe(port); // nothing listens there any more
  assert.equal(none.status, 1);
});

// ---- Kubernetes: a kustomize subset -----------------------------------------------------
interface Kustomization {
  resources?: string[];
  namespace?: string;
  patches?: { path: string; target?: { group?: string; version?: string; kind?: string; name?: string } }[];
}

const CLUSTER_SCOPED = new Set(["Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"]);
// Lists that a strategic merge patch merges by `name` (k8s patchMergeKey "name"); any other
// list in a patch replaces the list it patches, as kustomize does for lists without a key.
const MERGE_BY_NAME = new Set(["containers", "initContainers", "volumes", "volumeMounts", "env", "imagePullSecrets"]);

function strategicMerge(base: Json, patch: Json, field = ""): Json {
  if (isObj(base) && isObj(patch)) {
    const out: Obj = { ...base };
    for (const [k, v] of Object.entries(patch)) {
      if (v === null) delete out[k];
      else out[k] = k in base ? strategicMerge(base[k]!, v, k) : v;
    }
    return out;
  }
  if (Array.isArray(base) && Array.isArray(patch) && MERGE_BY_NAME.has(field)) {
    const out = [...base];
    for (const item of patch) {
      const i = isObj(item) ? out.findIndex((b) => isObj(b) && b.name === item.name) : -1;
      if (i >= 0) out[i] = strategicMerge(out[i]!, item, "");
      else out.push(item);
    }
    return out;
  }
  return patch;
}

function applyJson6902(doc: Obj, ops: Obj[]): Obj {
  const out = structuredClone(doc);
  for (const op of ops) {
    const parts = String(op.path).split("/").slice(1).map((p) => p.replace(/~1/g, "/").replace(/~0/g, "~"));
    const last = parts.pop()!;
    let parent: Json = out;
    for (const p of parts) parent = Array.isArray(parent) ? parent[Number(p)]! : (parent as Obj)[p]!;
    assert.ok(parent !== undefined && parent !== null, `JSON6902 path ${String(op.path)} does not exist`);
    if (Array.isArray(parent)) {
      const i = last === "-" ? parent.length : Number(last);
      if (op.op === "add") parent.splice(i, 0, op.value!);
      else if (op.op === "replace") parent[i] = op.value!;
      else if (op.op === "remove") parent.splice(i, 1);
      else assert.fail(`JSON6902 op ${String(op.op)} is not supported here`);
    } else {
      const o = parent as Obj;
      if (op.op === "add" || op.op === "replace") {
        if (op.op === "replace") assert.ok(last in o, `JSON6902 replace of a missing ${String(op.path)}`);
        o[last] = op.value!;
      } else if (op.op === "remove") delete o[last];
      else assert.fail(`JSON6902 op ${String(op.op)} is not supported here`);
    }
  }
  return out;
}

function groupVersion(doc: Obj): { group: string; version: string } {
  const av = String(doc.apiVersion);
  return av.includes("/") ? { group: av.split("/")[0]!, version: av.split("/")[1]! } : { group: "", version: av };
}

function render(dir: string, yaml: YamlLib): Obj[] {
  const kfile = join(dir, "kustomization.yaml");
  const k = yaml.parseAll(readFileSync(kfile, "utf8"))[0] as Kustomization;
  const known = new Set(["apiVersion", "kind", "resources", "namespace", "patches"]);
  for (const key of Object.keys(k)) assert.ok(known.has(key), `${kfile}: '${key}' is not supported by this test's kustomize subset`);
  let docs: Obj[] = [];
  for (const r of k.resources ?? []) {
    const p = join(dir, r);
    if (statSync(p).isDirectory()) docs.push(...render(p, yaml));
    else docs.push(...(yaml.parseAll(readFileSync(p, "utf8")) as Obj[]));
  }
  for (const patch of k.patches ?? []) {
    const text = readFileSync(join(dir, patch.path), "utf8");
    const matches = (d: Obj, sel: NonNullable<typeof patch.target>) => {
      const gv = groupVersion(d);
      return (sel.kind === undefined || sel.kind === d.kind) && (sel.name === undefined || sel.name === (d.metadata as Obj).name) && (sel.group === undefined || sel.group === gv.group) && (sel.version === undefined || sel.version === gv.version);
    };
    let hit = 0;
    if (patch.path.endsWith(".json") || patch.target) {
      const ops = (patch.path.endsWith(".json") ? JSON.parse(text) : yaml.parseAll(text)[0]) as Obj[];
      docs = docs.map((d) => (patch.target && matches(d, patch.target) ? (hit++, applyJson6902(d, ops)) : d));
    } else {
      const p = yaml.parseAll(text)[0] as Obj;
      const sel = { kind: String(p.kind), name: String((p.metadata as Obj).name) };
      docs = docs.map((d) => (matches(d, sel) && d.apiVersion === p.apiVersion ? (hit++, strategicMerge(d, p) as Obj) : d));
    }
    assert.equal(hit, 1, `${join(dir, patch.path)} patches ${hit} resources, not one`);
  }
  if (k.namespace) {
    docs = docs.map((d) => (CLUSTER_SCOPED.has(String(d.kind)) ? d : { ...d, metadata: { ...(d.metadata as Obj), namespace: k.namespace! } }));
  }
  return docs;
}

const key = (d: Obj) => `${String(d.kind)}/${String((d.metadata as Obj).name)}`;

// ---- Kubernetes: schemas ----------------------------------------------------------------
type Validate = (doc: Obj) => void;
function loadSchemas(): Validate | string {
  // kubernetes-models: one module per kind, `kubernetes-models/<group>/<version>/<Kind>`
  // (core group: `kubernetes-models/<version>/<Kind>`); `validate()` throws on a document
  // outside the Kubernetes API schema.
  try {
    require.resolve("kubernetes-models/v1/Pod");
  } catch (e) {
    return `npm package kubernetes-models is not installed (${(e as Error).message.split("\n")[0]})`;
  }
  return (doc) => {
    const { group, version } = groupVersion(doc);
    const id = `kubernetes-models/${group ? `${group}/` : ""}${version}/${String(doc.kind)}`;
    let Model: new (d: Obj) => { validate(): void };
    try {
      Model = (require(id) as Record<string, new (d: Obj) => { validate(): void }>)[String(doc.kind)]!;
    } catch (e) {
      throw new Error(`${key(doc)}: no schema for ${String(doc.apiVersion)} ${String(doc.kind)} (${(e as Error).message.split("\n")[0]})`);
    }
    assert.ok(Model, `${id} exports no ${String(doc.kind)}`);
    try {
      new Model(doc).validate();
    } catch (e) {
      throw new Error(`${key(doc)}: ${(e as Error).message}`);
    }
  };
}

function podSpecs(d: Obj): Obj[] {
  const spec = d.spec as Obj | undefined;
  if (d.kind === "Pod") return [spec!];
  const tpl = spec && isObj(spec.template) ? (spec.template.spec as Obj) : undefined;
  return tpl ? [tpl] : [];
}

function checkPolicy(docs: Obj[], where: string): void {
  const keys = docs.map(key);
  assert.equal(new Set(keys).size, keys.length, `${where}: a resource appears twice`);
  for (const d of docs) {
    for (const ps of podSpecs(d)) {
      for (const c of [...((ps.initContainers as Obj[]) ?? []), ...(ps.containers as Obj[])]) {
        const lim = ((c.resources as Obj | undefined)?.limits ?? {}) as Obj;
        assert.ok(lim.memory && lim.cpu, `${where}: ${key(d)} container ${String(c.name)} has no cpu and memory limits`);
      }
    }
  }
  const byKey = new Map(docs.map((d) => [key(d), d]));
  // A three-node JetStream cluster in the base; the routes name every server.
  const hosts = byKey.get("StatefulSet/host")!;
  const hostContainers = (podSpecs(hosts)[0]!.containers as Obj[]).map((c) => c.name);
  assert.deepEqual(hostContainers, ["shm-sidecar", "vhost-worker", "completion-thread", "balloon-host"], `${where}: a host pod runs its four services`);
  // Each guest-driver pod sits on its host's node and maps that host's shared memory.
  const replicas = Number((hosts.spec as Obj).replicas);
  const vmPods = docs.filter((d) => d.kind === "Deployment" && ((d.metadata as Obj).labels as Obj)["app.kubernetes.io/name"] === "guest-driver");
  assert.ok(vmPods.length >= 2, `${where}: vm1 and its incoming side`);
  const incoming = new Map<string, number>();
  for (const d of vmPods) {
    const ps = podSpecs(d)[0]!;
    const env = Object.fromEntries(((ps.containers as Obj[])[0]!.env as Obj[]).map((e) => [e.name, e.value]));
    const host = String(env.VIRTMESH_HOST);
    assert.ok(Number(host.replace("host-", "")) < replicas, `${where}: ${key(d)} is on ${host}, which the StatefulSet does not run`);
    const aff = (((ps.affinity as Obj).podAffinity as Obj).requiredDuringSchedulingIgnoredDuringExecution as Obj[])[0]!;
    assert.equal(((aff.labelSelector as Obj).matchLabels as Obj)["statefulset.kubernetes.io/pod-name"], host);
    assert.equal(((ps.volumes as Obj[]).find((v) => v.name === "guest-shm")!.hostPath as Obj).path, `/dev/shm/virtmesh/${host}`);
    if (env.VIRTMESH_INCOMING === "1") incoming.set(String(env.VIRTMESH_VM), (incoming.get(String(env.VIRTMESH_VM)) ?? 0) + 1);
  }
  assert.ok((incoming.get("vm1") ?? 0) >= 1, `${where}: no incoming guest-driver for vm1`);
}

function kustomizeDirs(): string[] {
  return [join(K8S, "base"), ...OVERLAYS.map((o) => join(K8S, "overlays", o))];
}

test("Kubernetes manifests: base and overlays render, and match kubectl kustomize when it is there", (t) => {
  const yaml = loadYaml();
  if (typeof yaml === "string") return skipWith(t, yaml);
  const kubectl = onPath("kubectl");
  for (const dir of kustomizeDirs()) {
    const docs = render(dir, yaml);
    checkPolicy(docs, dir.slice(ROOT.length + 1));
    if (!kubectl) continue;
    const r = spawnSync("kubectl", ["kustomize", dir], { encoding: "utf8", timeout: 60_000 });
    assert.equal(r.status, 0, r.stderr);
    const theirs: Map<string, Obj> = new Map((yaml.parseAll(r.stdout) as Obj[]).map((d): [string, Obj] => [key(d), d]));
    assert.deepEqual([...theirs.keys()].sort(), docs.map(key).sort());
    for (const d of docs) assert.deepEqual(d, theirs.get(key(d)), `${dir}: ${key(d)} differs from kubectl kustomize`);
  }
  if (!kubectl) console.log("# kubectl is not on PATH: rendering not compared with kubectl kustomize");
  const nats = render(join(K8S, "base"), yaml).find((d) => key(d) === "StatefulSet/nats")!;
  assert.equal((nats.spec as Obj).replicas, 3);
  const conf = String(((render(join(K8S, "base"), yaml).find((d) => key(d) === "ConfigMap/nats-config")!.data as Obj)["nats.conf"]));
  for (const i of [0, 1, 2]) assert.match(conf, new RegExp(`nats://nats-${i}\\.nats-headless:6222`));
});

test("Kubernetes manifests validate against the Kubernetes API schemas (npm kubernetes-models)", (t) => {
  const yaml = loadYaml();
  if (typeof yaml === "string") return skipWith(t, yaml);
  const validate = loadSchemas();
  if (typeof validate === "string") return skipWith(t, validate);
  // The validator is live: a document outside the schema is refused.
  assert.throws(() => validate({ apiVersion: "v1", kind: "Service", metadata: { name: "x" }, spec: { ports: [{ port: "http" }] } }), /port/);
  let n = 0;
  for (const dir of kustomizeDirs()) {
    for (const d of render(dir, yaml)) {
      validate(d);
      n++;
    }
  }
  // Every manifest file on its own too, overlay patches excepted (they are partial objects).
  for (const dir of kustomizeDirs()) {
    const k = yaml.parseAll(readFileSync(join(dir, "kustomization.yaml"), "utf8"))[0] as Kustomization;
    for (const r of k.resources ?? []) {
      const p = join(dir, r);
      if (existsSync(p) && statSync(p).isFile()) for (const d of yaml.parseAll(readFileSync(p, "utf8")) as Obj[]) validate(d);
    }
  }
  assert.ok(n > 40, `only ${n} documents validated`);
});
