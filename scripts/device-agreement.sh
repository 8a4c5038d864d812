#!/usr/bin/env bash
# On the GPU machine after scripts/device-test.sh unpacked .device/: every carried model golden case
# with --device DEVICE (default cuda) --dtype DTYPE (default bfloat16), judged by vf check's
# reduced-precision criteria (README: reduced precision). One line per case, then a summary.
# DEVICE=cpu runs the CPU build's vf (vf_cpu) where the bundle has one.
set -uo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/vf-device}
dtype=${DTYPE:-bfloat16}
device=${DEVICE:-cuda}
vf=$work/bin/vf
[ "$device" = cpu ] && [ -x "$work/bin/vf_cpu" ] && vf=$work/bin/vf_cpu
export LD_LIBRARY_PATH="$work/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
pass=0 fail=0
for c in $(cat .device/cases.list); do
  if out=$("$vf" check "$work/goldens/$c" --images "$work/goldens/images" --device "$device" --dtype "$dtype" 2>&1); then
    pass=$((pass + 1)); echo "PASS $c"
  else
    fail=$((fail + 1)); echo "FAIL $c: $(echo "$out" | grep -E 'FAIL|error|differs|gap' | head -3 | tr '\n' ' ')"
  fi
  echo "$out" | grep -E "top-1|max\|diff\||queries" | sed "s/^/    /" | head -6
done
echo "$dtype on $device: $pass passed, $fail failed"
