#!/usr/bin/env python3
"""Per forward: oneDNN's own time and work per convolution and matmul, against the machine's peak.

    ONEDNN_VERBOSE=1 VF_THREADS=2 vf_bench --benchmark_filter='^BM_ConvNextTiny/min' > LOG
    VF_THREADS=2 vf_bench --benchmark_filter=BM_PeakF32      # the peak: its GFLOPs counter
    onednn_ops.py LOG [--peak GFLOPS] [--top N]

Groups the log's `exec` lines by (primitive, kernel, problem). A forward runs each convolution and matmul
at least once, so the least-executed of them gives the number of forwards in the log, and each group's
count divided by it how often a forward runs it. Times are each group's median over its faster half of
calls (a process's first calls pay for page faults and cold caches). FLOPs count a multiply-add as two
and a Winograd convolution as the direct one it replaces, so its GFLOP/s is an effective rate. Reorders
and other primitives are listed by time only. Weights reordered at load count too where the log has few
forwards (DeiT-B's at 0.3 s of benchmark time): give the benchmark enough time (VF_BENCH_MIN_SECONDS).
"""
import argparse
import collections
import re
import sys

CONV = re.compile(r"(?:g(\d+))?mb(\d+)_ic(\d+)oc(\d+)_(?:id\d+od(\d+)kd(\d+)\w*?_)?ih\d+oh(\d+)kh(\d+)\w*?_iw\d+ow(\d+)kw(\d+)")


def flops(primitive, problem):
    """Multiply-adds times two of one call, or None where the primitive does none."""
    if primitive == "matmul":
        a, b = ([int(x) for x in part.split("x")] for part in problem.split(":")[:2])
        batch = 1
        for x in a[:-2]:
            batch *= x
        return 2 * batch * a[-2] * a[-1] * b[-1]
    if primitive in ("convolution", "deconvolution"):
        m = CONV.search(problem)
        if not m:
            return None
        g, mb, ic, oc, od, kd, oh, kh, ow, kw = (int(x) if x else 1 for x in m.groups())
        return 2 * mb * oc * od * oh * ow * (ic // g) * kd * kh * kw
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--peak", type=float, help="the machine's GFLOP/s at the log's thread count (BM_PeakF32)")
    ap.add_argument("--top", type=int, default=25, help="rows to print (0: all)")
    args = ap.parse_args()

    calls = collections.defaultdict(list)
    for line in open(args.log):
        # oneDNN 2.x: onednn_verbose,exec,cpu,PRIMITIVE,KERNEL,...,PROBLEM,MS; 3.x puts more fields
        # (a version, "primitive", a timestamp) before "exec".
        if not line.startswith("onednn_verbose,"):
            continue
        f = line.rstrip("\n").split(",")
        try:
            at = f.index("exec")
        except ValueError:
            continue
        if len(f) < at + 5 or f[at + 1] != "cpu":
            continue
        calls[(f[at + 2], f[at + 3], f[-2])].append(float(f[-1]))
    if not calls:
        sys.exit(f"{args.log}: no oneDNN exec lines (was ONEDNN_VERBOSE=1 set?)")
    work = {k: flops(k[0], k[2]) for k in calls}
    computing = [len(v) for k, v in calls.items() if work[k]]
    if not computing:
        sys.exit(f"{args.log}: no convolution or matmul calls")
    forwards = min(computing)

    rows = []
    for k, times in calls.items():
        per_forward = len(times) / forwards
        if per_forward < 1:  # made once (weights reordered at load), not part of a forward
            continue
        faster = sorted(times)[: len(times) // 2 + 1]
        ms = faster[len(faster) // 2]
        rows.append((ms * per_forward, per_forward, ms, k, work[k]))
    rows.sort(key=lambda r: -r[0])

    total_ms = sum(r[0] for r in rows)
    total_gflop = sum(r[1] * r[4] for r in rows if r[4]) / 1e9
    rate = total_gflop / total_ms * 1e3
    print(f"{args.log}: {forwards} forwards; per forward {total_ms:.3f} ms in oneDNN, {total_gflop:.3f} GFLOP "
          f"({rate:.0f} GFLOP/s" + (f", {100 * rate / args.peak:.0f}% of peak)" if args.peak else ")"))
    print(f"{'ms/fwd':>8} {'calls':>5} {'ms/call':>8} {'GFLOP/s':>8} {'%peak':>5}  primitive, kernel, problem")
    for total, per_forward, ms, k, f in rows[: args.top or None]:
        gflops = f / ms / 1e6 if f else None
        pct = f"{100 * gflops / args.peak:5.0f}" if gflops and args.peak else f"{'':5}"
        print(f"{total:8.3f} {per_forward:5.1f} {ms:8.3f} {gflops or 0:8.0f} {pct}  {k[0]}, {k[1]}, {k[2][:80]}")


if __name__ == "__main__":
    main()
