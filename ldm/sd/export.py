"""Write a trained Paddle UNet2DConditionModel in the diffusers (PyTorch) layout.

Output: <out>/config.json + <out>/diffusion_pytorch_model.safetensors (metadata format "pt"),
loadable by diffusers `UNet2DConditionModel.from_pretrained(out)`. Parameter names are the same
in ppdiffusers and diffusers; the only layout change is nn.Linear weights ([in, out] in paddle,
[out, in] in torch), which are transposed (the list is taken from the model's own Linear layers).
No torch import: the file is written by ldm.weights (metadata format "pt", model "sd_unet"),
one tensor at a time.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ldm.utils import atomic_open
from ldm.weights import Op, save_safetensors, weights_metadata

__all__ = ["linear_weight_keys", "torch_layout_plan", "export_unet_to_diffusers"]


def linear_weight_keys(layer) -> set:
    import paddle.nn as nn

    return {f"{name}.weight" for name, sub in layer.named_sublayers() if isinstance(sub, nn.Linear)}


def torch_layout_plan(layer, shapes) -> dict:
    """Plan between `layer`'s Paddle layout and the torch layout, either way (same names, nn.Linear
    weights transposed), for the tensors in `shapes`."""
    linear = linear_weight_keys(layer)
    return {k: Op((k,), "T", tuple(s)[::-1]) if k in linear and len(s) == 2 else Op((k,), "copy", tuple(s))
            for k, s in shapes.items()}


def export_unet_to_diffusers(unet, out_dir: str, dtype: Optional[str] = None) -> str:
    """Write `unet` (a ppdiffusers UNet2DConditionModel) to out_dir; returns the weights path."""
    os.makedirs(out_dir, exist_ok=True)
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config["_class_name"] = "UNet2DConditionModel"
    with atomic_open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    path = os.path.join(out_dir, "diffusion_pytorch_model.safetensors")
    state = unet.state_dict()
    if not linear_weight_keys(unet) & set(state):
        raise ValueError("no Linear weights found: is this a UNet2DConditionModel?")
    plan = torch_layout_plan(unet, {k: tuple(v.shape) for k, v in state.items()})
    save_safetensors(state, path, dtype=dtype, plan=plan, metadata=weights_metadata("sd_unet", layout="torch"))
    return path
