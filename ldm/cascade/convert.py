"""Converting Stable Cascade weights to this project's Paddle safetensors (and back to torch layouts).

- `convert_unet_weights`: Stage B / C from the original, diffusers or paddle layout (files, shards,
  folders, the seed .pdparams) -> our layout, streaming tensor by tensor (peak ~ largest tensor).
- `export_unet_weights`: a Stage B / C network -> the original or diffusers torch layout.
- `convert_stage_a` / `convert_vqgan_dir` / `convert_effnet` / `convert_previewer`: the original
  torch safetensors (or diffusers' vqgan/ folder) -> our layout.
Every output carries the metadata schema of ldm.weights (model name and config), so the loaders
of ldm.cascade.loading rebuild the network from the file alone. Any missing, unexpected or
mis-shaped key is one WeightsError listing them, raised before anything is written.
"""
from __future__ import annotations

import json
import os

import numpy as np
import paddle

from ldm.utils import get_logger
from ldm.weights import WeightSource, WeightsError, check_storage_dtype, key_table, save_safetensors, weights_metadata

from .effnet import EfficientNetEncoder
from .keys import effnet_config_from_shapes, previewer_config_from_shapes, stage_a_config_from_shapes
from .loading import (
    STAGE_NETWORKS, expected_shapes, model_name, plan_for, resolve_config, resolve_layout, resolve_stage,
)
from .previewer import Previewer
from .stage_a import SCALE_FACTOR_DIFFUSERS, SCALE_FACTOR_ORIGINAL, StageA

__all__ = ["convert_unet_weights", "export_unet_weights", "convert_torch_safetensors", "convert_stage_a",
           "convert_vqgan_dir", "convert_effnet", "convert_previewer"]

logger = get_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Stage B / Stage C
# ---------------------------------------------------------------------------------------------
def convert_unet_weights(inputs, output, stage=None, preset=None, dtype="float32", source_format="auto") -> dict:
    """Convert Stage B/C weights (original, diffusers or paddle layout) to our safetensors,
    streaming tensor by tensor. Returns a summary dict."""
    check_storage_dtype(dtype)
    with WeightSource(inputs) as source:
        stage = resolve_stage(source, stage)
        model = f"stage_{stage}"
        layout = resolve_layout(source, stage, source_format)
        plan = plan_for(source, stage, layout)
        cfg = resolve_config(source, stage, preset, plan)
        expected = expected_shapes(STAGE_NETWORKS[stage][0], cfg)
        save_safetensors(source, output, dtype=dtype, plan=plan, expected=expected, where=source.description,
                         metadata=weights_metadata(model, cfg, source_layout=layout), finite=True)
    return {"output": os.fspath(output), "stage": stage, "source_layout": layout, "tensors": len(expected),
            "parameters": int(sum(int(np.prod(s, dtype=np.int64)) for s in expected.values())), "dtype": dtype}


def export_unet_weights(model, stage: str, layout: str, output, dtype=None) -> None:
    """Write a Stage B / C network's weights in the original or diffusers torch layout (for round
    trips and for use with the torch code)."""
    name = model_name(model)
    if name != f"stage_{stage}":
        raise ValueError(f"export_unet_weights: the network is {name}, not Stage {stage.upper()}")
    state = model.state_dict()
    plan = key_table(name).export_plan({k: tuple(v.shape) for k, v in state.items()}, layout)
    save_safetensors(state, output, dtype=dtype, plan=plan,
                     metadata=weights_metadata(name, model.config, layout="paddle" if layout == "paddle" else "torch"))


# ---------------------------------------------------------------------------------------------
# Stage A, EfficientNet encoder, Previewer (torch safetensors -> ours)
# ---------------------------------------------------------------------------------------------
_NETWORKS = {"stage_a": (StageA, stage_a_config_from_shapes), "effnet": (EfficientNetEncoder, effnet_config_from_shapes),
             "previewer": (Previewer, previewer_config_from_shapes)}


def convert_torch_safetensors(src, dst, kind: str, layout: str = "original", dtype: str | None = None,
                              config: dict | None = None) -> dict:
    """Convert one torch `.safetensors` of `kind` ("stage_a", "effnet", "previewer") in `layout`
    ("original", or "diffusers" for Stage A) into our layout with the model config in its
    metadata; `config` overrides what the shapes say. Returns the config (a dict)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if kind not in _NETWORKS:
        raise ValueError(f"kind must be one of {sorted(_NETWORKS)}, got {kind!r}")
    if not src.endswith(".safetensors"):
        raise WeightsError(f"{src}: torch weights must be a .safetensors file (pickled .pt/.ckpt is not read)")
    cls, infer = _NETWORKS[kind]
    with WeightSource(src) as source:
        plan = key_table(kind).plan(source.shapes(), layout)
        try:
            sizes = infer({k: op.shape for k, op in plan.items()})
            with paddle.LazyGuard():
                net = cls(dict(sizes, **(config or {}))) if sizes is not None else cls(**(config or {}))
        except ValueError as e:
            raise WeightsError(f"{src}: {e}") from e
        cfg, expected = net.config, {k: tuple(v.shape) for k, v in net.state_dict().items()}
        save_safetensors(source, dst, dtype=dtype or "float32", plan=plan, expected=expected, where=src,
                         metadata=weights_metadata(kind, cfg, source=os.path.basename(src)), finite=True)
    logger.info("converted %s (%d tensors) -> %s", src, len(plan), dst)
    return cfg.to_dict()


def convert_stage_a(src, dst, dtype=None, scale_factor=None):
    """Original `stage_a.safetensors` -> Paddle StageA (scale_factor 0.43 unless given)."""
    sf = SCALE_FACTOR_ORIGINAL if scale_factor is None else float(scale_factor)
    return convert_torch_safetensors(src, dst, "stage_a", "original", dtype, {"scale_factor": sf})


def convert_vqgan_dir(vqgan_dir, dst, dtype=None, scale_factor=None):
    """diffusers `vqgan/` folder (PaellaVQModel: config.json + diffusion_pytorch_model.safetensors)
    -> Paddle StageA. The latent scale comes from config.json (0.3764 when absent) unless given."""
    vqgan_dir = os.fspath(vqgan_dir)
    cfg_path = os.path.join(vqgan_dir, "config.json")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    for key, want in (("in_channels", 3), ("out_channels", 3), ("up_down_scale_factor", 2)):
        if cfg.get(key, want) != want:
            raise WeightsError(f"{cfg_path}: {key}={cfg[key]} is not supported (StageA has {key}={want})")
    src = os.path.join(vqgan_dir, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(src):
        raise WeightsError(f"{vqgan_dir}: no diffusion_pytorch_model.safetensors (only safetensors is read)")
    sf = float(cfg.get("scale_factor", SCALE_FACTOR_DIFFUSERS)) if scale_factor is None else float(scale_factor)
    out = convert_torch_safetensors(src, dst, "stage_a", "diffusers", dtype, {"scale_factor": sf})
    for ours, theirs in (("levels", "levels"), ("bottleneck_blocks", "bottleneck_blocks"), ("c_hidden", "embed_dim"),
                         ("c_latent", "latent_channels"), ("codebook_size", "num_vq_embeddings")):
        if theirs in cfg and int(cfg[theirs]) != out[ours]:
            raise WeightsError(f"{cfg_path}: {theirs}={cfg[theirs]} disagrees with the weights ({ours}={out[ours]})")
    return out


def convert_effnet(src, dst, dtype=None):
    return convert_torch_safetensors(src, dst, "effnet", "original", dtype)


def convert_previewer(src, dst, dtype=None):
    return convert_torch_safetensors(src, dst, "previewer", "original", dtype)

