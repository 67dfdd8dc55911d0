"""Write a trained Paddle UNet2DConditionModel in the diffusers (PyTorch) layout.

Output: <out>/config.json + <out>/diffusion_pytorch_model.safetensors (metadata format "pt"),
loadable by diffusers `UNet2DConditionModel.from_pretrained(out)`. Parameter names are the same
in ppdiffusers and diffusers; the only layout change is nn.Linear weights ([in, out] in paddle,
[out, in] in torch), which are transposed (the list is taken from the model's own Linear layers).
No torch import: the file is written by ldm.weights.io.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from ldm.utils import atomic_open
from ldm.weights.io import save_safetensors

__all__ = ["linear_weight_keys", "paddle_to_torch_state", "export_unet_to_diffusers"]


def linear_weight_keys(layer) -> set:
    import paddle.nn as nn

    return {f"{name}.weight" for name, sub in layer.named_sublayers() if isinstance(sub, nn.Linear)}


def paddle_to_torch_state(layer) -> dict:
    """{name: ndarray} in torch orientation (Linear weights transposed)."""
    linear = linear_weight_keys(layer)
    out = {}
    for k, v in layer.state_dict().items():
        arr = v.numpy()
        out[k] = np.ascontiguousarray(arr.T) if k in linear else arr
    if not linear or not any(k in out for k in linear):
        raise ValueError("no Linear weights found: is this a UNet2DConditionModel?")
    return out


def export_unet_to_diffusers(unet, out_dir: str, dtype: Optional[str] = None) -> str:
    """Write `unet` (a ppdiffusers UNet2DConditionModel) to out_dir; returns the weights path."""
    os.makedirs(out_dir, exist_ok=True)
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config["_class_name"] = "UNet2DConditionModel"
    with atomic_open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    path = os.path.join(out_dir, "diffusion_pytorch_model.safetensors")
    save_safetensors(paddle_to_torch_state(unet), path, dtype=dtype, metadata={"format": "pt"})
    return path
