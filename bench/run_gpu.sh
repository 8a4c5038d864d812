#!/usr/bin/env bash
# GPU side by side (on the device machine, after scripts/device-test.sh has unpacked .device/): vf's
# CUDA backend (VF_DEVICE=cuda vf_bench) and PyTorch on the same GPU. Prints two tables:
#   batch 1, float32 without TF32: vf, transformers eager, torch.compile(mode="reduce-overhead") where
#     COMPILE lists the model (the issue's anchors: ConvNeXt-T, DETR-R50)
#   throughput in bfloat16 (DTYPE; float16, or float32 for both sides unconverted): vf --dtype (VF_DTYPE)
#     against torch.autocast, at the batch of each
#     THROUGHPUT entry (NAME=BATCH), ms per batch and images/s
# with each side's peak GPU memory (vf: what its tensors held while timed; PyTorch: max_memory_allocated).
# SKIP_LATENCY=1 or SKIP_THROUGHPUT=1 leaves a table out.
set -uo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/vf-device}
if [ ! -x "$work/bin/vf_bench" ] && [ -f .device/bins.tar.xz ]; then  # a fresh machine: unpack as device-test.sh does
  mkdir -p "$work/lib" "$work/bin"
  tar -C "$work/lib" -xJf .device/libs.tar.xz && tar -C "$work/bin" -xJf .device/bins.tar.xz
fi
export LD_LIBRARY_PATH="$work/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
out=${OUT:-$(mktemp -d)}
filter=${FILTER:-BM_ConvNextTiny|BM_DeiTBase|BM_DetrResnet50|BM_DetaResnet50|BM_Bit50|BM_ConvNextV2Tiny|BM_Cvt13|BM_ConditionalDetrResnet50|BM_DeformableDetr}
compile=${COMPILE:-BM_ConvNextTiny BM_DetrResnet50}
throughput=${THROUGHPUT:-BM_ConvNextTiny=32 BM_DeiTBase=32 BM_DetrResnet50=8 BM_DeformableDetr=8}
dtype=${DTYPE:-bfloat16}
: > "$out/torch_gpu.jsonl"
if [ -z "${SKIP_LATENCY:-}" ]; then
  # Twice: the image on the GPU before the clock starts (as PyTorch's timings have it; the ratios),
  # and from a host image (the upload included; what a caller of Model::infer waits for).
  for source in device host; do
    VF_BENCH_INPUT=$source VF_DEVICE=${VF_DEVICE:-cuda} "$work/bin/vf_bench" --benchmark_filter="^($filter)/(min_time|iterations)" \
      --benchmark_min_time=2 --benchmark_format=json --benchmark_out="$out/vf_gpu_$source.json" --benchmark_out_format=json > /dev/null
  done
  python3 bench/torch_gpu_bench.py >> "$out/torch_gpu.jsonl"
  [ -n "$compile" ] && python3 bench/torch_gpu_bench.py --mode compile $compile >> "$out/torch_gpu.jsonl"
fi
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
  for e in $throughput; do
    name=${e%=*} batch=${e#*=}
    case $name in *Detr*|*Deta*) rounds=10;; *) rounds=30;; esac
    # One process per model: the peak is that model's.
    VF_DEVICE=${VF_DEVICE:-cuda} VF_DTYPE=$dtype VF_BENCH_BATCH=$batch VF_BENCH_ROUNDS=$rounds \
      "$work/bin/vf_bench" --benchmark_filter="^$name/batch" --benchmark_format=json \
      --benchmark_out="$out/vf_gpu_$dtype.$name.json" --benchmark_out_format=json > /dev/null
  done
  python3 bench/torch_gpu_bench.py --mode autocast --dtype "$dtype" $throughput >> "$out/torch_gpu.jsonl"
fi
python3 - "$out" "$dtype" <<'PY'
import glob, json, os, sys
out, dtype = sys.argv[1], sys.argv[2]
torch = {}
for line in open(f"{out}/torch_gpu.jsonl"):
    r = json.loads(line)
    torch[(r["name"], r.get("mode", "eager"))] = r

def ms(r):
    return f"{r['ms']:.2f}" if r and "ms" in r else (r.get("error", "-")[:40] if r else "-")

def load(path):
    try:
        return {b["name"].split("/")[0]: b for b in json.load(open(path))["benchmarks"]}
    except (OSError, ValueError, KeyError):
        print(f"no result in {os.path.basename(path)}")
        return {}

if os.path.exists(f"{out}/vf_gpu_device.json"):
    vf, vf_host = load(f"{out}/vf_gpu_device.json"), load(f"{out}/vf_gpu_host.json")
    print("batch 1, float32 (TF32 off); vf ms: the image on the GPU, as PyTorch's; from host: the upload included\n")
    print("| model | vf CUDA ms | eager ms | eager / vf | compile ms | compile / vf | vf from host ms | vf peak MB | eager peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = sorted(set(vf) | {n for n, m in torch if m in ("eager", "compile")})
    for name in names:
        b = vf.get(name)
        a = b["real_time"] if b else None
        e, c = torch.get((name, "eager")), torch.get((name, "compile"))
        ratio = lambda r: f"{r['ms'] / a:.2f}x" if a and r and "ms" in r else "-"
        peak = f"{b['peak_gpu_mb']:.0f}" if b and "peak_gpu_mb" in b else "-"
        print(f"| {name} | {a:.2f} | " if a else f"| {name} | - | ", end="")
        h = vf_host.get(name)
        host = f"{h['real_time']:.2f}" if h else "-"
        print(f"{ms(e)} | {ratio(e)} | {ms(c)} | {ratio(c)} | {host} | {peak} | {e.get('peak_mb', '-') if e else '-'} |")
    print()

rows = []
for f in sorted(glob.glob(f"{out}/vf_gpu_{dtype}.*.json")):
    try:
        rows += [b for b in json.load(open(f))["benchmarks"] if "items_per_second" in b]
    except (ValueError, KeyError):  # vf_bench stopped early: its stderr says why
        print(f"no result in {os.path.basename(f)}")
if rows:
    print(f"throughput, {dtype} (vf --dtype {dtype} vs torch.autocast)\n")
    print("| model | batch | vf ms/batch | vf images/s | autocast ms/batch | autocast images/s | autocast / vf (ms) "
          "| vf peak MB | autocast peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in rows:
        name, batch = b["name"].split("/")[0], int(b["batch"])
        ips = b["items_per_second"]
        vms = batch * 1000.0 / ips
        t = torch.get((name, f"autocast {dtype}"))
        tms = t["ms"] if t and "ms" in t else None
        print(f"| {name} | {batch} | {vms:.2f} | {ips:.0f} | {ms(t)} | "
              f"{t['images_per_s']:.0f} | " if tms else f"| {name} | {batch} | {vms:.2f} | {ips:.0f} | {ms(t)} | - | ",
              end="")
        print(f"{tms / vms:.2f}x | " if tms else "- | ", end="")
        print(f"{b.get('peak_gpu_mb', 0):.0f} | {t.get('peak_mb', '-') if t else '-'} |")
PY
