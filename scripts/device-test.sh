#!/usr/bin/env bash
# On a GPU machine (the device tool's), from the repository root, with .device/ made by
# scripts/device-bundle.sh: the CUDA op tests, then every carried golden case with --device cuda,
# at the tolerances of the CPU. Writes logs to $OUT (or /tmp) and ends with a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/vf-device}
logs=${OUT:-/tmp}
mkdir -p "$work/lib" "$work/goldens"
tar -C "$work/lib" -xJf .device/libs.tar.xz
tar -C "$work/goldens" -xJf .device/goldens.tar.xz
# cuDNN: the system's, else the one in PyTorch's wheels.
cudnn=$(ls /usr/lib/x86_64-linux-gnu/libcudnn.so.9 /usr/local/cuda/lib64/libcudnn.so.9 2>/dev/null | head -1)
[ -n "$cudnn" ] || cudnn=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib", "libcudnn.so.9"))' 2>/dev/null)
export LD_LIBRARY_PATH="$work/lib:/usr/local/cuda/lib64:$(dirname "${cudnn:-/nonexistent/x}"):${LD_LIBRARY_PATH:-}"
bin=.device/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== CUDA op tests"
"$bin/vf_cuda_tests" 2>&1 | tee "$logs/cuda_ops.log" | grep -E '^\[  (FAILED|PASSED) |Failure|error|Expected|Which is|element' | head -60
ops_rc=${PIPESTATUS[0]}

echo "== golden cases on ${DEVICE:-cuda}"
pass=0 fail=0
: > "$logs/goldens.log"
for c in $(cat .device/cases.list); do
  if out=$("$bin/vf" check "$work/goldens/$c" --images "$work/goldens/images" --device "${DEVICE:-cuda}" 2>&1); then
    pass=$((pass + 1)); echo "PASS $c" >> "$logs/goldens.log"
  else
    fail=$((fail + 1)); echo "FAIL $c" >> "$logs/goldens.log"; echo "$out" >> "$logs/goldens.log"
    echo "FAIL $c: $(echo "$out" | grep -E 'FAIL|error' | head -3 | tr '\n' ' ')"
  fi
done
echo "op tests exit $ops_rc; golden cases: $pass passed, $fail failed"
[ "$ops_rc" = 0 ] && [ "$fail" = 0 ]
