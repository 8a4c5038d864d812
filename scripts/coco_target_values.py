#!/usr/bin/env python3
"""Regenerates the expected COCO targets typed into tests/processors_test.cpp
(ProcDetr.CocoDetectionLabels, ProcDetr.CocoPanopticLabels).

    python3 scripts/coco_target_values.py [--goldens ../shared/goldens] [--numpy]

Default: runs transformers' DETR image processor (the values in the test were produced with
transformers 5.17.0, DetrImageProcessorPil; the 4.37 DetrImageProcessor gives the same numbers) on the
golden images chelsea.png and rocket.jpg with detr-tiny-model's preprocessor_config.json.

--numpy: no transformers needed; recomputes the same targets by following the reference's steps with
numpy and Pillow (prepare_coco_*_annotation, masks_to_boxes, resize_annotation with NEAREST masks,
normalize_annotation, _update_annotation_for_padded_image) in the reference's dtypes. This is how the
typed values were checked on a machine without transformers.

Prints C++ initializer lists to paste into the tests.
"""
import argparse
import json
import os
import tempfile

import numpy as np
from PIL import Image

DETECTION = [
    {"image_id": 10, "annotations": [
        {"bbox": [45.1, 60.0, 135.29999999999998, 75.0], "category_id": 1, "area": 10147.499999999998, "iscrowd": 0},
        {"bbox": [225.5, 30.0, 202.95000000000002, 240.0], "category_id": 3, "area": 48707.99999999999, "iscrowd": 0}]},
    {"image_id": 11, "annotations": [
        {"bbox": [64.0, 85.4, 192.0, 106.75], "category_id": 2, "area": 20496.0, "iscrowd": 0},
        {"bbox": [320.0, 42.7, 288.0, 341.6], "category_id": 3, "area": 98380.79999999999, "iscrowd": 1}]},
]
SEGMENT_IDS = [1, 300, 70000, 12345, 5]
SEGMENT_CATS = [3, 7, 1, 2, 9]
SEGMENT_CROWD = [0, 1, 0, 0, 0]
SEGMENT_AREAS = [1234.5, 50000.25, 55.0, 4321.0, 0.0]


def panoptic_png(h, w):
    """The PNG of tests/processors_test.cpp write_panoptic_png: colours encode segment ids."""
    y, x = np.mgrid[0:h, 0:w]
    ids = np.zeros((h, w), dtype=np.int64)
    ids[((x + 2 * y) % 7 == 0) & (y < 150)] = 12345
    ids[(y >= 10) & (y < 100) & (x >= 20) & (x < 200)] = 1
    ids[y >= 150] = 300
    ids[(y < 5) & (x >= w - 11)] = 70000
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def panoptic_annotations():
    return [{"image_id": 100 + i, "file_name": f"pan{i}.png",
             "segments_info": [{"id": SEGMENT_IDS[k], "category_id": SEGMENT_CATS[k], "iscrowd": SEGMENT_CROWD[k],
                                "area": SEGMENT_AREAS[k]} for k in range(5)]} for i in range(2)]


def size_with_aspect_ratio(h, w, size, max_size):
    """image_transforms.get_size_with_aspect_ratio (Python's round)."""
    mn, mx = float(min(h, w)), float(max(h, w))
    if mx / mn * size > max_size:
        size = int(round(max_size * mn / mx))
    if (h <= w and h == size) or (w <= h and w == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def numpy_targets(sizes, config, annotations, panoptic, masks_dir):
    se, le = config["size"]["shortest_edge"], config["size"]["longest_edge"]
    targets, resized = [], []
    for (h, w), ann in zip(sizes, annotations):
        t = {"image_id": np.asarray([ann["image_id"]], dtype=np.int64)}
        if panoptic:
            png = np.asarray(Image.open(os.path.join(masks_dir, ann["file_name"])), dtype=np.uint32)
            ids = png[:, :, 0] + 256 * png[:, :, 1] + 256 * 256 * png[:, :, 2]
            masks = (ids == np.array([s["id"] for s in ann["segments_info"]])[:, None, None]).astype(np.uint8)
            y = np.arange(h, dtype=np.float32)
            x = np.arange(w, dtype=np.float32)
            y, x = np.meshgrid(y, x, indexing="ij")
            xm = masks * x[None]
            ym = masks * y[None]
            keep = ~masks.astype(bool)
            x_min = np.ma.array(xm, mask=keep).filled(fill_value=1e8).reshape(len(masks), -1).min(-1)
            y_min = np.ma.array(ym, mask=keep).filled(fill_value=1e8).reshape(len(masks), -1).min(-1)
            t["boxes"] = np.stack([x_min, y_min, xm.reshape(len(masks), -1).max(-1), ym.reshape(len(masks), -1).max(-1)], 1)
            t["masks"] = masks
            t["class_labels"] = np.array([s["category_id"] for s in ann["segments_info"]], dtype=np.int64)
            t["iscrowd"] = np.asarray([s["iscrowd"] for s in ann["segments_info"]], dtype=np.int64)
            t["area"] = np.asarray([s["area"] for s in ann["segments_info"]], dtype=np.float32)
        else:
            objs = [o for o in ann["annotations"] if "iscrowd" not in o or o["iscrowd"] == 0]
            boxes = np.asarray([o["bbox"] for o in objs], dtype=np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            boxes[:, 0::2] = boxes[:, 0::2].clip(min=0, max=w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(min=0, max=h)
            keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
            t["class_labels"] = np.asarray([o["category_id"] for o in objs], dtype=np.int64)[keep]
            t["boxes"] = boxes[keep]
            t["area"] = np.asarray([o["area"] for o in objs], dtype=np.float32)[keep]
            t["iscrowd"] = np.asarray([o.get("iscrowd", 0) for o in objs], dtype=np.int64)[keep]
        t["orig_size"] = np.asarray([h, w], dtype=np.int64)
        nh, nw = size_with_aspect_ratio(h, w, se, le)
        rh, rw = float(nh) / float(h), float(nw) / float(w)
        t["boxes"] = t["boxes"] * np.asarray([rw, rh, rw, rh], dtype=np.float32)
        t["area"] = t["area"] * (rw * rh)
        if "masks" in t:
            r = [np.asarray(Image.fromarray(m).resize((nw, nh), resample=Image.NEAREST)) for m in t["masks"]]
            t["masks"] = np.array(r).astype(np.float32) > 0.5
        t["size"] = np.asarray([nh, nw], dtype=np.int64)
        b = t["boxes"]
        center = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
        t["boxes"] = center / np.asarray([nw, nh, nw, nh], dtype=np.float32)
        targets.append(t)
        resized.append((nh, nw))
    ph, pw = max(s[0] for s in resized), max(s[1] for s in resized)
    for t, (nh, nw) in zip(targets, resized):
        t["size"] = np.asarray([ph, pw], dtype=np.int64)
        if "masks" in t:
            t["masks"] = np.pad(t["masks"], ((0, 0), (0, ph - nh), (0, pw - nw)))
        t["boxes"] *= np.asarray([nw / pw, nh / ph, nw / pw, nh / ph])
    return targets


def transformers_targets(images, config, annotations, panoptic, masks_dir):
    import transformers

    cls = getattr(transformers, "DetrImageProcessorPil", None) or transformers.DetrImageProcessor
    cfg = dict(config)
    if panoptic:
        cfg["format"] = "coco_panoptic"
    processor = cls(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
    kwargs = {"masks_path": masks_dir} if panoptic else {}
    out = processor(images=images, annotations=annotations, return_tensors="np", **kwargs)
    return [{k: np.asarray(v) for k, v in t.items()} for t in out["labels"]]


def show(targets, panoptic):
    for i, t in enumerate(targets):
        print(f"image {i}:")
        for k in ("size", "image_id", "class_labels", "iscrowd", "orig_size"):
            print(f"  {k}: {t[k].tolist()}")
        print("  boxes:", ", ".join(repr(float(v)) for v in t["boxes"].astype(np.float32).ravel()))
        print("  area:", ", ".join(repr(float(v)) for v in t["area"].astype(np.float32).ravel()))
        if panoptic:
            m = t["masks"].astype(np.int64).reshape(len(t["masks"]), -1)
            p = np.arange(m.shape[1]) % 1009
            print("  mask_sums:", m.sum(1).tolist(), "mask_weighted:", (m * p).sum(1).tolist())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--goldens", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "goldens"))
    ap.add_argument("--numpy", action="store_true", help="follow the reference's steps with numpy/Pillow")
    args = ap.parse_args()
    config = json.load(open(os.path.join(args.goldens, "detr-tiny-model", "preprocessor_config.json")))
    images = [Image.open(os.path.join(args.goldens, "images", n)).convert("RGB") for n in ("chelsea.png", "rocket.jpg")]
    sizes = [(im.height, im.width) for im in images]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (h, w) in enumerate(sizes):
            panoptic_png(h, w).save(os.path.join(tmp, f"pan{i}.png"))
        for panoptic, annotations in ((False, DETECTION), (True, panoptic_annotations())):
            print("== coco_panoptic" if panoptic else "== coco_detection")
            if args.numpy:
                targets = numpy_targets(sizes, config, annotations, panoptic, tmp)
            else:
                targets = transformers_targets(images, config, annotations, panoptic, tmp)
            show(targets, panoptic)


if __name__ == "__main__":
    main()
