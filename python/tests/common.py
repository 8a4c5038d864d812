"""Paths shared by the Python tests (CTest sets VF_SOURCE_DIR, VF_BINARY and PYTHONPATH)."""
import json
import os
import subprocess

SOURCE_DIR = os.environ.get("VF_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
VF_BINARY = os.environ.get("VF_BINARY", os.path.join(SOURCE_DIR, "build", "vf"))
TINY_CONVNEXT = os.path.join(SOURCE_DIR, "assets", "tiny-convnext")
CAT = os.path.join(SOURCE_DIR, "assets", "cat.jpg")
GOLDENS = os.path.join(SOURCE_DIR, "tests", "goldens")
IMAGES = os.path.join(GOLDENS, "images")
DETECTOR = os.path.join(GOLDENS, "conditional-detr-tiny-det")
PICTURES = [CAT] + [os.path.join(IMAGES, n) for n in ("camera.png", "chelsea.png", "rocket.jpg")]


def vf_json(*args):
    """What `vf ARGS --json` prints, parsed."""
    out = subprocess.run([VF_BINARY, *args, "--json"], check=True, capture_output=True, timeout=300).stdout
    return json.loads(out)


def _synthetic_tensor(name, shape, center, exp):
    """The golden cases' synthetic weights (../shared/goldens/README.md): FNV-1a-64 of the name, then
    splitmix64 of seed + i, the top 24 bits centred, scaled by 2^(exp-23) and added to `center` in float32."""
    import numpy as np

    seed = 0xCBF29CE484222325
    for b in name.encode():
        seed = ((seed ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    n = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    k = (z >> np.uint64(40)).astype(np.int64) - 8388608
    values = np.float32(center) + np.ldexp(k.astype(np.float32), exp - 23).astype(np.float32)
    return values.astype(np.float32).reshape(shape)


def synthetic_model(case_dir, out_dir):
    """A model folder in `out_dir`: the config files of `case_dir` and a model.safetensors written from
    its weights.json (float32, little-endian, as the safetensors format lays it out)."""
    import shutil

    os.makedirs(out_dir, exist_ok=True)
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(os.path.join(case_dir, f), os.path.join(out_dir, f))
    with open(os.path.join(case_dir, "weights.json")) as f:
        specs = json.load(f)
    header, blobs, offset = {}, [], 0
    for s in specs:
        data = _synthetic_tensor(s["name"], s["shape"], s["center"], s["exp"]).astype("<f4").tobytes()
        header[s["name"]] = {"dtype": "F32", "shape": s["shape"], "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return out_dir
