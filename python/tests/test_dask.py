"""visionformers.dask on a LocalCluster of two worker processes: the same results as one process,
in order, the model loaded once per worker, no image lost when a worker dies, and the CLI."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import visionformers as vf
import visionformers.dask as vfd
from common import PICTURES, TINY_CONVNEXT, vf_json
from dask.distributed import Client, LocalCluster


class DaskTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        cls.client = Client(cls.cluster)
        cls.model = vf.Pretrained(TINY_CONVNEXT)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.cluster.close()

    def assert_same(self, got, want):
        self.assertEqual(len(got), len(want))
        for g, w in zip(got, want):
            self.assertEqual([d["label"] for d in g], [d["label"] for d in w])
            for a, b in zip(g, w):
                self.assertAlmostEqual(a["score"], b["score"], delta=1e-6)

    def test_two_workers_match_one_process(self):
        paths = [PICTURES[i % len(PICTURES)] for i in range(10)]
        want = [self.model.classify(p, top_k=3) for p in paths]
        got = vfd.map_images(self.client, TINY_CONVNEXT, paths, task="classify", batch_size=3, top_k=3)
        self.assert_same(got, want)
        # Loaded once per worker process, whatever the number of batches.
        counts = self.client.run(lambda: len(__import__("visionformers.dask").dask._models))
        self.assertEqual(len(counts), 2)
        for n in counts.values():
            self.assertLessEqual(n, 1)

    def test_bag(self):
        import dask.bag as db

        paths = PICTURES * 2
        got = vfd.map_images(self.client, TINY_CONVNEXT, db.from_sequence(paths, npartitions=3), top_k=2)
        self.assert_same(got, [self.model.classify(p, top_k=2) for p in paths])

    def test_killed_worker_loses_no_image(self):
        paths = [PICTURES[i % len(PICTURES)] for i in range(60)]
        want = [self.model.classify(p) for p in paths]
        result = {}

        def work():
            result["got"] = vfd.map_images(self.client, TINY_CONVNEXT, paths, batch_size=1)

        pids = self.client.run(os.getpid)
        runner = threading.Thread(target=work)
        runner.start()
        # Kill a worker while it is running one of our batches.
        victim = None
        deadline = time.time() + 120
        while victim is None and time.time() < deadline and runner.is_alive():
            for worker, keys in self.client.processing().items():
                if keys and worker in pids:
                    victim = pids[worker]
                    break
            time.sleep(0.01)
        self.assertIsNotNone(victim, "no worker was seen processing")
        os.kill(victim, signal.SIGKILL)
        runner.join(timeout=300)
        self.assertFalse(runner.is_alive())
        self.assert_same(result["got"], want)

    def test_command_line(self):
        folder = tempfile.mkdtemp(prefix="vf_dask_")
        try:
            for i, p in enumerate(PICTURES):
                shutil.copy(p, os.path.join(folder, f"{i}{os.path.splitext(p)[1]}"))
            out = os.path.join(folder, "out.jsonl")
            subprocess.run(
                [sys.executable, "-m", "visionformers.dask", "--scheduler", self.cluster.scheduler_address,
                 TINY_CONVNEXT, folder, "--jsonl", out, "--top-k", "2", "--batch-size", "2"],
                check=True, timeout=300)
            with open(out) as f:
                lines = [json.loads(line) for line in f]
            names = sorted(n for n in os.listdir(folder) if not n.endswith(".jsonl"))
            self.assertEqual([os.path.basename(line["path"]) for line in lines], names)
            for line in lines:
                self.assert_same([line["result"]], [vf_json("classify", TINY_CONVNEXT, line["path"], "--top-k", "2")])
        finally:
            shutil.rmtree(folder)


if __name__ == "__main__":
    unittest.main()
