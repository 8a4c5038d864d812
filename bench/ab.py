#!/usr/bin/env python3
"""Interleaved A/B of vf_bench builds: each round runs every (model, dtype, build) once, in that order,
each in a fresh process; the table gives each side's median and best over the rounds, and the float32 /
bfloat16 speed-up of each build from the medians. For noisy machines (the device's lent CPUs swing by
10-50% between runs of one configuration): many short rounds, medians beside minima.

    bench/ab.py build-old/bench/vf_bench build/bench/vf_bench --models BM_ConvNextV2Tiny,BM_Cvt13 \\
        --dtypes float32,bfloat16 --threads 16 --rounds 5 --seconds 0.5

--pin runs every process on the first THREADS allowed cores (taskset), as bench/run.sh --pin does.
VF_BENCH_MIN_SECONDS is --seconds (builds before commit 9be7ec2 ignore it and take 3 s). Raw rows go
to --csv when given.
"""
import argparse
import csv
import os
import statistics
import sys

from bench_table import vf_run  # one vf_bench benchmark in a fresh process, as bench/run.sh runs it


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="vf_bench binaries (the first is the baseline)")
    ap.add_argument("--models", default="BM_ConvNextTiny,BM_ConvNextV2Tiny,BM_DeiTBase,BM_Cvt13")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--csv", help="write every measurement here")
    a = ap.parse_args()
    models, dtypes = a.models.split(","), a.dtypes.split(",")
    prefix = ["taskset", "-c", ",".join(map(str, sorted(os.sched_getaffinity(0))[:a.threads]))] if a.pin else []
    times = {}
    rows = []
    for r in range(a.rounds):
        for m in models:
            for d in dtypes:
                for b in a.builds:
                    env = dict(os.environ, VF_THREADS=str(a.threads), VF_DTYPE=d, VF_BENCH_MIN_SECONDS=str(a.seconds))
                    v = vf_run(os.path.abspath(b), m, "latency", prefix, env, 600)
                    t = v["ms"] if v else None
                    rows.append((r, m, d, b, t))
                    if t is not None:
                        times.setdefault((m, d, b), []).append(t)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            csv.writer(f).writerows([("round", "model", "dtype", "build", "ms")] + rows)
    names = [os.path.relpath(b) for b in a.builds]
    print(f"{a.threads} threads{' pinned' if a.pin else ''}, {a.rounds} interleaved rounds; ms, median (best)")
    print("| model | dtype | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for m in models:
        for d in dtypes:
            cells = []
            for b in a.builds:
                v = times.get((m, d, b), [])
                cells.append(f"{statistics.median(v):.2f} ({min(v):.2f})" if v else "—")
            print(f"| {m} | {d} | " + " | ".join(cells) + " |")
        if "float32" in dtypes and "bfloat16" in dtypes:
            ratios = []
            for b in a.builds:
                f, h = times.get((m, "float32", b)), times.get((m, "bfloat16", b))
                ratios.append(f"{statistics.median(f) / statistics.median(h):.2f}x" if f and h else "—")
            print(f"| {m} | bf16 speed-up | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
