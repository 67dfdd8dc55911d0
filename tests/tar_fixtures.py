"""Tiny webdataset / img2dataset tar shards built in tmp_path for the data tests (no downloads).

`write_shard` uses webdataset's own writer (`webdataset.TarWriter`, encoder off: the values are
the files' bytes); `write_shard_by_hand` writes the members with the standard library's tarfile
(so a test can place any member, e.g. a key without caption); `truncate` cuts a shard in the
middle of a member's data.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

from laion_fixtures import image_bytes


def sample(key: str, caption=None, image: bytes = None, ext: str = "jpg", as_json: bool = False, seed: int = 0) -> dict:
    """A webdataset sample dict: {"__key__", ext: image, "txt" or "json": caption}."""
    out = {"__key__": key}
    out[ext] = image if image is not None else image_bytes(8, 8, "PNG" if ext == "png" else "JPEG", seed=seed)
    if caption is not None:
        if as_json:
            out["json"] = json.dumps({"caption": caption, "url": f"http://example.com/{key}"}).encode()
        else:
            out["txt"] = caption.encode("utf-8") if isinstance(caption, str) else caption
    return out


def write_shard(path, samples: list) -> str:
    import webdataset as wds

    path = str(path)
    with wds.TarWriter(path, encoder=False) as w:
        for s in samples:
            w.write(s)
    return path


def write_shard_by_hand(path, members: list, gz: bool = False) -> str:
    """members: [(name, bytes)] in archive order."""
    path = str(path)
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


def members_of(samples: list) -> list:
    """[(name, bytes)] of webdataset sample dicts (the order TarWriter writes them: sorted extensions)."""
    out = []
    for s in samples:
        out += [(f"{s['__key__']}.{k}", v) for k, v in sorted(s.items()) if k != "__key__"]
    return out


def truncate(path, keep_bytes: int) -> str:
    with open(path, "r+b") as f:
        f.truncate(keep_bytes)
    return str(path)


def good_shards(folder, sizes: list, prefix: str = "shard") -> tuple:
    """Shards {prefix}-{i:05d}.tar (webdataset's writer); sample j of shard i has caption f"s{i}-k{j}".
    Returns (paths, captions in shard order)."""
    os.makedirs(folder, exist_ok=True)
    paths, captions = [], []
    for i, n in enumerate(sizes):
        samples = [sample(f"{i:05d}{j:04d}", f"s{i}-k{j}", seed=1000 * i + j) for j in range(n)]
        captions += [f"s{i}-k{j}" for j in range(n)]
        paths.append(write_shard(os.path.join(folder, f"{prefix}-{i:05d}.tar"), samples))
    return paths, captions
