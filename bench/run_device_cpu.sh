#!/usr/bin/env bash
# bench/run.sh on the device machine's CPU (after scripts/device-bundle.sh made .device/ here): vf_bench from the
# bundle, its libraries unpacked as scripts/device-test.sh does, and that machine's PyTorch, transformers and
# onnxruntime (python3 on PATH). Arguments go to bench/run.sh, e.g. --threads 2 --pin, or --threads 16.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/vf-device}
mkdir -p "$work/lib"
[ -e "$work/lib/.unpacked" ] || { tar -C "$work/lib" -xJf .device/libs.tar.xz && touch "$work/lib/.unpacked"; }
mkdir -p "$work/bin"
[ -x "$work/bin/vf_bench" ] || tar -C "$work/bin" -xJf .device/bins.tar.xz
# (ls fails when either path is missing: under pipefail and -e that must not end the script)
cudnn=$(ls /usr/lib/x86_64-linux-gnu/libcudnn.so.9 /usr/local/cuda/lib64/libcudnn.so.9 2>/dev/null | head -1 || true)
[ -n "$cudnn" ] || cudnn=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib", "libcudnn.so.9"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="$work/lib:/usr/local/cuda/lib64:$(dirname "${cudnn:-/nonexistent/x}"):${LD_LIBRARY_PATH:-}"
# The CPU build's vf_bench where the bundle has one: the CUDA build's loads cuDNN and cuBLAS even on the
# CPU, ~150 MB more peak RSS.
cpu_bench=$work/bin/vf_bench; [ -x "$work/bin/vf_bench_cpu" ] && cpu_bench=$work/bin/vf_bench_cpu
export VF_BENCH=${VF_BENCH:-$cpu_bench} PYTHON=${PYTHON:-$(command -v python3)}
exec bench/run.sh "$@"
