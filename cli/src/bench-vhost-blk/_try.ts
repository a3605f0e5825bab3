import { formatTable, writeBenchJson } from "@virtmesh/bench";
import { runVhostBlkBench } from "./vhost-blk";
void runVhostBlkBench({ quick: true, onProgress: (l) => console.error(`[${new Date().toISOString().slice(11, 19)}] ${l}`) }).then((r) => {
  console.log(formatTable(r.rows));
  console.log("summary", JSON.stringify(r.summary));
  writeBenchJson("/tmp/vhost-blk-quick.json", r);
});
