#!/usr/bin/env bash
# Builds the project with AddressSanitizer + UndefinedBehaviorSanitizer (-DVF_SANITIZE=ON) and runs
# the whole test suite under them: every unit test, then every golden case. Any sanitizer report
# fails the run (halt_on_error; UBSan does not recover). Usage: scripts/sanitize.sh [build-dir]
# (default build-asan). Env: JOBS (default 2), VF_SANITIZE_GOLDENS (ctest -R regex of the golden
# cases to run; default all of them; "" skips them), CTEST_ARGS (extra ctest arguments). The Python module is
# left out: an ASan-instrumented extension cannot load into an uninstrumented interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-asan}
JOBS=${JOBS:-2}
GOLDENS=${VF_SANITIZE_GOLDENS-'^golden\.'}

export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
# oneDNN's JIT and OpenMP runtime allocate per-thread state that lives until exit.
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/scripts/lsan.supp:print_suppressions=0}

cmake -B "$BUILD" -S . -DVF_SANITIZE=ON -DVF_BUILD_BENCH=OFF -DVF_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD" -j"$JOBS"
ctest --test-dir "$BUILD" -E '^golden\.' --output-on-failure -j"$JOBS" ${CTEST_ARGS:-}
if [ -n "$GOLDENS" ]; then
  ctest --test-dir "$BUILD" -R "$GOLDENS" --output-on-failure -j"$JOBS" ${CTEST_ARGS:-}
fi
echo "sanitize.sh: ASan+UBSan build and tests clean"
