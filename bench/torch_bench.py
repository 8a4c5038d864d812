#!/usr/bin/env python3
"""PyTorch eager side of bench/run.sh: the same architectures, batch 1, float32, on this machine.

ConvNeXt-T and ViT-B/16 (DeiT-B's encoder) come from torchvision; where transformers is installed,
its ConvNextForImageClassification, DeiTModel and DetrForObjectDetection are timed too. DETR-ResNet-50 is written out
below in plain PyTorch modules (torchvision's ResNet-50 + a 6+6-layer transformer of width 256,
100 queries) with the compute of transformers' DetrForObjectDetection. DETA-ResNet-50 (transformers 5 has no
DETA class) is bench/torch_deta.py: transformers 4.x's DetaForObjectDetection in plain PyTorch, validated against
the golden cases (`torch_deta.py --check`), with vf_bench's BM_DetaResnet50 config (DetaConfig defaults,
num_labels 91: two-stage, 300 proposals, 6+6 layers); deformable_detr is the same file at Deformable DETR's sizes.
Where transformers is installed, BiT-50, ConvNeXt V2-T, CvT-13, Conditional DETR and Deformable DETR are timed in
its classes too. Prints one JSON line per model: {"name", "ms" (median), "min_ms", "runs"}.
"""
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
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


class GlobalResponseNorm(nn.Module):
    """ConvNeXt V2's GRN on channels-last activations, as transformers' ConvNextV2GlobalResponseNorm computes it."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (x * nx) + self.bias + x


def convnextv2_tiny():
    """ConvNeXt V2-T: torchvision's ConvNeXt-T with GRN after each block's GELU (its layer scale, a multiply by
    ones here, is the one difference in compute)."""
    m = torchvision.models.convnext_tiny()
    for stage in m.features:
        for block in stage:
            if isinstance(block, torchvision.models.convnext.CNBlock):
                layers = list(block.block)  # dwconv, permute, norm, fc1, GELU, fc2, permute
                block.block = nn.Sequential(*layers[:5], GlobalResponseNorm(layers[3].out_features), *layers[5:])
                nn.init.ones_(block.layer_scale)
    return m


class StdConv2d(nn.Conv2d):
    """BiT's weight-standardised convolution, standardising on every forward as transformers does."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-8).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def group_norm_relu(c):
    return nn.Sequential(nn.GroupNorm(32, c), nn.ReLU())


class PreActBottleneck(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        mid = cout // 4
        self.norm1 = group_norm_relu(cin)
        self.downsample = StdConv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        self.conv1 = StdConv2d(cin, mid, 1, bias=False)
        self.norm2 = group_norm_relu(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride, padding=1, bias=False)
        self.norm3 = group_norm_relu(mid)
        self.conv3 = StdConv2d(mid, cout, 1, bias=False)

    def forward(self, x):
        x = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(x)))))
        return x + shortcut


class Bit50(nn.Module):
    """google/bit-50 (BitConfig's defaults: pre-activation bottlenecks, 32 groups, no global padding) in plain
    PyTorch: the compute of transformers' BitForImageClassification."""

    def __init__(self, num_labels=1000):
        super().__init__()
        self.stem = nn.Sequential(StdConv2d(3, 64, 7, 2, padding=3, bias=False), nn.ConstantPad2d(1, 0.0),
                                  nn.MaxPool2d(3, 2))
        layers, cin = [], 64
        for depth, cout, stride in zip([3, 4, 6, 3], [256, 512, 1024, 2048], [1, 2, 2, 2]):
            for i in range(depth):
                layers.append(PreActBottleneck(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.norm = group_norm_relu(2048)
        self.classifier = nn.Linear(2048, num_labels)

    def forward(self, x):
        x = self.norm(self.stages(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


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
    print(json.dumps({"name": name, "ms": statistics.median(times), "min_ms": min(times), "runs": len(times),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)


def main():
    threads = int(os.environ.get("VF_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    which = sys.argv[1:] or ["convnext_tiny", "convnextv2_tiny", "bit_50", "vit_b_16", "detr_resnet50", "deta_resnet50", "deformable_detr", "hf"]
    x224 = torch.randn(1, 3, 224, 224)
    if "convnext_tiny" in which:
        time_model("convnext_tiny", torchvision.models.convnext_tiny(), (x224,), 3.0)
    if "convnextv2_tiny" in which:
        time_model("convnextv2_tiny", convnextv2_tiny(), (x224,), 3.0)
    if "bit_50" in which:
        time_model("bit_50", Bit50(), (x224,), 3.0)
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
    if "deformable_detr" in which:
        import torch_deta

        # Deformable DETR's compute: DETA at DeformableDetrConfig's defaults (one stage, no box refinement,
        # 300 queries, 4 levels, FFN 1024) is the same network (timm's and transformers' ResNet-50 alike).
        x = torch.randn(1, 3, 800, 1066)
        cfg = {"architectures": ["DetaForObjectDetection"], "num_labels": 91, "two_stage": False,
               "with_box_refine": False, "assign_first_stage": False, "num_queries": 300, "num_feature_levels": 4,
               "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024}
        time_model("deformable_detr", torch_deta.build(cfg), (x, torch.ones(1, 800, 1066, dtype=torch.long)), 1.0)
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
        ("hf_bit_50", lambda: tf.BitForImageClassification(tf.BitConfig(num_labels=1000)), (x224,)),
        ("hf_convnextv2_tiny",
         lambda: tf.ConvNextV2ForImageClassification(tf.ConvNextV2Config(num_labels=1000, depths=[3, 3, 9, 3],
                                                                          hidden_sizes=[96, 192, 384, 768])), (x224,)),
        ("hf_cvt_13", lambda: tf.CvtForImageClassification(tf.CvtConfig(num_labels=1000)), (x224,)),
        ("hf_conditional_detr_resnet50",
         lambda: tf.ConditionalDetrForObjectDetection(tf.ConditionalDetrConfig(use_pretrained_backbone=False,
                                                                               num_labels=91)), (x800, mask)),
        ("hf_deformable_detr",
         lambda: tf.DeformableDetrForObjectDetection(tf.DeformableDetrConfig(use_pretrained_backbone=False,
                                                                             num_labels=91)), (x800, mask)),
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
