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
