#!/usr/bin/env python3
"""Per forward: ONNX Runtime's own time and work per node, beside onednn_ops.py's table of vf's kernels.

    VF_THREADS=2 taskset -c 0,1 ort_ops.py .bench/onnx/BM_ConvNextTiny.onnx [--peak GFLOPS] [--runs 30] [--top N]

Runs the model with onnxruntime's profiler on (VF_THREADS intra-op threads, all graph optimisations, as
bench/ort_bench.py times it), drops the warm-up runs and takes each node's median over the rest. Work is
counted for the nodes that multiply (Conv and MatMul and their fused and NCHWc forms, Gemm) from the shapes
the profiler records and the attributes of the optimised graph (onnx's Python package reads it): a
multiply-add is two FLOPs, as in onednn_ops.py. Prints the forward's time, then its nodes by op type, then
the slowest nodes.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ort_bench import session_options  # noqa: E402  (the settings bench/ort_bench.py times with)


def shapes(entries):
    """[shape, ...] of a profiler event's input_type_shape / output_type_shape list."""
    return [list(e.values())[0] for e in entries or []]


def prod(xs):
    n = 1
    for x in xs:
        n *= x
    return n


def flops(op, ins, outs, attrs):
    """Multiply-adds times two of one call, or None where the node does none (or its shapes say too little)."""
    try:
        if op in ("MatMul", "FusedMatMul", "Gemm"):
            # The output [..., M, N] and A's K: a constant B (the weights) is not in the profile's shapes.
            a, y = ins[0], outs[0]
            k = a[-2] if attrs.get("transA", 0) else a[-1]
            return 2 * prod(y) * k
        if op in ("Conv", "FusedConv", "NchwcConv"):
            w, y = ins[1], outs[0]
            # y [N, OC, spatial...], w [OC, IC/groups, kernel...]: every output reads IC/groups x kernel inputs.
            return 2 * prod(y) * prod(w[1:])
    except (IndexError, TypeError):
        return None
    return None


def node_attrs(optimized_path):
    """{node name: {attribute: int value}} of the optimised graph, or {} without onnx's package."""
    try:
        import onnx
    except ImportError:
        return {}
    graph = onnx.load(optimized_path, load_external_data=False).graph
    return {n.name: {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT} for n in graph.node}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=30, help="profiled runs after the warm-up")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak", type=float, help="the machine's GFLOP/s at these threads (vf_bench's BM_PeakF32)")
    ap.add_argument("--top", type=int, default=25, help="slowest nodes to print (0: all)")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    threads = int(os.environ.get("VF_THREADS", os.cpu_count()))
    tmp = tempfile.mkdtemp(prefix="ort_ops_")
    so = session_options(threads)
    so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmp, "profile")
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = np.ones(shape, np.int64) if "int64" in i.type else rng.standard_normal(shape).astype(np.float32)
    for _ in range(args.warmup + args.runs):
        sess.run(None, feeds)
    events = json.load(open(sess.end_profiling()))
    attrs = node_attrs(so.optimized_model_filepath)

    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) < args.warmup + 1:
        sys.exit(f"{args.model}: the profile has {len(runs)} runs")
    kept = runs[args.warmup:]
    first_ts = kept[0]["ts"]
    times = collections.defaultdict(list)
    info = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < first_ts:
            continue
        name = e["name"][: -len("_kernel_time")]
        a = e.get("args", {})
        times[name].append(e["dur"] / 1e3)
        info[name] = (a.get("op_name", "?"), shapes(a.get("input_type_shape")), shapes(a.get("output_type_shape")))

    forward_ms = statistics.median(r["dur"] / 1e3 for r in kept)
    rows = []
    for name, ts in times.items():
        per_forward = len(ts) / len(kept)
        ms = statistics.median(ts)
        op, ins, outs = info[name]
        rows.append((ms * per_forward, per_forward, ms, op, name, flops(op, ins, outs, attrs.get(name, {})), ins))
    rows.sort(key=lambda r: -r[0])
    nodes_ms = sum(r[0] for r in rows)
    gflop = sum(r[1] * r[5] for r in rows if r[5]) / 1e9
    mult_ms = sum(r[0] for r in rows if r[5])
    print(f"{args.model}: onnxruntime {ort.__version__}, {threads} threads, {len(kept)} runs; per forward {forward_ms:.3f} ms, "
          f"{nodes_ms:.3f} in nodes; {gflop:.3f} GFLOP in {mult_ms:.3f} ms "
          f"({gflop / mult_ms * 1e3:.0f} GFLOP/s" + (f", {100 * gflop / mult_ms * 1e3 / args.peak:.0f}% of peak)" if args.peak else ")"))
    by_op = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for total, per_forward, _, op, _, f, _ in rows:
        by_op[op][0] += total
        by_op[op][1] += per_forward * (f or 0)
        by_op[op][2] += per_forward
    print(f"{'ms/fwd':>8} {'calls':>6} {'GFLOP/s':>8}  op")
    for op, (total, f, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        print(f"{total:8.3f} {n:6.0f} {f / total / 1e6 if f else 0:8.0f}  {op}")
    print(f"{'ms/fwd':>8} {'calls':>5} {'ms/call':>8} {'GFLOP/s':>8} {'%peak':>5}  op, node, input shapes")
    for total, per_forward, ms, op, name, f, ins in rows[: args.top or None]:
        gflops = f / ms / 1e6 if f else None
        pct = f"{100 * gflops / args.peak:5.0f}" if gflops and args.peak else f"{'':5}"
        print(f"{total:8.3f} {per_forward:5.1f} {ms:8.3f} {gflops or 0:8.0f} {pct}  {op}, {name[:40]}, {ins}")


if __name__ == "__main__":
    main()
