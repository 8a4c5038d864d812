#!/usr/bin/env python3
"""ONNX Runtime side of bench/run.sh: ONNX exports of vf_bench's architectures, timed at batch 1, float32.

  ort_bench.py export [--out DIR] [NAME...]   writes DIR/NAME.onnx and DIR/manifest.json (default DIR: .bench/onnx)
  ort_bench.py time [--dir DIR] [NAME...]     times them with onnxruntime (Python), VF_THREADS intra-op threads;
                                              one JSON line per model: {"name", "ms" (min), "median_ms", "runs"}

NAME is a vf_bench name (BM_ConvNextTiny, ...). An export comes from transformers' own class where transformers is
installed (the device machine), otherwise from a plain-PyTorch model of the same compute: torchvision's
convnext_tiny / vit_b_16, bench/torch_bench.py's BiT-50, ConvNeXt V2-T and DETR-R50, bench/torch_deta.py's DETA-R50 (and Deformable DETR:
torch_deta.py at SenseTime/deformable-detr's sizes, one stage, no box refinement, which is Deformable DETR's
compute). The manifest says which source each export came from; a model neither can make is left out, saying why.
bench/ort_bench.mjs times the same files with npm's onnxruntime-node where onnxruntime's Python package is missing.
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(HERE, "..", ".bench", "onnx")
IMAGE = {"small": (224, 224), "detr": (800, 1066)}
# name -> (input size, the transformers class and config it exports where transformers is installed)
MODELS = {
    "BM_ConvNextTiny": ("small", "ConvNextForImageClassification", "ConvNextConfig", {"num_labels": 1000}),
    "BM_DeiTBase": ("small", "DeiTModel", "DeiTConfig", {}),
    "BM_Bit50": ("small", "BitForImageClassification", "BitConfig", {"num_labels": 1000}),
    "BM_ConvNextV2Tiny": ("small", "ConvNextV2ForImageClassification", "ConvNextV2Config",
                          {"num_labels": 1000, "depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768]}),
    "BM_Cvt13": ("small", "CvtForImageClassification", "CvtConfig", {"num_labels": 1000}),
    "BM_DetrResnet50": ("detr", "DetrForObjectDetection", "DetrConfig",
                        {"num_labels": 91, "use_pretrained_backbone": False}),
    "BM_ConditionalDetrResnet50": ("detr", "ConditionalDetrForObjectDetection", "ConditionalDetrConfig",
                                   {"num_labels": 91, "use_pretrained_backbone": False}),
    "BM_DeformableDetr": ("detr", "DeformableDetrForObjectDetection", "DeformableDetrConfig",
                          {"num_labels": 91, "use_pretrained_backbone": False}),
    "BM_DetaResnet50": ("detr", None, None, {}),  # transformers 5 has no DETA: torch_deta.py everywhere
}
# torch_deta.py's config for Deformable DETR's compute (DeformableDetrConfig's defaults).
DEFORMABLE_AS_DETA = {"num_labels": 91, "two_stage": False, "with_box_refine": False, "assign_first_stage": False,
                      "num_queries": 300, "num_feature_levels": 4, "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024}


def plain_torch_model(name):
    """(module, source) for the models a plain-PyTorch build covers, else (None, reason)."""
    import torch
    import torchvision

    sys.path.insert(0, HERE)
    if name == "BM_ConvNextTiny":
        return torchvision.models.convnext_tiny(), "torchvision convnext_tiny"
    if name in ("BM_Bit50", "BM_ConvNextV2Tiny"):
        import torch_bench
        if name == "BM_Bit50":
            return torch_bench.Bit50(), "bench/torch_bench.py Bit50"
        return torch_bench.convnextv2_tiny(), "bench/torch_bench.py convnextv2_tiny (torchvision's + GRN)"
    if name == "BM_DeiTBase":
        return torchvision.models.vit_b_16(), "torchvision vit_b_16 (DeiT-B/16's encoder)"
    if name == "BM_DetrResnet50":
        import torch_bench
        return torch_bench.Detr(), "bench/torch_bench.py Detr"
    if name in ("BM_DetaResnet50", "BM_DeformableDetr"):
        import torch_deta
        if name == "BM_DetaResnet50":
            cfg, source = {"num_labels": 91}, "bench/torch_deta.py (DetaConfig defaults)"
        else:
            cfg, source = DEFORMABLE_AS_DETA, "bench/torch_deta.py at Deformable DETR's sizes"
        deta = torch_deta.build(dict(cfg, architectures=["DetaForObjectDetection"]))

        class Heads(torch.nn.Module):  # the dict of outputs -> the two the pipeline reads
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, pixel_values, pixel_mask):
                out = self.m(pixel_values, pixel_mask)
                return out["logits"], out["pred_boxes"]
        return Heads(deta), source
    return None, "no plain-PyTorch model of it here (install transformers, as on the device machine)"


def transformers_model(name):
    import torch
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    _, cls, cfg_cls, kwargs = MODELS[name]
    if cls is None or not hasattr(transformers, cls):
        return None, f"transformers {transformers.__version__} has no {cls or 'DETA'}"
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kwargs))

    class Outputs(torch.nn.Module):  # ModelOutput -> a tuple ONNX can name
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values, pixel_mask=None):
            kw = {} if pixel_mask is None else {"pixel_mask": pixel_mask}
            out = self.m(pixel_values=pixel_values, **kw)
            if hasattr(out, "pred_boxes"):
                return out.logits, out.pred_boxes
            return out.logits if hasattr(out, "logits") else out.last_hidden_state
    return Outputs(model), f"transformers {transformers.__version__} {cls}"


def export_one(model, args, input_names, path):
    import torch

    model.eval()
    # Gradients stay on: without them nn.MultiheadAttention takes its fused fast path, which has no ONNX export
    # (aten::_native_multi_head_attention).
    with torch.enable_grad():
        try:  # the TorchScript exporter; torch >= 2.9 defaults to the dynamo one, which needs onnxscript
            torch.onnx.export(model, args, path, input_names=input_names, opset_version=17, dynamo=False)
        except TypeError:  # torch < 2.1 has no dynamo argument
            torch.onnx.export(model, args, path, input_names=input_names, opset_version=17)


def export(names, out_dir):
    import torch

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
    torch.manual_seed(0)
    for name in names:
        size = IMAGE[MODELS[name][0]]
        x = torch.randn(1, 3, *size)
        args, input_names = (x,), ["pixel_values"]
        if MODELS[name][0] == "detr":
            args, input_names = (x, torch.ones(1, *size, dtype=torch.long)), ["pixel_values", "pixel_mask"]
        path = os.path.join(out_dir, name + ".onnx")
        manifest.pop(name, None)
        # transformers' class first; where it is missing or does not export, the plain-PyTorch model
        for make in (transformers_model, plain_torch_model):
            t0 = time.time()
            model, source = make(name)
            if model is None:
                print(json.dumps({"name": name, "skipped": source}), flush=True)
                continue
            try:
                export_one(model, args, input_names, path)
            except Exception as e:
                print(json.dumps({"name": name, "source": source, "error": f"export failed: {str(e)[:300]}"}),
                      flush=True)
                continue
            manifest[name] = {"source": source, "inputs": {n: list(a.shape) for n, a in zip(input_names, args)},
                              "dtypes": {n: ("int64" if a.dtype == torch.long else "float32")
                                         for n, a in zip(input_names, args)}}
            json.dump(manifest, open(manifest_path, "w"), indent=1)  # after each: a later failure keeps the rest
            print(json.dumps({"name": name, "source": source, "export_s": round(time.time() - t0, 1)}), flush=True)
            break
    json.dump(manifest, open(manifest_path, "w"), indent=1)


def session_options(threads):
    """How every export is timed: `threads` intra-op threads, one sequential inter-op, all graph optimisations
    (bench/profile/ort_ops.py profiles with the same)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def time_onnx(names, onnx_dir, min_seconds):
    import numpy as np
    import onnxruntime as ort

    threads = int(os.environ.get("VF_THREADS", os.cpu_count()))
    manifest = json.load(open(os.path.join(onnx_dir, "manifest.json")))
    for name in names:
        if name not in manifest:
            continue
        m = manifest[name]
        sess = ort.InferenceSession(os.path.join(onnx_dir, name + ".onnx"), session_options(threads),
                                    providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {n: (np.ones(s, np.int64) if m["dtypes"][n] == "int64" else rng.standard_normal(s, np.float32))
                 for n, s in m["inputs"].items()}
        sess.run(None, feeds)  # warm-up
        times, start = [], time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t0) * 1000)
        print(json.dumps({"name": name, "ms": min(times), "median_ms": statistics.median(times), "runs": len(times),
                          "threads": threads, "runtime": f"onnxruntime {ort.__version__} (Python)",
                          "source": m["source"]}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["export", "time"])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--dir", "--out", dest="dir", default=DEFAULT_DIR)
    ap.add_argument("--min-seconds", type=float, default=float(os.environ.get("VF_BENCH_MIN_SECONDS", 3)))
    a = ap.parse_intermixed_args()  # names before or after --dir
    names = a.names or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown}; known: {list(MODELS)}")
    if a.command == "export":
        export(names, a.dir)
    else:
        time_onnx(names, a.dir, a.min_seconds)


if __name__ == "__main__":
    main()
