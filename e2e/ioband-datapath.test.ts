// Issue 5: dm-ioband in the vhost-blk data path, over a real stack. Three VMs on one host,
// every block device through the ioband device `ioband1` (VIRTMESH_IOBAND_DEVICES +
// VIRTMESH_IOBAND_BACKEND), each VM in its own blkio cgroup with a weight set through
// IobandService.WriteSettings (the control language over gRPC); fio randwrite on all three
// at once (GuestService.RunFio, verify crc32c). Behaviour, not a benchmark: the heaviest
// weight gets the most, the lightest the least, and every verify passes. Then range-bw:
// each VM stays near its maximum. The images are opened writethrough (VIRTMESH_BLK_CACHE,
// O_DSYNC): dm-ioband divides a saturated device, and the page cache never saturates.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { IobandLiveStack } from "../cli/src/ioband-stack";

const VMS = ["vm1", "vm2", "vm3"];
const BS = 65536;
let live: IobandLiveStack | undefined;

before(async () => {
  // Sparse 1 GiB images: a region no VM can write through in a run, however fast the disk.
  live = await IobandLiveStack.start({ vms: VMS, devices: "ioband1:weight", backend: "ioband1", diskBytes: 1 << 30, env: { VIRTMESH_BLK_CACHE: "writethrough" } });
});

after(async () => {
  await live?.stop();
});

test("weights 40/20/10 set over gRPC: vm1 gets the most bandwidth, vm3 the least", async () => {
  const l = live!;
  await l.configure("ioband1", { vm1: "40", vm2: "20", vm3: "10" });
  assert.equal(await l.readSettings("/vm1"), "ioband1 weight=40\n");
  assert.equal(await l.readSettings("/vm3"), "ioband1 weight=10\n");
  // The region is larger than any VM writes in the runtime: all three run the whole time.
  // No verify here: crc32c over every block makes the guests, not the device, the bottleneck.
  // Three runs, each VM's median: one run's shares swing with what else the two cores do
  // (a guest that gets no CPU for a while cannot use its share); the median does not.
  const runs: number[][] = [];
  for (let i = 0; i < 3; i++) {
    const rs = await l.fioAll({ rw: "randwrite", blockSize: BS, iodepth: 16, sizeBytes: 1 << 30, runtimeMs: 2500, verify: "" });
    for (const vm of VMS) assert.ok(Number(rs.get(vm)!.writeIos) > 0, `${vm} wrote nothing`);
    // A VM that wrote its whole region stopped early: its count says nothing of its share.
    for (const vm of VMS) assert.ok(Number(rs.get(vm)!.writeIos) < (1 << 30) / BS, `${vm} wrote its whole region within the run`);
    runs.push(VMS.map((vm) => Number(rs.get(vm)!.writeIos)));
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const ios = VMS.map((_, i) => median(runs.map((r) => r[i]!)));
  const total = ios.reduce((a, b) => a + b, 0);
  const shares = ios.map((n) => n / total);
  const msg = `median shares ${shares.map((s) => (s * 100).toFixed(1)).join(" / ")} % for weights 40/20/10 (runs: ${runs.map((r) => r.join("/")).join(", ")})`;
  assert.ok(ios[0]! > ios[1]! && ios[0]! > ios[2]!, `vm1 (weight 40) must get the most: ${msg}`);
  assert.ok(ios[2]! < ios[1]!, `vm3 (weight 10) must get the least: ${msg}`);
  // Generous (the bench measures the error): well above the third an unscheduled device gives.
  assert.ok(shares[0]! > 0.4, `vm1 (weight 40 of 70) must get well over a third: ${msg}`);
});

test("under the weights, fio randwrite --verify crc32c on all three VMs at once finds every block intact", async () => {
  const rs = await live!.fioAll({ rw: "randwrite", blockSize: 4096, iodepth: 16, sizeBytes: 8 << 20, runtimeMs: 0, verify: "crc32c" });
  for (const vm of VMS) {
    const r = rs.get(vm)!;
    assert.equal(Number(r.verifyErrors), 0, `${vm}: ${r.verifyFailures.join("; ")}`);
    assert.equal(Number(r.writeIos), (8 << 20) / 4096, `${vm} wrote its whole region`);
    assert.equal(Number(r.readIos), (8 << 20) / 4096, `${vm} read its whole region back`);
  }
});

test("range-bw 8192/4096/2048 KiB/s: each VM stays near its maximum, the order follows the limits", async () => {
  const l = live!;
  await l.writeDevices("ioband1 policy range-bw");
  await l.configure("ioband1", { vm1: "8192:8192", vm2: "4096:4096", vm3: "2048:2048" });
  assert.match(await l.readDevices(), /^ioband1 policy=range-bw /);
  assert.equal(await l.readSettings("/vm2"), "ioband1 range-bw=4096:4096\n");
  const runtimeMs = 3000;
  const rs = await l.fioAll({ rw: "randwrite", blockSize: BS, iodepth: 8, sizeBytes: 128 << 20, runtimeMs, verify: "crc32c" });
  const maxKiB = [8192, 4096, 2048];
  VMS.forEach((vm, i) => {
    const r = rs.get(vm)!;
    assert.equal(Number(r.verifyErrors), 0, `${vm}: ${r.verifyFailures.join("; ")}`);
    const kibPerS = (Number(r.writeIos) * (BS / 1024)) / (runtimeMs / 1000);
    // Generous: the token bucket may burst at the start, the runtime is only 3 s.
    assert.ok(kibPerS <= maxKiB[i]! * 1.5, `${vm}: ${kibPerS.toFixed(0)} KiB/s over its max ${maxKiB[i]}`);
    assert.ok(kibPerS >= maxKiB[i]! * 0.3, `${vm}: ${kibPerS.toFixed(0)} KiB/s far below its ${maxKiB[i]}`);
  });
  const ios = VMS.map((vm) => Number(rs.get(vm)!.writeIos));
  assert.ok(ios[0]! > ios[1]! && ios[1]! > ios[2]!, `order follows the limits: ${ios.join(" / ")}`);
});
