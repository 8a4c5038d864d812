#!/usr/bin/env python3
"""PyTorch on the GPU beside vf's CUDA backend (bench/run_gpu.sh): transformers' classes built from their
configs with random weights, batch 1, float32 with TF32 off (the exact mode vf runs), eager. One JSON line per
model: {"name", "ms" (median), "min_ms", "peak_mb"}. The names are vf_bench's benchmarks'.
Usage: torch_gpu_bench.py [NAME...]   (default: all)
"""
import json
import statistics
import sys

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
    ]


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
    want = set(sys.argv[1:])
    dev = torch.device("cuda")
    for name, cls, cfg, h, w, masked in models():
        if want and name not in want:
            continue
        try:
            torch.manual_seed(0)
            model = cls(cfg).eval().to(dev)
            x = torch.randn(1, 3, h, w, device=dev)
            kw = {"pixel_mask": torch.ones(1, h, w, dtype=torch.long, device=dev)} if masked else {}
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                med, mn = time_cuda(lambda: model(pixel_values=x, **kw))
            peak = torch.cuda.max_memory_allocated() / 2**20
            print(json.dumps({"name": name, "ms": med, "min_ms": mn, "peak_mb": round(peak)}), flush=True)
            del model
            torch.cuda.empty_cache()
        except Exception as e:  # a model this transformers cannot build: say so, go on
            print(json.dumps({"name": name, "error": str(e)[:200]}), flush=True)


if __name__ == "__main__":
    main()
