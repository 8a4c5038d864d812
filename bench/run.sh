#!/usr/bin/env bash
# vf beside ONNX Runtime and PyTorch on this machine: the same models, thread count and cores, interleaved rounds,
# one table (model, threads, vf ms, ORT ms, ORT/vf, PyTorch ms, PyTorch/vf, vf peak RSS, vf images/s).
#   bench/run.sh --threads 2 --pin     2 threads, every process pinned to the same 2 cores (taskset)
#   bench/run.sh                       all cores
#   bench/run.sh --help                the rest (--rounds, --models, --no-ort, --no-torch, ...)
#   bench/run.sh --gpu                 the GPU columns instead: bench/run_gpu.sh (vf's CUDA backend beside
#                                      transformers eager, torch.compile and autocast on the same GPU)
# ONNX Runtime: onnxruntime's Python package where PYTHON has it (the device machine), else npm's onnxruntime-node,
# installed with --ignore-scripts into .bench/node. The ONNX exports (bench/ort_bench.py, into .bench/onnx) need torch:
# here `VF_BENCH_DEPS=1 scripts/install-deps.sh` (Debian's python3-torch), which also gives the PyTorch column.
# Environment: BUILD_DIR (default build), SKIP_BUILD=1 (use the built vf_bench as it is), VF_BENCH (a vf_bench
# binary to use as it is), PYTHON, RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --gpu ]; then shift; exec bench/run_gpu.sh "$@"; fi
build=${BUILD_DIR:-build}
bench=${VF_BENCH:-$build/bench/vf_bench}  # VF_BENCH: a prebuilt vf_bench (bench/run_device_cpu.sh), not built here
[ "${SKIP_BUILD:-0}" = 1 ] || [ -n "${VF_BENCH:-}" ] || cmake --build "$build" -j"$(nproc)" --target vf_bench >/dev/null
# The Python with torch (and onnxruntime, transformers) where there is one: PATH's, then Debian's.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=/usr/bin/python3
  for p in "$(command -v python3 || true)" /usr/bin/python3; do
    if [ -n "$p" ] && "$p" -c "import torch" 2>/dev/null; then PYTHON=$p; break; fi
  done
fi
exec "$PYTHON" bench/bench_table.py --bench "$bench" --python "$PYTHON" "$@"
