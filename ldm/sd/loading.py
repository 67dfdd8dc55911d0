"""Local-only loading of Stable Diffusion v1 components (UNet, VAE, CLIP text encoder, tokenizer).

Every path must be a local folder (ppdiffusers layout, or diffusers/transformers PyTorch layout,
detected from the weight file names and converted by ppdiffusers `from_diffusers=True`), or, for
the UNet, a config `.json` for random initialisation. Nothing is ever downloaded: a path that is
not on disk (for example a hub id such as `CompVis/stable-diffusion-v1-4/vae`) raises a
`FileNotFoundError` that says so.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from ldm.utils import get_logger

logger = get_logger("ldm.sd.loading")

__all__ = ["resolve_component", "is_torch_layout", "load_unet", "load_vae", "load_text_encoder", "load_tokenizer",
           "load_scheduler_config", "load_for_inference", "load_torch_weights", "set_offline", "ComponentPaths", "resolve_paths"]

_TORCH_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_PADDLE_FILES = ("diffusion_paddle_model.safetensors", "model_state.pdparams", "diffusion_paddle_model.safetensors.index.json",
                 "model_state.pdparams.index.json")


def set_offline() -> None:
    """No network: make the hub clients fail fast instead of trying to download."""
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")


def _missing(path: str, what: str) -> FileNotFoundError:
    hint = ""
    if not os.path.isabs(path) and path.count("/") >= 1 and not path.startswith("."):
        hint = (" It looks like a model hub id: this toolkit never downloads (no network). Download the model,"
                " then pass the local folder.")
    return FileNotFoundError(f"{what}: {path!r} is not a local folder.{hint}")


def is_torch_layout(folder: str) -> bool:
    """True when the weights a loader would pick in this folder are PyTorch ones.

    `model.safetensors` is written by both transformers (torch) and paddlenlp: its metadata tag
    decides, and it wins over a `model_state.pdparams` that PaddleNLP's own conversion may have
    left next to it. Otherwise Paddle weight files win over PyTorch ones.
    """
    names = set(os.listdir(folder))
    if "model.safetensors" in names:
        from ldm.weights.io import SafetensorsReader

        with SafetensorsReader(os.path.join(folder, "model.safetensors")) as r:
            return r.metadata.get("format", "pt") == "pt"
    if names & set(_PADDLE_FILES):
        return False
    return bool(names & set(_TORCH_FILES))


def _check_folder(path: Optional[str], what: str) -> str:
    if not path:
        raise ValueError(f"{what}: no path given")
    if not os.path.isdir(path):
        raise _missing(path, what)
    return path


def resolve_component(explicit: Optional[str], pretrained: Optional[str], sub: str) -> Optional[str]:
    """explicit path if given, else <pretrained>/<sub> (None when neither is given)."""
    if explicit:
        return explicit
    if pretrained:
        return os.path.join(pretrained, sub)
    return None


@dataclass
class ComponentPaths:
    unet: str
    vae: str
    text_encoder: str
    tokenizer: str
    scheduler: Optional[str]  # folder with scheduler_config.json, or None (SD v1 defaults)


def resolve_paths(model_args) -> ComponentPaths:
    """Where each component comes from; logs the UNet choice (config = random init vs weights)."""
    pre = model_args.pretrained_model_name_or_path
    te = resolve_component(model_args.text_encoder_name_or_path, pre, "text_encoder")
    tok = model_args.tokenizer_name
    if not tok:
        tok = resolve_component(None, pre, "tokenizer")
        if (not tok or not os.path.isdir(tok)) and te:
            sibling = os.path.join(os.path.dirname(os.path.normpath(te)), "tokenizer")
            tok = sibling if os.path.isdir(sibling) else tok
    unet = resolve_component(model_args.unet_name_or_path, pre, "unet")
    sched = os.path.join(pre, "scheduler") if pre and os.path.isdir(os.path.join(pre, "scheduler")) else None
    paths = ComponentPaths(unet=unet, vae=resolve_component(model_args.vae_name_or_path, pre, "vae"),
                           text_encoder=te, tokenizer=tok, scheduler=sched)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        if not getattr(paths, name):
            raise ValueError(f"no path for the {name}: pass --{name}_name_or_path or --pretrained_model_name_or_path")
    paths.unet = _shipped_config_fallback(paths.unet)
    # check everything before loading anything (a random-init SD UNet alone takes a while)
    for name, what in (("vae", "VAE"), ("text_encoder", "text encoder"), ("tokenizer", "tokenizer")):
        _check_folder(getattr(paths, name), what)
    if paths.unet.endswith(".json"):
        if not os.path.isfile(paths.unet):
            raise _missing(paths.unet, "UNet config")
    else:
        _check_folder(paths.unet, "UNet")
    return paths


SHIPPED_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "sd")


def _shipped_config_fallback(path: str) -> str:
    """The seed's multi-GPU command passes `./unet_config.json`; the config ships as sd/unet_config.json.
    A missing *.json whose file name is shipped in sd/ resolves to the shipped one (logged)."""
    if not path.endswith(".json") or os.path.isfile(path):
        return path
    shipped = os.path.join(SHIPPED_CONFIG_DIR, os.path.basename(path))
    if os.path.isfile(shipped):
        logger.warning("UNet config %s not found; using the shipped %s", path, shipped)
        return shipped
    return path


def load_unet(path: str):
    """UNet2DConditionModel from a folder (weights) or a config .json (random init)."""
    from ppdiffusers import UNet2DConditionModel

    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise _missing(path, "UNet config")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        logger.info("UNet: RANDOM initialisation from config %s (pretraining, no UNet weights loaded)", path)
        return UNet2DConditionModel.from_config(config)
    _check_folder(path, "UNet")
    logger.info("UNet: loading weights from %s (fine-tuning / resuming)", path)
    return UNet2DConditionModel.from_pretrained(path, from_diffusers=is_torch_layout(path))


def load_vae(path: str):
    from ppdiffusers import AutoencoderKL

    _check_folder(path, "VAE")
    return AutoencoderKL.from_pretrained(path, from_diffusers=is_torch_layout(path))


def load_text_encoder(path: str):
    """CLIPTextModel; a transformers (PyTorch) folder is converted in memory.

    (PaddleNLP's own `from_diffusers` conversion writes a `model_state.pdparams` into the source
    folder, which then shadows the original; we never write into a model folder.)
    """
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    _check_folder(path, "text encoder")
    if not is_torch_layout(path):
        return CLIPTextModel.from_pretrained(path)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"text encoder {path!r}: PyTorch weights must be model.safetensors (pickled .bin files are not loaded)"
        )
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(path))
    load_torch_weights(model, weights)
    model.eval()
    return model


def load_torch_weights(layer, safetensors_path: str) -> None:
    """Load a PyTorch-layout safetensors file into a paddle Layer with the same parameter names.

    The only layout difference is nn.Linear weights: torch [out, in], paddle [in, out]; they are
    transposed. `position_ids` buffers (not weights) are ignored. Every other key must match.
    """
    import paddle.nn as nn

    from ldm.weights.io import assign_state_dict, iter_state_dict

    linear = {f"{name}.weight" for name, sub in layer.named_sublayers() if isinstance(sub, nn.Linear)}
    items = [(k, v.T if k in linear else v) for k, v in iter_state_dict(safetensors_path)
             if not k.endswith("position_ids")]
    assign_state_dict(layer, items, where=safetensors_path)


def load_tokenizer(path: str, model_max_length: Optional[int] = None):
    from ppdiffusers.transformers import CLIPTokenizer

    _check_folder(path, "tokenizer")
    for f in ("vocab.json", "merges.txt"):
        if not os.path.isfile(os.path.join(path, f)):
            raise FileNotFoundError(f"tokenizer folder {path!r} has no {f}")
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return CLIPTokenizer.from_pretrained(path, **kwargs)


def load_scheduler_config(folder: Optional[str]) -> dict:
    """scheduler_config.json of a pipeline folder, or {} (SD v1 defaults)."""
    if not folder:
        return {}
    f = os.path.join(folder, "scheduler_config.json")
    if not os.path.isfile(f):
        return {}
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def load_for_inference(pretrained: Optional[str], unet_path: Optional[str] = None):
    """(unet, vae, text_encoder, tokenizer, scheduler_config) for sampling, all in eval mode.

    The UNet comes from `unet_path` (a trained `unet/` or `unet_ema/` folder) or <pretrained>/unet.
    The scheduler config is the one saved next to the trained UNet (it carries the training
    prediction_type) if present, else <pretrained>/scheduler, else SD v1 defaults.
    """
    if not pretrained:
        raise ValueError("--pretrained_model_name_or_path (a local pipeline folder) is required")
    _check_folder(pretrained, "pipeline")
    unet_dir = unet_path or os.path.join(pretrained, "unet")
    if unet_dir.endswith(".json"):
        raise ValueError(f"{unet_dir} is a config, not trained weights: sampling needs a UNet folder")
    unet = load_unet(unet_dir)
    vae = load_vae(os.path.join(pretrained, "vae"))
    te = load_text_encoder(os.path.join(pretrained, "text_encoder"))
    tok = load_tokenizer(os.path.join(pretrained, "tokenizer"))
    sched = {}
    for cand in (os.path.join(os.path.dirname(os.path.normpath(unet_dir)), "scheduler"), os.path.join(pretrained, "scheduler")):
        sched = load_scheduler_config(cand)
        if sched:
            logger.info("scheduler config from %s", cand)
            break
    for m in (unet, vae, te):
        m.eval()
    return unet, vae, te, tok, sched
