#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang, -DVF_FUZZ=ON, ASan+UBSan) and runs them.
#   scripts/fuzz.sh build                     build build-fuzz/fuzz/fuzz_*
#   scripts/fuzz.sh run NAME [SECONDS]        fuzz one target (default 600 s), nice'd, on a scratch copy
#                                             of tests/fuzz/corpus/NAME; crashes land in scratch/fuzz/NAME/
#   scripts/fuzz.sh replay                    run every harness once over its seeds and regressions
# Targets: safetensors torch config image shard_index (fuzz/entries.h).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-fuzz}
TARGETS="safetensors torch config image shard_index"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/scripts/lsan.supp:print_suppressions=0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

build() {
  cmake -B "$BUILD" -S . -DVF_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DVF_BUILD_TESTS=OFF -DVF_BUILD_BENCH=OFF >/dev/null
  local t=()
  for n in $TARGETS; do t+=(--target "fuzz_$n"); done
  cmake --build "$BUILD" -j"${JOBS:-2}" "${t[@]}"
}

run() {
  local name=$1 secs=${2:-600}
  local work=scratch/fuzz/$name
  mkdir -p "$work/corpus" "$work/artifacts"
  cp -n tests/fuzz/corpus/"$name"/* "$work/corpus/" 2>/dev/null || true
  nice -n 19 "$BUILD/fuzz/fuzz_$name" "$work/corpus" -max_total_time="$secs" -timeout="${TIMEOUT:-120}" -rss_limit_mb=3072 \
    -max_len=65536 -artifact_prefix="$work/artifacts/" -print_final_stats=1 2>&1 | tee "$work/log.txt" | tail -25
}

replay() {
  for n in $TARGETS; do
    local files=(tests/fuzz/corpus/"$n"/* tests/fuzz/regressions/"$n"/*)
    local existing=()
    for f in "${files[@]}"; do [ -f "$f" ] && existing+=("$f"); done
    echo "== $n: ${#existing[@]} inputs"
    "$BUILD/fuzz/fuzz_$n" -runs=1 "${existing[@]}" >/dev/null 2>&1 || { echo "FAILED: $n"; exit 1; }
  done
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  replay) replay ;;
  *) sed -n 2,7p "$0"; exit 64 ;;
esac
