"""The Python module against the `vf` CLI for the same images, its image inputs, and the GIL."""
import threading
import time
import unittest

import numpy as np
from PIL import Image

import visionformers as vf
import os
import tempfile

from common import CAT, DETECTOR, IMAGES, PICTURES, SOURCE_DIR, TINY_CONVNEXT, synthetic_model, vf_json


class ModuleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tiny = vf.Pretrained(TINY_CONVNEXT)

    def assert_same_labels(self, got, want):
        self.assertEqual([d["label"] for d in got], [d["label"] for d in want])
        for g, w in zip(got, want):
            self.assertAlmostEqual(g["score"], w["score"], delta=1e-6)

    def test_classify_matches_cli(self):
        want = vf_json("classify", TINY_CONVNEXT, *PICTURES, "--top-k", "3")
        got = self.tiny.classify(PICTURES, top_k=3)
        self.assertEqual(len(got), len(PICTURES))
        for g, w in zip(got, want):
            self.assertEqual(len(g), 3)
            self.assert_same_labels(g, w)
        # One image in, one list of dicts out (not a list of one list), as the pipeline.
        single = self.tiny.classify(CAT)
        self.assertEqual(len(single), 5)
        self.assert_same_labels(single, vf_json("classify", TINY_CONVNEXT, CAT))

    def test_image_kinds_agree(self):
        path = f"{IMAGES}/camera.png"
        want = self.tiny.classify(path)
        with open(path, "rb") as f:
            data = f.read()
        pil = Image.open(path)
        for kind, image in (("bytes", data), ("numpy", np.asarray(pil.convert("RGB"))), ("PIL", pil)):
            with self.subTest(kind=kind):
                self.assert_same_labels(self.tiny.classify(image), want)
        with self.assertRaises(TypeError):
            self.tiny.classify(3.5)
        with self.assertRaises(ValueError):
            self.tiny.classify(np.zeros((4, 4, 3), dtype=np.float32))
        with self.assertRaises(vf.InputError):
            self.tiny.classify(b"not an image")
        with self.assertRaises(ValueError):
            vf.Pretrained(TINY_CONVNEXT, device="cuda")

    def test_dtype_matches_cli(self):
        # bfloat16 layers: the same answer as `vf classify --dtype bfloat16` (the CLI's own run).
        try:
            bf16 = vf.Pretrained(TINY_CONVNEXT, dtype="bfloat16")
        except ValueError as e:  # a CPU without AVX512-BF16 or AMX: refused, with the reason
            self.assertIn("bfloat16", str(e))
            return
        got = bf16.classify(CAT)
        self.assert_same_labels(got, vf_json("classify", TINY_CONVNEXT, CAT, "--dtype", "bfloat16"))
        # It did compute in bfloat16 (scores moved off float32's), and agrees with float32 on top-1.
        f32 = self.tiny.classify(CAT)
        self.assertEqual(got[0]["label"], f32[0]["label"])
        self.assertGreater(max(abs(g["score"] - w["score"]) for g, w in zip(got, f32)), 1e-6)
        with self.assertRaises(ValueError):
            vf.Pretrained(TINY_CONVNEXT, dtype="int8")

    def test_detect_matches_cli(self):
        det = vf.Pretrained(DETECTOR)
        rocket = f"{IMAGES}/rocket.jpg"
        want = vf_json("detect", DETECTOR, rocket, "--threshold", "0")
        got = det.detect(rocket, threshold=0.0)
        self.assertGreater(len(want), 0)
        self.assertEqual(len(got), len(want))
        for g, w in zip(got, want):
            self.assertEqual(g["label"], w["label"])
            self.assertEqual(g["box"], w["box"])
            self.assertAlmostEqual(g["score"], w["score"], delta=1e-6)

    def test_segment_matches_cli(self):
        # DetrForSegmentation of the detr-tiny-seg case; threshold 0 and a low overlap threshold keep segments.
        with tempfile.TemporaryDirectory() as tmp:
            model = synthetic_model(os.path.join(SOURCE_DIR, "tests", "data", "detr-tiny-seg"), os.path.join(tmp, "m"))
            seg = vf.Pretrained(model)
            image = f"{IMAGES}/chelsea.png"
            for task in ("panoptic", "instance", "semantic"):
                with self.subTest(task=task):
                    out = os.path.join(tmp, f"{task}.png")
                    want = vf_json("segment", model, image, "--task", task, "--threshold", "0",
                                   "--overlap-mask-area-threshold", "0.05", "--out", out)
                    got = seg.segment(image, task=task, threshold=0.0, overlap_mask_area_threshold=0.05)
                    self.assertGreater(len(want), 0)
                    self.assertEqual([g["label"] for g in got], [w["label"] for w in want])
                    for g, w in zip(got, want):
                        if w["score"] is None:
                            self.assertIsNone(g["score"])
                        else:
                            self.assertAlmostEqual(g["score"], w["score"], delta=1e-6)
                        # The CLI's mask PNG (255 inside, 0 outside) is the same mask.
                        mask = np.asarray(Image.open(w["mask"]).convert("L"))
                        self.assertEqual(g["mask"].dtype, np.uint8)
                        np.testing.assert_array_equal(g["mask"], mask)

    def test_run_returns_float32_arrays(self):
        out = self.tiny.run([CAT, f"{IMAGES}/camera.png"])
        logits = out["logits"]
        self.assertEqual(logits.dtype, np.float32)
        self.assertEqual(logits.shape, (2, 5))
        # The pipeline's scores are the softmax of these logits.
        for row, labels in zip(logits, self.tiny.classify([CAT, f"{IMAGES}/camera.png"], top_k=5)):
            p = np.exp(row.astype(np.float64) - row.max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            self.assertEqual([d["label"] for d in labels], [f"label_{i}" for i in order])
            np.testing.assert_allclose([d["score"] for d in labels], p[order], rtol=1e-5)

    def test_gil_released_during_inference(self):
        # A spinning thread notes the longest time it went without running. Were the GIL held
        # through the forward passes, that gap would be the whole call.
        det = vf.Pretrained(DETECTOR)
        images = [f"{IMAGES}/rocket.jpg"] * 8
        self.assertLess(*self.longest_stall_and_call(lambda: det.detect(images)))

    @staticmethod
    def longest_stall_and_call(call):
        stall = 0.0
        stop = False

        def spin():
            nonlocal stall
            last = time.perf_counter()
            while not stop:
                now = time.perf_counter()
                stall = max(stall, now - last)
                last = now

        spinner = threading.Thread(target=spin)
        spinner.start()
        time.sleep(0.05)
        t0 = time.perf_counter()
        call()
        elapsed = time.perf_counter() - t0
        stop = True
        spinner.join()
        return stall, elapsed / 2

    def test_stall_measure_sees_a_held_gil(self):
        # The measure itself: a C loop that keeps the GIL (sum over a range) does stall the spinner.
        stall, half = self.longest_stall_and_call(lambda: sum(range(20_000_000)))
        self.assertGreater(stall, half)

if __name__ == "__main__":
    unittest.main()
