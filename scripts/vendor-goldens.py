#!/usr/bin/env python3
"""Copies a small subset of ../shared/goldens into tests/goldens, so the suite runs from a clone.

Per-layer hidden states (`*hidden_states.N`) are dropped from the copies' expected.safetensors to
keep the repository small; every other tensor (inputs, final outputs, losses, post-processing
results) is kept byte for byte. Standard library only.
"""
import json
import re
import shutil
import struct
import sys
from pathlib import Path

CASES = [
    "bit-tiny-bottleneck-same", "convnext-tiny-backbone", "convnextv2-tiny-model", "cvt-tiny-model",
    "deit-tiny-model", "detr-tiny-model", "conditional-detr-tiny-det", "deformable-detr-tiny-det",
    "deta-tiny-model", "postproc-deformable-detr", "postproc-deta", "proc-convnext-nonorm",
    "proc-detr-nopad-norescale",
]
DROP = re.compile(r"(^|_)hidden_states\.\d+$")


def strip_safetensors(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    meta = header.pop("__metadata__", None)
    out_header, chunks, offset = {}, [], 0
    for name, info in header.items():
        if DROP.search(name):
            continue
        begin, end = info["data_offsets"]
        chunks.append(body[begin:end])
        out_header[name] = dict(info, data_offsets=[offset, offset + end - begin])
        offset += end - begin
    if meta is not None:
        out_header["__metadata__"] = meta
    raw = json.dumps(out_header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    shared = root.parent / "shared" / "goldens"
    out = root / "tests" / "goldens"
    if not (shared / "README.md").exists():
        print(f"no goldens at {shared}", file=sys.stderr)
        return 1
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(shared / "README.md", out / "README.md")
    shutil.copytree(shared / "images", out / "images")
    for case in CASES:
        dst = out / case
        dst.mkdir()
        for f in (shared / case).iterdir():
            if f.name == "expected.safetensors":
                strip_safetensors(f, dst / f.name)
            else:
                shutil.copy(f, dst / f.name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"vendored {len(CASES)} cases into {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
