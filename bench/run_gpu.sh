#!/usr/bin/env bash
# GPU side by side (on the device machine, after scripts/device-test.sh has unpacked .device/): vf's
# CUDA backend (VF_DEVICE=cuda vf_bench) and PyTorch eager on the same GPU, batch 1, float32 without
# TF32. Prints a table: model, vf ms, PyTorch ms, PyTorch / vf.
set -uo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/vf-device}
export LD_LIBRARY_PATH="$work/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
out=${OUT:-$(mktemp -d)}
filter=${FILTER:-BM_ConvNextTiny|BM_DeiTBase|BM_DetrResnet50|BM_DetaResnet50|BM_Bit50|BM_ConvNextV2Tiny|BM_Cvt13|BM_ConditionalDetrResnet50|BM_DeformableDetr}
VF_DEVICE=${VF_DEVICE:-cuda} "$work/bin/vf_bench" --benchmark_filter="^($filter)/(min_time|iterations)" --benchmark_min_time=2 \
  --benchmark_format=json --benchmark_out="$out/vf_gpu.json" --benchmark_out_format=json > /dev/null
python3 bench/torch_gpu_bench.py > "$out/torch_gpu.jsonl"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
vf = {b["name"].split("/")[0]: b["real_time"] for b in json.load(open(f"{out}/vf_gpu.json"))["benchmarks"]}
torch = {}
for line in open(f"{out}/torch_gpu.jsonl"):
    r = json.loads(line)
    torch[r["name"]] = r
print("| model | vf CUDA ms | transformers eager ms | transformers / vf | transformers peak MB |")
print("|---|---:|---:|---:|---:|")
for name in sorted(set(vf) | set(torch)):
    a, t = vf.get(name), torch.get(name, {})
    b = t.get("ms")
    ratio = f"{b / a:.2f}x" if a and b else "-"
    fa = f"{a:.2f}" if a else "-"
    fb = f"{b:.2f}" if b else t.get("error", "-")[:40]
    print(f"| {name} | {fa} | {fb} | {ratio} | {t.get('peak_mb', '-')} |")
PY
