// ONNX Runtime through npm's onnxruntime-node, for machines without onnxruntime's Python package: times the
// exports bench/ort_bench.py wrote, exactly as its `time` command does (VF_THREADS intra-op threads, one inter-op
// thread, every graph optimisation, a warm-up run, then runs until VF_BENCH_MIN_SECONDS and at least 3).
//   node bench/ort_bench.mjs [--dir DIR] [NAME...]        one JSON line per model: {name, ms (min), median_ms, runs}
// onnxruntime-node is looked up in ORT_NODE_MODULES (default .bench/node/node_modules, where bench/run.sh installs
// it with `npm install --ignore-scripts`: the CPU binaries come in the package itself).
import { createRequire } from "node:module";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), "..");
const modules = process.env.ORT_NODE_MODULES || path.join(root, ".bench", "node", "node_modules");
const ort = createRequire(path.join(modules, "noop.js"))("onnxruntime-node");

const args = process.argv.slice(2);
let dir = path.join(root, ".bench", "onnx");
const names = [];
for (let i = 0; i < args.length; ++i) {
  if (args[i] === "--dir") dir = args[++i];
  else names.push(args[i]);
}
const threads = Number(process.env.VF_THREADS) || os.cpus().length;
const minSeconds = Number(process.env.VF_BENCH_MIN_SECONDS) || 3;
const manifest = JSON.parse(fs.readFileSync(path.join(dir, "manifest.json"), "utf8"));

// Deterministic normal-ish values (the speed does not depend on them).
function randomFloats(n) {
  const a = new Float32Array(n);
  let s = 12345;
  for (let i = 0; i < n; ++i) {
    s = (s * 1103515245 + 12345) >>> 0;
    a[i] = (s / 4294967296 - 0.5) * 3.4;
  }
  return a;
}

for (const name of names.length ? names : Object.keys(manifest)) {
  const m = manifest[name];
  if (!m) continue;
  const session = await ort.InferenceSession.create(path.join(dir, `${name}.onnx`), {
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    executionMode: "sequential",
    graphOptimizationLevel: "all",
  });
  const feeds = {};
  for (const [input, shape] of Object.entries(m.inputs)) {
    const n = shape.reduce((a, b) => a * b, 1);
    feeds[input] = m.dtypes[input] === "int64"
      ? new ort.Tensor("int64", new BigInt64Array(n).fill(1n), shape)
      : new ort.Tensor("float32", randomFloats(n), shape);
  }
  await session.run(feeds);  // warm-up
  const times = [];
  const start = performance.now();
  while (times.length < 3 || performance.now() - start < minSeconds * 1000) {
    const t0 = performance.now();
    await session.run(feeds);
    times.push(performance.now() - t0);
  }
  await session.release();
  const sorted = [...times].sort((a, b) => a - b);
  console.log(JSON.stringify({
    name, ms: sorted[0], median_ms: sorted[Math.floor(sorted.length / 2)], runs: times.length, threads,
    runtime: `onnxruntime-node ${ort.env.versions?.node ?? ""}`, source: m.source,
  }));
}
