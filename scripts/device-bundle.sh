#!/usr/bin/env bash
# Makes .device/ (git-ignored): what scripts/device-test.sh needs on a GPU machine that has the CUDA
# toolkit and cuDNN but none of the project's Debian libraries (the device tool's machines): the
# CUDA build's binaries, the shared libraries they need beyond glibc and CUDA, and the golden cases.
#
#   cmake -B build-cuda -DVF_CUDA=ON -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc
#   cmake --build build-cuda -j --target vf vf_cuda_tests vf_bench
#   scripts/device-bundle.sh            # then: scripts/device-test.sh on the GPU machine
#
# CPU_BUILD_DIR (default build): the CPU build whose vf_bench is carried too, as vf_bench_cpu.
#
# GOLDEN_CASES (a space-separated list of case names) limits the goldens carried; by default every
# case of ../shared/goldens that runs a model. Archives are xz (-9e for the two that change rarely): the
# device tool carries 64 MiB, the tracked files included.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build-cuda}
goldens=${GOLDENS:-../shared/goldens}
out=.device
rm -rf "$out/bin" && mkdir -p "$out/bin"
for b in vf tests/vf_cuda_tests bench/vf_bench bench/libvf_kernel_profile.so; do
  if [ -x "$build/$b" ]; then strip -o "$out/bin/$(basename "$b")" "$build/$b"; fi
done
# The CPU build's vf_bench and vf too (bench/run_device_cpu.sh, DEVICE=cpu scripts/device-agreement.sh):
# the CUDA build's map cuDNN and cuBLAS even when they run on the CPU (~150 MB more peak RSS), and a
# bundle made from a CPU build alone serves the CPU measurements.
cpu_build=${CPU_BUILD_DIR:-build}
if [ -x "$cpu_build/bench/vf_bench" ]; then strip -o "$out/bin/vf_bench_cpu" "$cpu_build/bench/vf_bench"; fi
if [ -x "$cpu_build/vf" ]; then strip -o "$out/bin/vf_cpu" "$cpu_build/vf"; fi

# Libraries: everything the binaries load except glibc, the C++ runtime and CUDA's own (the GPU
# machine has newer ones of those).
libs=$(mktemp -d)
for b in "$out"/bin/*; do
  ldd "$b" | awk '/=> \//{print $3}'
done | sort -u | grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux[^/]*|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libcudnn[^/]*|libcupti)\.so' |
  while read -r f; do cp -L "$f" "$libs/"; done
stamp="$out/libs.list"
ls "$libs" > "$stamp.new"
if ! cmp -s "$stamp.new" "$stamp" || [ ! -f "$out/libs.tar.xz" ]; then
  tar -C "$libs" -cf - . | xz -T2 -9e > "$out/libs.tar.xz"
  mv "$stamp.new" "$stamp"
fi
rm -rf "$libs" "$stamp.new"
tar -C "$out/bin" -cf - . | xz -T2 -6 > "$out/bins.tar.xz"

cases=${GOLDEN_CASES:-$(for c in "$goldens"/*/; do
  c=$(basename "$c"); [ -f "$goldens/$c/case.json" ] || continue
  case $c in proc-*|postproc-*) continue;; esac; echo "$c"; done)}
echo "$cases" | tr ' ' '\n' | grep . > "$out/cases.list.new"
if ! cmp -s "$out/cases.list.new" "$out/cases.list" || [ ! -f "$out/goldens.tar.xz" ]; then
  tar -C "$goldens" -cf - images $(cat "$out/cases.list.new") | xz -T2 -9e > "$out/goldens.tar.xz"
fi
mv "$out/cases.list.new" "$out/cases.list"
rm -rf "$out/bin"
du -sh "$out"/* | sort -h
