import { runRingBench } from "./ring";
import { formatTable, writeBenchJson } from "@virtmesh/bench";
const t0 = Date.now();
runRingBench({ quick: true, onProgress: (l) => console.error(`[${((Date.now()-t0)/1000).toFixed(1)}s] ${l}`) }).then((r) => {
  console.log(formatTable(r.rows)); console.log(JSON.stringify(r.summary)); console.log(JSON.stringify(r.params.ring_detail)); console.log("load", r.params.load_average_1m_at_start, r.params.load_average_1m_at_end);
  writeBenchJson(process.argv[2] ?? "/tmp/ring-bench.json", r);
  console.error(`total ${(Date.now()-t0)/1000}s`);
}, (e) => { console.error("FAILED", e); process.exitCode = 1; });
