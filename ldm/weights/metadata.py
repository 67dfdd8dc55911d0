"""The one metadata schema of the weight files this project writes, and the reading of older tags.

Every safetensors file written here carries (all values strings, as safetensors requires):

    format  "np"   Paddle layout (Linear weights [in, out]). The value paddlenlp and ppdiffusers
                   write and read for Paddle-layout safetensors, so CLIP and SD folders stay
                   loadable by their `from_pretrained`. "pt" marks a torch-layout file (the
                   diffusers export).
    model   what the tensors are: "stage_c", "stage_b", "stage_a", "effnet", "previewer",
            "clip_text", "clip_vision", "sd_unet" (the names key tables are registered under).
    config  JSON of the network's constructor arguments (a config dataclass's `to_dict()`), so
            the file rebuilds its network with no other input. Folder formats whose config.json
            sits next to the weights (CLIP, SD UNet) may leave it out.
    (extra keys are provenance only, e.g. "source", "source_layout")

Older files (every tag the code wrote before this schema) are read as:
    "ldm-cascade-paddle" + "stage" b|c   -> Paddle layout, model "stage_b" / "stage_c"
    "np" / "pd" (+ optional "model")     -> Paddle layout
    "pt"                                 -> torch layout
    no metadata / no format              -> layout unknown (torch releases carry none; the
                                            model's key table decides, or the caller)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .dtypes import WeightsError

__all__ = ["FORMAT", "TORCH_FORMAT", "PADDLE_FORMATS", "WeightsInfo", "weights_metadata", "read_info"]

FORMAT = "np"
TORCH_FORMAT = "pt"
LEGACY_CASCADE_FORMAT = "ldm-cascade-paddle"
PADDLE_FORMATS = (FORMAT, "pd", LEGACY_CASCADE_FORMAT)


@dataclass(frozen=True)
class WeightsInfo:
    """What a file's metadata says: layout "paddle" / "torch" / None (unknown), the model name,
    the network config as a plain dict (None when absent) and the raw format tag."""

    layout: Optional[str] = None
    model: Optional[str] = None
    config: Optional[dict] = None
    format: Optional[str] = None


def _config_dict(config) -> Optional[dict]:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a config dataclass or a mapping, got {type(config).__name__}")


def weights_metadata(model: str, config: Any = None, layout: str = "paddle", **extra) -> dict[str, str]:
    """The metadata of a file this project writes (see the module docstring)."""
    if not model or not isinstance(model, str):
        raise ValueError(f"model must be a non-empty name, got {model!r}")
    if layout not in ("paddle", "torch"):
        raise ValueError(f"layout must be 'paddle' or 'torch', got {layout!r}")
    meta = {"format": FORMAT if layout == "paddle" else TORCH_FORMAT, "model": model}
    cfg = _config_dict(config)
    if cfg is not None:
        meta["config"] = json.dumps(cfg)
    for k, v in extra.items():
        if k in meta:
            raise ValueError(f"metadata key {k!r} is part of the schema")
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def read_info(metadata: Mapping[str, str] | None, where: str = "weights") -> WeightsInfo:
    """Parse the metadata of a file written by this project now or before (see the docstring)."""
    meta = dict(metadata or {})
    fmt = meta.get("format")
    model = meta.get("model")
    if fmt == LEGACY_CASCADE_FORMAT:
        stage = meta.get("stage")
        if stage not in ("b", "c"):
            raise WeightsError(f"{where}: format {fmt!r} without stage b or c (stage={stage!r})")
        model = model or f"stage_{stage}"
    if fmt in PADDLE_FORMATS:
        layout = "paddle"
    elif fmt == TORCH_FORMAT:
        layout = "torch"
    else:
        layout = None
    config = None
    if "config" in meta:
        try:
            config = json.loads(meta["config"])
        except ValueError as e:
            raise WeightsError(f"{where}: metadata 'config' is not JSON: {e}") from e
        if not isinstance(config, dict):
            raise WeightsError(f"{where}: metadata 'config' is a JSON {type(config).__name__}, not an object")
    return WeightsInfo(layout=layout, model=model, config=config, format=fmt)
