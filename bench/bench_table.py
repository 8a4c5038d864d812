#!/usr/bin/env python3
"""bench/run.sh's driver: vf (vf_bench), ONNX Runtime (bench/ort_bench.py / .mjs) and PyTorch (bench/torch_bench.py)
on the same machine, thread count and cores, in interleaved rounds (model by model, each side in a fresh process),
then one table of the best round of each: batch-1 latency (min), ratios, vf's share of the machine's float32
peak (vf_bench's BM_PeakF32 at the same threads and cores), vf's peak RSS, vf's images/s.

Every process gets VF_THREADS; --pin runs them all under `taskset -c` on the first THREADS allowed cores.
Writes the raw results as JSON next to the table (--results, default .bench/results/).
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# vf_bench name, table title, transformers class in torch_bench.py, plain-PyTorch model in torch_bench.py
MODELS = [
    ("BM_ConvNextTiny", "ConvNeXt-T 224²", "hf_convnext_tiny", "convnext_tiny"),
    ("BM_ConvNextV2Tiny", "ConvNeXt V2-T 224²", "hf_convnextv2_tiny", "convnextv2_tiny"),
    ("BM_DeiTBase", "DeiT-B/16 224²", "hf_deit_base", "vit_b_16"),
    ("BM_Bit50", "BiT-50 224²", "hf_bit_50", "bit_50"),
    ("BM_Cvt13", "CvT-13 224²", "hf_cvt_13", None),
    ("BM_DetrResnet50", "DETR-R50 800×1066", "hf_detr_resnet50", "detr_resnet50"),
    ("BM_ConditionalDetrResnet50", "Conditional DETR-R50 800×1066", "hf_conditional_detr_resnet50", None),
    ("BM_DeformableDetr", "Deformable DETR 800×1066", "hf_deformable_detr", "deformable_detr"),
    ("BM_DetaResnet50", "DETA-R50 800×1066", None, "deta_resnet50"),
]
# GFLOP of a batch-1 forward: oneDNN's convolutions and matmuls (attention's products among them; Winograd
# counted as the direct convolution; DETR-family's deformable sampling, vf's own code, not counted), from
# bench/profile/onednn_ops.py on ONEDNN_VERBOSE=1 logs of vf_bench, 2026-12-03.
GFLOP = {
    "BM_ConvNextTiny": 8.91, "BM_ConvNextV2Tiny": 8.91, "BM_DeiTBase": 35.31, "BM_Bit50": 8.18, "BM_Cvt13": 9.13,
    "BM_DetrResnet50": 162.3, "BM_ConditionalDetrResnet50": 170.0, "BM_DeformableDetr": 327.5,
    "BM_DetaResnet50": 454.6,
}
# transformers eager (DETA: bench/torch_deta.py) on the device machine's CPU (Intel Xeon, 16 vCPU), ms at 2 / 16
# threads, from issue 14: shown, marked †, only where this machine has no PyTorch side for the model.
DEVICE_ANCHORS = {
    "BM_ConvNextTiny": (65.0, 22.6), "BM_DeiTBase": (205.6, 52.9), "BM_DetrResnet50": (1399, 301.5),
    "BM_DetaResnet50": (9225, 2591), "BM_Bit50": (154, 46), "BM_ConvNextV2Tiny": (80, 31), "BM_Cvt13": (96, 39),
    "BM_ConditionalDetrResnet50": (2093, 519), "BM_DeformableDetr": (6940, 2053),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run_json_lines(cmd, env, timeout):
    """The JSON lines a command prints (stderr passed through); [] when it fails."""
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        log(f"  timed out after {timeout} s: {' '.join(cmd)}")
        return []
    out = []
    for line in p.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if p.returncode != 0:
        log(f"  exit {p.returncode}: {' '.join(cmd)}")
    return out


def vf_run(bench, name, kind, prefix, env, timeout):
    """One vf_bench benchmark in a fresh process (so that its peak RSS is its own)."""
    pattern = {"latency": f"^{name}/(min_time|iterations)", "batch": f"^{name}/batch/",
               "inflight": f"^{name}/inflight/"}[kind]
    cmd = prefix + [bench, f"--benchmark_filter={pattern}", "--benchmark_format=json"]
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT)
        runs = [b for b in json.loads(p.stdout)["benchmarks"] if not b.get("error_occurred")]
    except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as e:
        log(f"  vf_bench {name} {kind}: {type(e).__name__}")
        return None
    if not runs:
        return None
    b = runs[0]
    return {"ms": b["real_time"], "peak_rss_mb": b.get("peak_rss_mb"), "images_per_s": b.get("items_per_second"),
            "workers": b.get("workers"), "batch": b.get("batch"), "threads_each": b.get("threads_each")}


def peak_gflops(bench, prefix, env, timeout):
    """The float32 peak at VF_THREADS threads on these cores (vf_bench BM_PeakF32), or None; and the
    commit vf_bench was built from (its "vf_commit" context), or None where it does not say."""
    cmd = prefix + [bench, "--benchmark_filter=^BM_PeakF32", "--benchmark_format=json"]
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT)
        out = json.loads(p.stdout)
        return out["benchmarks"][0]["GFLOPs"], out.get("context", {}).get("vf_commit")
    except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError, IndexError) as e:
        log(f"  vf_bench BM_PeakF32: {type(e).__name__}")
        return None, None


def has_module(python, module):
    return subprocess.run([python, "-c", f"import {module}"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def ort_runner(python, node_modules):
    """The command that times ONNX files, or None: onnxruntime's Python package, else npm's onnxruntime-node."""
    if has_module(python, "onnxruntime"):
        return [python, os.path.join(HERE, "ort_bench.py"), "time"], "onnxruntime (Python)"
    node = shutil.which("node")
    if not node:
        return None, "no onnxruntime Python package and no node"
    if not os.path.isdir(os.path.join(node_modules, "onnxruntime-node")) and shutil.which("npm"):
        prefix = os.path.dirname(node_modules)
        os.makedirs(prefix, exist_ok=True)
        if not os.path.exists(os.path.join(prefix, "package.json")):
            open(os.path.join(prefix, "package.json"), "w").write('{"private": true}\n')
        version = os.environ.get("ORT_NODE_VERSION", "1.30.0")
        log(f"installing onnxruntime-node@{version} into {prefix} (--ignore-scripts: the CPU binaries are in the package)")
        subprocess.run(["npm", "install", "--prefix", prefix, "--ignore-scripts", "--no-audit", "--no-fund",
                        f"onnxruntime-node@{version}"], check=False, stdout=sys.stderr)
    if not os.path.isdir(os.path.join(node_modules, "onnxruntime-node")):
        return None, "onnxruntime-node is not installed"
    return [node, os.path.join(HERE, "ort_bench.mjs")], "onnxruntime-node"


def fmt(v, digits=None):
    if v is None:
        return "—"
    if digits is None:
        digits = 1 if v < 1000 else 0
    return f"{v:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="all", help="a number, or 'all' (every core this process may use)")
    ap.add_argument("--pin", action="store_true", help="taskset every process to the first THREADS allowed cores")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the table shows each side's best")
    ap.add_argument("--throughput-rounds", type=int, default=1, help="rounds that also measure images/s (0: none)")
    ap.add_argument("--models", default=",".join(m[0] for m in MODELS), help="comma-separated vf_bench names")
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="time the ONNX files there are, export none")
    ap.add_argument("--bench", default=os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "bench", "vf_bench"))
    ap.add_argument("--python", default=os.environ.get("PYTHON", "/usr/bin/python3" if os.path.exists(
        "/usr/bin/python3") else sys.executable), help="the Python with torch / onnxruntime")
    ap.add_argument("--onnx-dir", default=os.path.join(ROOT, ".bench", "onnx"))
    ap.add_argument("--node-modules", default=os.environ.get("ORT_NODE_MODULES",
                                                             os.path.join(ROOT, ".bench", "node", "node_modules")))
    ap.add_argument("--results", default=os.environ.get("RESULTS_DIR", os.path.join(ROOT, ".bench", "results")))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per process")
    a = ap.parse_args()

    allowed = sorted(os.sched_getaffinity(0))
    threads = len(allowed) if a.threads == "all" else int(a.threads)
    if threads < 1 or (a.pin and threads > len(allowed)):
        ap.error(f"--threads {threads}: {len(allowed)} cores allowed")
    prefix = ["taskset", "-c", ",".join(map(str, allowed[:threads]))] if a.pin else []
    env = dict(os.environ, VF_THREADS=str(threads))
    names = [n for n in a.models.split(",") if n]
    known = {m[0]: m for m in MODELS}
    for n in names:
        if n not in known:
            ap.error(f"unknown model {n}; known: {', '.join(known)}")
    if not os.access(a.bench, os.X_OK):
        ap.error(f"{a.bench} is not built (cmake --build build --target vf_bench)")

    # ONNX Runtime: exports made once (where torch is), then a runner.
    ort_cmd, ort_what = None, "not asked for"
    if not a.no_ort:
        manifest_path = os.path.join(a.onnx_dir, "manifest.json")
        manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
        missing = [n for n in names if n not in manifest]
        if missing and not a.no_export and has_module(a.python, "torch"):
            log(f"exporting {', '.join(missing)} to ONNX in {a.onnx_dir}")
            for line in run_json_lines([a.python, os.path.join(HERE, "ort_bench.py"), "export", "--out", a.onnx_dir]
                                       + missing, env, a.timeout):
                log(f"  {json.dumps(line)}")
        ort_cmd, ort_what = ort_runner(a.python, a.node_modules)
        if ort_cmd is None:
            log(f"ONNX Runtime: {ort_what}")
    torch_ok = not a.no_torch and has_module(a.python, "torch")
    transformers_ok = torch_ok and has_module(a.python, "transformers")

    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    peak, built_from = peak_gflops(a.bench, prefix, env, a.timeout)
    res = {n: {"vf": [], "ort": [], "torch": [], "batch": [], "inflight": [], "rss": []} for n in names}
    torch_source, ort_source = {}, {}
    for r in range(a.rounds):
        for n in names:
            _, title, hf_name, plain_name = known[n]
            log(f"round {r + 1}/{a.rounds}: {n}")
            v = vf_run(a.bench, n, "latency", prefix, env, a.timeout)
            if v:
                res[n]["vf"].append(v["ms"])
                res[n]["rss"].append(v["peak_rss_mb"])
            if ort_cmd:
                for line in run_json_lines(prefix + ort_cmd + ["--dir", a.onnx_dir, n], env, a.timeout):
                    if "ms" in line:
                        res[n]["ort"].append(line["ms"])
                        ort_source[n] = f"{line.get('runtime', ort_what)} on {line.get('source', '?')}"
            torch_name = hf_name if transformers_ok and hf_name else plain_name
            if torch_ok and torch_name:
                for line in run_json_lines(prefix + [a.python, os.path.join(HERE, "torch_bench.py"), torch_name],
                                           env, a.timeout):
                    if "ms" in line:
                        res[n]["torch"].append(line.get("min_ms", line["ms"]))
                        torch_source[n] = line["name"]
            if r < a.throughput_rounds:
                for kind in ("batch", "inflight"):
                    t = vf_run(a.bench, n, kind, prefix, env, a.timeout)
                    if t and t["images_per_s"]:
                        res[n][kind].append(t)
    load_after = os.getloadavg()

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # The binary's own commit: vf_bench may have been built elsewhere (a bundle carried to a device
    # machine) from another tree than the one this runs in.
    commit = built_from or (subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL, text=True).stdout.strip() + " (tree)")
    pinned = f", pinned to cores {prefix[2]}" if prefix else ""
    print(f"{started:%Y-%m-%d %H:%M} UTC · {cpu} · {len(allowed)} cores allowed · {threads} threads{pinned} · "
          f"vf {commit} · load average {load_before[0]:.1f} before, {load_after[0]:.1f} after · "
          f"best of {a.rounds} interleaved rounds, batch 1, float32 · "
          f"float32 peak {fmt(peak, 0)} GFLOP/s (BM_PeakF32)")
    print()
    print("| model | threads | vf ms | vf % of peak | ORT ms | ORT/vf | PyTorch ms | PyTorch/vf | vf peak RSS MB "
          "| vf img/s, batch | vf img/s, in flight |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = set()
    for n in names:
        _, title, hf_name, plain_name = known[n]
        d = res[n]
        vf = min(d["vf"]) if d["vf"] else None
        ort = min(d["ort"]) if d["ort"] else None
        pt = min(d["torch"]) if d["torch"] else None
        pt_cell, pt_ratio = fmt(pt), (f"{pt / vf:.2f}" if pt and vf else "—")
        if pt is None and n in DEVICE_ANCHORS and threads in (2, 16):
            pt_cell, pt_ratio = f"{fmt(DEVICE_ANCHORS[n][0 if threads == 2 else 1])} †", "—"
            notes.add("† transformers eager on the device machine's CPU (issue 14), not this machine: no ratio")
        elif pt is not None and not torch_source.get(n, "").startswith("hf_"):
            pt_cell += " ‡"
            notes.add("‡ plain-PyTorch model of the same compute (bench/torch_bench.py, bench/torch_deta.py)")
        rss = max(x for x in d["rss"] if x is not None) if any(x is not None for x in d["rss"]) else None
        best = {k: max(d[k], key=lambda t: t["images_per_s"]) if d[k] else None for k in ("batch", "inflight")}
        tp = {k: (f"{best[k]['images_per_s']:.2f} (b{int(best[k]['batch'])})" if k == "batch" else
                  f"{best[k]['images_per_s']:.2f} ({int(best[k]['workers'])}×{int(best[k]['threads_each'])} thr)")
              if best[k] else "—" for k in best}
        share = f"{100 * GFLOP[n] * 1e3 / vf / peak:.0f}%" if vf and peak and n in GFLOP else "—"
        print(f"| {title} | {threads} | {fmt(vf)} | {share} | {fmt(ort)} | {f'{ort / vf:.2f}' if ort and vf else '—'} "
              f"| {pt_cell} | {pt_ratio} | {fmt(rss, 0)} | {tp['batch']} | {tp['inflight']} |")
    print()
    for note in sorted(notes):
        print(note)
    if ort_source:
        runtimes = ", ".join(sorted({s.split(" on ")[0] for s in ort_source.values()}))
        print(f"ORT: {runtimes}, {threads} intra-op threads; ONNX exports: "
              + "; ".join(f"{n} {s.split(' on ', 1)[1]}" for n, s in ort_source.items()))
    else:
        print(f"ORT: {ort_what}")
    print("PyTorch: " + (", ".join(f"{n} {s}" for n, s in torch_source.items()) or "none here"))
    print("vf % of peak: the model's GFLOP (bench_table.py's GFLOP, oneDNN's products) over vf ms, against "
          "BM_PeakF32; ORT and PyTorch run the same FLOPs, so their share is vf's times their ratio's inverse")
    print("vf img/s: batch = one model, bN images per forward on all threads; in flight = W models × T threads, "
          "one image each, all at once (vf_bench /batch, /inflight)")

    os.makedirs(a.results, exist_ok=True)
    path = os.path.join(a.results, f"{started:%Y%m%d-%H%M}-t{threads}{'-pinned' if prefix else ''}.json")
    json.dump({"started": started.isoformat(), "cpu": cpu, "threads": threads, "pinned": prefix[2] if prefix else None,
               "load_before": load_before, "load_after": load_after, "commit": commit, "peak_gflops": peak,
               "results": res,
               "ort_source": ort_source, "torch_source": torch_source}, open(path, "w"), indent=1)
    log(f"raw results: {path}")


if __name__ == "__main__":
    main()
