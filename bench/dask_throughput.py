#!/usr/bin/python3
"""Images/s of visionformers.Pretrained.classify in one process against visionformers.dask.map_images
on a LocalCluster of N worker processes (same images, same batch size; models loaded before timing).

    PYTHONPATH=build/python /usr/bin/python3 bench/dask_throughput.py --model assets/tiny-convnext
"""
import argparse
import os
import time

import visionformers as vf
import visionformers.dask as vfd

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(HERE, "..", "assets", "tiny-convnext"))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    model = os.path.abspath(args.model)
    pictures = [os.path.join(HERE, "..", "assets", "cat.jpg")] + [
        os.path.join(HERE, "..", "tests", "goldens", "images", n) for n in ("camera.png", "chelsea.png", "rocket.jpg")]
    paths = [os.path.abspath(pictures[i % len(pictures)]) for i in range(args.images)]

    p = vf.Pretrained(model)
    p.classify(paths[: args.batch_size])
    t0 = time.perf_counter()
    for i in range(0, len(paths), args.batch_size):
        p.classify(paths[i : i + args.batch_size])
    one = len(paths) / (time.perf_counter() - t0)
    print(f"1 process: {one:.1f} images/s", flush=True)

    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        vfd.map_images(client, model, paths[: 4 * args.batch_size], batch_size=args.batch_size)  # load the models
        t0 = time.perf_counter()
        vfd.map_images(client, model, paths, batch_size=args.batch_size)
        many = len(paths) / (time.perf_counter() - t0)
    print(f"{args.workers} Dask workers: {many:.1f} images/s ({many / one:.2f}x)")


if __name__ == "__main__":
    main()
