#!/usr/bin/env python3
"""PyTorch eager side of bench/run.sh: the same architectures, batch 1, float32, on this machine.

ConvNeXt-T and ViT-B/16 (DeiT-B's encoder) come from torchvision; where transformers is installed,
its ConvNextForImageClassification, DeiTModel and DetrForObjectDetection are timed too. DETR-ResNet-50 is written out
below in plain PyTorch modules (torchvision's ResNet-50 + a 6+6-layer transformer of width 256,
100 queries) with the compute of transformers' DetrForObjectDetection. DETA-ResNet-50 (transformers 5 has no
DETA class) is bench/torch_deta.py: transformers 4.x's DetaForObjectDetection in plain PyTorch, validated against
the golden cases (`torch_deta.py --check`), with vf_bench's BM_DetaResnet50 config (DetaConfig defaults,
num_labels 91: two-stage, 300 proposals, 6+6 layers). Prints one JSON line per model: {"name", "ms"} (median).
"""
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torchvision


class SineEmbedding(nn.Module):
    def __init__(self, dim=128, temperature=10000):
        super().__init__()
        self.dim, self.temperature = dim, temperature

    def forward(self, mask):
        y = mask.cumsum(1, dtype=torch.float32)
        x = mask.cumsum(2, dtype=torch.float32)
        eps, scale = 1e-6, 2 * math.pi
        y = y / (y[:, -1:, :] + eps) * scale
        x = x / (x[:, :, -1:] + eps) * scale
        t = self.temperature ** (2 * (torch.arange(self.dim, dtype=torch.float32) // 2) / self.dim)
        px, py = x[..., None] / t, y[..., None] / t
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, d=256, heads=8, ffn=2048):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x, pos, key_padding_mask):
        q = x + pos
        x = self.norm1(x + self.attn(q, q, x, key_padding_mask=key_padding_mask)[0])
        return self.norm2(x + self.fc2(torch.relu(self.fc1(x))))


class DecoderLayer(nn.Module):
    def __init__(self, d=256, heads=8, ffn=2048):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x, query_pos, memory, pos, key_padding_mask):
        q = x + query_pos
        x = self.norm1(x + self.self_attn(q, q, x)[0])
        x = self.norm2(x + self.cross_attn(x + query_pos, memory + pos, memory, key_padding_mask=key_padding_mask)[0])
        return self.norm3(x + self.fc2(torch.relu(self.fc1(x))))


class Detr(nn.Module):
    def __init__(self, num_classes=91, d=256, queries=100, layers=6):
        super().__init__()
        r = torchvision.models.resnet50()
        self.backbone = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
        self.proj = nn.Conv2d(2048, d, 1)
        self.pos = SineEmbedding(d // 2)
        self.encoder = nn.ModuleList(EncoderLayer(d) for _ in range(layers))
        self.decoder = nn.ModuleList(DecoderLayer(d) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_pos = nn.Embedding(queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))

    def forward(self, pixel_values, pixel_mask):
        f = self.backbone(pixel_values)
        mask = nn.functional.interpolate(pixel_mask[None].float(), size=f.shape[-2:])[0].bool()
        pos = self.pos(mask).flatten(2).transpose(1, 2)
        x = self.proj(f).flatten(2).transpose(1, 2)
        pad = ~mask.flatten(1)
        for layer in self.encoder:
            x = layer(x, pos, pad)
        qp = self.query_pos.weight[None].expand(x.shape[0], -1, -1)
        h = torch.zeros_like(qp)
        for layer in self.decoder:
            h = layer(h, qp, x, pos, pad)
        h = self.decoder_norm(h)
        return self.class_embed(h), self.bbox(h).sigmoid()


def time_model(name, model, inputs, min_seconds):
    model.eval()
    with torch.inference_mode():
        model(*inputs)  # warm-up
        times = []
        start = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            model(*inputs)
            times.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"name": name, "ms": statistics.median(times), "runs": len(times)}), flush=True)


def main():
    threads = int(os.environ.get("VF_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    which = sys.argv[1:] or ["convnext_tiny", "vit_b_16", "detr_resnet50", "deta_resnet50", "hf"]
    x224 = torch.randn(1, 3, 224, 224)
    if "convnext_tiny" in which:
        time_model("convnext_tiny", torchvision.models.convnext_tiny(), (x224,), 3.0)
    if "vit_b_16" in which:
        time_model("vit_b_16", torchvision.models.vit_b_16(), (x224,), 3.0)
    if "detr_resnet50" in which:
        x = torch.randn(1, 3, 800, 1066)
        time_model("detr_resnet50", Detr(), (x, torch.ones(1, 800, 1066, dtype=torch.long)), 1.0)
    if "deta_resnet50" in which:
        import torch_deta  # bench/, next to this file

        x = torch.randn(1, 3, 800, 1066)
        deta = torch_deta.build({"architectures": ["DetaForObjectDetection"], "num_labels": 91})
        time_model("deta_resnet50", deta, (x, torch.ones(1, 800, 1066, dtype=torch.long)), 1.0)
    hf_models(which)


def hf_models(which):
    """transformers' own classes (random init, no download) where transformers is installed."""
    try:
        import transformers as tf
    except ImportError:
        return
    x224 = torch.randn(1, 3, 224, 224)
    x800 = torch.randn(1, 3, 800, 1066)
    mask = torch.ones(1, 800, 1066, dtype=torch.long)
    cases = [
        ("hf_convnext_tiny", lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(num_labels=1000)), (x224,)),
        ("hf_deit_base", lambda: tf.DeiTModel(tf.DeiTConfig()), (x224,)),
        ("hf_detr_resnet50", lambda: tf.DetrForObjectDetection(tf.DetrConfig(use_pretrained_backbone=False)), (x800, mask)),
    ]
    for name, make, inputs in cases:
        if which and name not in which and "hf" not in which:
            continue
        try:
            time_model(name, make(), inputs, 3.0 if inputs[0].shape[-1] == 224 else 1.0)
        except Exception as e:  # a transformers version without the class, or a missing timm
            print(json.dumps({"name": name, "error": str(e)[:200]}), flush=True)


if __name__ == "__main__":
    main()
