"""Images over a dask.distributed cluster: each worker process loads the model once and runs batches.

    from dask.distributed import Client, LocalCluster

    # Run as __main__, this file's functions would travel to the workers by value, each with its own
    # empty model cache: use the importable module's.
    from visionformers.dask import map_images
    import visionformers.dask as vfd
    client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
    results = vfd.map_images(client, "models/convnext", paths, task="classify", top_k=3)

Command line:
    python3 -m visionformers.dask (--scheduler ADDRESS | --local N) MODEL FOLDER --jsonl OUT
"""
import argparse
import json
import os
import sys
import threading

TASKS = ("classify", "detect", "segment", "run")

# Per worker process: model id -> Pretrained, so that every task after the first reuses the weights.
_models = {}
_models_lock = threading.Lock()


def _model(model):
    with _models_lock:
        m = _models.get(model)
        if m is None:
            from . import Pretrained

            m = _models[model] = Pretrained(model)
        return m


def _run_batch(model, task, paths, kwargs):
    m = _model(model)
    paths = list(paths)
    if not paths:
        return []
    if task == "segment":
        return [m.segment(p, **kwargs) for p in paths]
    if task == "run":
        return [m.run(p) for p in paths]
    return getattr(m, task)(paths, **kwargs)


def map_images(client, model, paths, task="classify", batch_size=8, retries=3, **kwargs):
    """Runs `task` ("classify", "detect", "segment" or "run") on every image of `paths` (a list of
    paths, or a dask.bag of them) and returns the results in the order of `paths`.

    Work goes out in batches of `batch_size` images. A worker that dies takes its batches with it:
    the scheduler runs them again elsewhere, and `retries` more times a batch that raised.
    `kwargs` go to the task (top_k=, threshold=, task= for segmentation ...)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    try:
        import dask.bag as db
    except ImportError:  # dask without its bag extra
        db = None
    if db is not None and isinstance(paths, db.Bag):
        bag = paths.map_partitions(lambda part: _run_batch(model, task, part, kwargs))
        return client.compute(bag, retries=retries).result()
    paths = [os.fspath(p) for p in paths]
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    futures = client.map(
        _run_batch,
        [model] * len(batches),
        [task] * len(batches),
        batches,
        [kwargs] * len(batches),
        retries=retries,
        pure=False,
    )
    out = []
    for batch in client.gather(futures):
        out.extend(batch)
    return out


def _jsonable(result):
    """Segment masks and run() tensors are arrays: the JSON lines carry their shapes only."""
    if isinstance(result, dict):
        return {k: _jsonable(v) for k, v in result.items()}
    if isinstance(result, list):
        return [_jsonable(v) for v in result]
    if hasattr(result, "shape") and hasattr(result, "dtype"):
        return {"shape": list(result.shape), "dtype": str(result.dtype)}
    return result


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m visionformers.dask", description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--scheduler", help="address of a running dask scheduler (tcp://HOST:PORT)")
    where.add_argument("--local", type=int, metavar="N", help="start a LocalCluster of N worker processes")
    ap.add_argument("model", help="model folder or Hub id")
    ap.add_argument("folder", help="folder of images (.jpg, .jpeg, .png; sorted by name)")
    ap.add_argument("--jsonl", required=True, help="output: one JSON object per image, in order")
    ap.add_argument("--task", default="classify", choices=TASKS)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--threshold", type=float)
    args = ap.parse_args(argv)

    from dask.distributed import Client, LocalCluster

    # Run as __main__, this file's functions would travel to the workers by value, each with its own
    # empty model cache: use the importable module's.
    from visionformers.dask import map_images

    paths = sorted(
        os.path.join(args.folder, f) for f in os.listdir(args.folder) if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    kwargs = {}
    if args.task == "classify":
        kwargs["top_k"] = args.top_k
    if args.threshold is not None and args.task in ("detect", "segment"):
        kwargs["threshold"] = args.threshold
    cluster = LocalCluster(n_workers=args.local, threads_per_worker=1, processes=True) if args.local else None
    client = Client(cluster if cluster else args.scheduler)
    try:
        results = map_images(client, args.model, paths, task=args.task, batch_size=args.batch_size, **kwargs)
    finally:
        client.close()
        if cluster:
            cluster.close()
    with open(args.jsonl, "w") as f:
        for path, result in zip(paths, results):
            f.write(json.dumps({"path": path, "result": _jsonable(result)}) + "\n")
    print(f"{len(results)} images -> {args.jsonl}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
