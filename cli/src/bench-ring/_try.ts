import { runRingBench } from "/work/main/cli/src/bench-ring/ring";
import { formatTable } from "@virtmesh/bench";
const t0 = Date.now();
runRingBench({ quick: true, onProgress: (l) => console.error(`[${((Date.now()-t0)/1000).toFixed(1)}s] ${l}`) }).then((r) => {
  console.log(formatTable(r.rows)); console.log(JSON.stringify(r.summary, null, 1)); console.log(JSON.stringify(r.params.ring_detail));
  console.error(`total ${(Date.now()-t0)/1000}s`);
}, (e) => { console.error("FAILED", e); process.exitCode = 1; });
