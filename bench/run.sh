#!/usr/bin/env bash
# Side by side on this machine: vf (Google Benchmark) and PyTorch eager (Debian's python3-torch),
# batch 1, the same thread count (VF_THREADS, default: all cores). Prints a table with the ratios.
# Needs: VF_BENCH_DEPS=1 scripts/install-deps.sh (python3-torch, python3-torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
export VF_THREADS=${VF_THREADS:-$(nproc)}
build=${BUILD_DIR:-build}
[ "${SKIP_BUILD:-0}" = 1 ] || cmake --build "$build" -j"$(nproc)" --target vf_bench >/dev/null
python=${PYTHON:-/usr/bin/python3}
out=$(mktemp -d)
${TASKSET:-} "$build/bench/vf_bench" --benchmark_format=json --benchmark_out="$out/vf.json" --benchmark_out_format=json >/dev/null
${TASKSET:-} "$python" bench/torch_bench.py > "$out/torch.jsonl"
cp "$out"/vf.json "$out"/torch.jsonl "${RESULTS_DIR:-$out}/" 2>/dev/null || true
"$python" - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
vf = {b["name"].split("/")[0]: b["real_time"] for b in json.load(open(f"{out}/vf.json"))["benchmarks"]}
torch = {}
for line in open(f"{out}/torch.jsonl"):
    r = json.loads(line)
    if "ms" in r: torch[r["name"]] = r["ms"]
pairs = [("ConvNeXt-T 224² vs torchvision convnext_tiny", "BM_ConvNextTiny", "convnext_tiny"),
         ("ConvNeXt-T 224² vs transformers ConvNextForImageClassification", "BM_ConvNextTiny", "hf_convnext_tiny"),
         ("DeiT-B/16 224² vs torchvision vit_b_16", "BM_DeiTBase", "vit_b_16"),
         ("DeiT-B/16 224² vs transformers DeiTModel", "BM_DeiTBase", "hf_deit_base"),
         ("DETR-R50 800×1066 vs plain-PyTorch DETR (bench/torch_bench.py)", "BM_DetrResnet50", "detr_resnet50"),
         ("DETR-R50 800×1066 vs transformers DetrForObjectDetection", "BM_DetrResnet50", "hf_detr_resnet50"),
         ("DETA-R50 800×1066 vs plain-PyTorch DETA (bench/torch_deta.py)", "BM_DetaResnet50", "deta_resnet50")]
print(f"threads: {os.environ['VF_THREADS']}")
print(f"| model | vf ms | PyTorch eager ms | PyTorch / vf |")
print(f"|---|---:|---:|---:|")
for title, v, t in pairs:
    a, b = vf.get(v), torch.get(t) if t else None
    ratio = f"{b / a:.2f}×" if a and b else "—"
    print(f"| {title} | {a:.1f} | {b:.1f} | {ratio} |" if a and b else f"| {title} | {a if a is None else round(a, 1)} | {b if b is None else round(b, 1)} | {ratio} |")
PY
