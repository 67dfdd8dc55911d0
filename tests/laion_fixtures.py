"""Tiny LAION-format data built in tmp_path for the data tests (no downloads)."""
from __future__ import annotations

import base64
import gzip
import io
import os

import numpy as np
from PIL import Image


def image_bytes(width: int = 12, height: int = 10, fmt: str = "JPEG", seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def record(caption, data: bytes) -> bytes:
    """One part-file line; `caption` may be str (UTF-8) or raw bytes."""
    cap = caption if isinstance(caption, bytes) else caption.encode("utf-8")
    return cap + b"\tNONE\t" + base64.b64encode(data) + b"\n"


def write_part(path, lines: list[bytes], gzipped: bool = False) -> str:
    path = str(path)
    payload = b"".join(lines)
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gzipped else payload)
    return path


def write_filelist(path, entries: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{e}\n" for e in entries))
    return str(path)


def make_parts(folder, sizes: list[int], gzipped: bool = True, img_side: int = 8) -> list[str]:
    """Part files part-{i}; record j of file i has caption f"f{i}-r{j}"."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, n in enumerate(sizes):
        lines = [record(f"f{i}-r{j}", image_bytes(img_side, img_side, "PNG", seed=100 * i + j)) for j in range(n)]
        paths.append(write_part(os.path.join(folder, f"part-{i:05d}"), lines, gzipped=gzipped))
    return paths
