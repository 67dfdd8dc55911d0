"""Opt-in reading of PyTorch pickle weights (`allow_pickle=True` / `--allow_pickle_weights`).

torch.load runs the pickle's code, so nothing calls this by default (ldm.sd.loading refuses such
files); it exists for users who trust a `.bin` file and do not want to convert it first. The
weights are read in memory; nothing is written into the model folder.
"""
from __future__ import annotations

import json
import os

__all__ = ["torch_load_trusted"]


def torch_load_trusted(folder: str, name: str) -> dict:
    """{name: float32/int ndarray} from <folder>/<name> or, when present, its sharded
    <name>.index.json (transformers layout)."""
    import torch

    index = os.path.join(folder, name + ".index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = [os.path.join(folder, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        files = [os.path.join(folder, name)]
    state = {}
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder!r}: no {os.path.basename(path)}")
        sd = torch.load(path, map_location="cpu", weights_only=False)
        state.update({k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items()})
    return state
