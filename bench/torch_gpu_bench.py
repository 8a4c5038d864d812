#!/usr/bin/env python3
"""PyTorch on the GPU beside vf's CUDA backend (bench/run_gpu.sh): transformers' classes built from their
configs with random weights (DETA, which transformers 5 dropped: bench/torch_deta.py's plain-PyTorch model). One JSON line per model:
{"name", "mode", "batch", "ms" (median per forward), "min_ms", "images_per_s", "peak_mb"}; the names are
vf_bench's benchmarks'. peak_mb is torch.cuda.max_memory_allocated over warm-up and timing (weights included).

Modes:
  eager     float32 with TF32 off (the exact mode vf runs), eager; batch 1 by default
  compile   the same through torch.compile(mode="reduce-overhead") (CUDA graphs)
  autocast  torch.autocast("cuda", dtype=torch.bfloat16) (or --dtype float16; float32: none), eager
Usage: torch_gpu_bench.py [--mode eager|compile|autocast] [--batch N] [--dtype bfloat16|float16] [NAME...]
(default: eager, batch 1, all models). NAME=N sets that model's batch (BM_DeiTBase=32).
"""
import argparse
import json
import statistics

import torch
import transformers as hf

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def models():
    # (vf benchmark name, transformers class, config, input height, width, with pixel_mask)
    return [
        ("BM_ConvNextTiny", hf.ConvNextForImageClassification, hf.ConvNextConfig(num_labels=1000), 224, 224, False),
        ("BM_DeiTBase", hf.DeiTModel, hf.DeiTConfig(), 224, 224, False),
        ("BM_Bit50", hf.BitForImageClassification, hf.BitConfig(layer_type="preactivation", num_labels=1000,
                                                                  global_padding="SAME", embedding_dynamic_padding=True),
         224, 224, False),
        ("BM_ConvNextV2Tiny", hf.ConvNextV2ForImageClassification, hf.ConvNextV2Config(num_labels=1000), 224, 224, False),
        ("BM_Cvt13", hf.CvtForImageClassification, hf.CvtConfig(num_labels=1000), 224, 224, False),
        ("BM_DetrResnet50", hf.DetrForObjectDetection, hf.DetrConfig(num_labels=91, use_pretrained_backbone=False),
         800, 1066, True),
        ("BM_ConditionalDetrResnet50", hf.ConditionalDetrForObjectDetection,
         hf.ConditionalDetrConfig(num_labels=91, use_pretrained_backbone=False), 800, 1066, True),
        ("BM_DeformableDetr", hf.DeformableDetrForObjectDetection,
         hf.DeformableDetrConfig(num_labels=91, use_pretrained_backbone=False), 800, 1066, True),
        # transformers 5 has no DETA: bench/torch_deta.py, its 4.x compute in plain PyTorch (the same config as
        # vf_bench's BM_DetaResnet50; the name says which was timed).
        ("BM_DetaResnet50", plain_deta,
         {"architectures": ["DetaForObjectDetection"], "num_labels": 91}, 800, 1066, True),
    ]


def plain_deta(config):
    import torch_deta  # bench/, next to this file
    return torch_deta.build(config)


def time_cuda(fn, warmup=3, runs=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["eager", "compile", "autocast"], default="eager")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    want = {}
    for n in args.names:
        name, _, b = n.partition("=")
        want[name] = int(b) if b else args.batch
    dev = torch.device("cuda")
    for name, cls, cfg, h, w, masked in models():
        if want and name not in want:
            continue
        batch = want.get(name, args.batch)
        try:
            torch.manual_seed(0)
            model = cls(cfg).eval().to(dev)
            x = torch.randn(batch, 3, h, w, device=dev)
            kw = {"pixel_mask": torch.ones(batch, h, w, dtype=torch.long, device=dev)} if masked else {}
            torch.cuda.reset_peak_memory_stats()
            if args.mode == "compile":
                run = torch.compile(model, mode="reduce-overhead")
                warmup = 10  # compilation, then CUDA graph recording
            else:
                run, warmup = model, 3
            if args.mode == "autocast" and args.dtype != "float32":
                dt = getattr(torch, args.dtype)

                def fn():
                    with torch.autocast("cuda", dtype=dt):
                        return run(pixel_values=x, **kw)
            else:
                def fn():
                    return run(pixel_values=x, **kw)
            with torch.inference_mode():
                med, mn = time_cuda(fn, warmup=warmup)
            peak = torch.cuda.max_memory_allocated() / 2**20
            mode = f"autocast {args.dtype}" if args.mode == "autocast" else args.mode
            print(json.dumps({"name": name, "mode": mode, "batch": batch, "model": type(model).__module__, "ms": med, "min_ms": mn,
                              "images_per_s": batch * 1000.0 / med, "peak_mb": round(peak)}), flush=True)
            del model, run
            torch.cuda.empty_cache()
            if args.mode == "compile":
                torch._dynamo.reset()
        except Exception as e:  # a model this transformers cannot build or compile: say so, go on
            print(json.dumps({"name": name, "mode": args.mode, "batch": batch, "error": str(e)[:200]}), flush=True)


if __name__ == "__main__":
    main()
