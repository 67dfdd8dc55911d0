"""Local-only loading of Stable Diffusion v1 components (UNet, VAE, CLIP text encoder, tokenizer).

Every path must be a local folder (ppdiffusers layout, or diffusers/transformers PyTorch layout),
or, for the UNet, a config `.json` for random initialisation.

No pickle is executed by default. The model is built from the folder's config.json and its weights
are assigned strictly (missing / unexpected / mis-shaped keys are one error listing them) from, in
this order: Paddle safetensors (`diffusion_paddle_model.safetensors`, or `model.safetensors` for
the text encoder), diffusers/transformers safetensors (`diffusion_pytorch_model.safetensors`,
`model.safetensors` with format "pt"; Linear weights transposed as ppdiffusers' `from_diffusers`
does), then `model_state.pdparams` read with the restricted unpickler (numpy arrays and plain
containers only), all through ldm.weights.WeightSource. Sharded `*.index.json` variants are read
the same way. PyTorch pickles (`*.bin`, `*.pt`, `*.ckpt`) are refused with an error naming the files, unless the caller
passes allow_pickle=True (`--allow_pickle_weights` in scripts/generate_sd.py).

Nothing is ever downloaded: a path that is not on disk (for example a hub id such as
`CompVis/stable-diffusion-v1-4/vae`) raises a `FileNotFoundError` that says so.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from ldm.utils import get_logger

logger = get_logger("ldm.sd.loading")

__all__ = ["resolve_component", "is_torch_layout", "load_unet", "load_vae", "load_text_encoder", "load_tokenizer",
           "load_scheduler_config", "load_for_inference", "load_torch_weights", "read_weights", "PickleRefusedError",
           "set_offline", "ComponentPaths", "resolve_paths"]

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
        from ldm.weights import SafetensorsReader, read_info

        path = os.path.join(folder, "model.safetensors")
        with SafetensorsReader(path) as r:
            return read_info(r.metadata, path).layout != "paddle"
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


SHIPPED_CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))  # ldm/sd: unet_config.json (SD v1 UNet)


def _shipped_config_fallback(path: str) -> str:
    """The seed's commands pass `./sd/unet_config.json` or `./unet_config.json`; the config ships
    inside the package (ldm/sd/unet_config.json), so it is found from any working directory.
    A missing *.json whose file name is shipped there resolves to the shipped one (logged)."""
    if not path.endswith(".json") or os.path.isfile(path):
        return path
    shipped = os.path.join(SHIPPED_CONFIG_DIR, os.path.basename(path))
    if os.path.isfile(shipped):
        logger.warning("UNet config %s not found; using the shipped %s", path, shipped)
        return shipped
    return path


# Weight files, in the order they are chosen. Safetensors always wins over a pickle in the same folder;
# `.pdparams` is read with the restricted unpickler; PyTorch pickles are refused unless allowed.
_DIFFUSERS_WEIGHTS = (  # (file, layout) for ppdiffusers models (UNet, VAE); then the fp16 variants
    ("diffusion_paddle_model.safetensors.index.json", "pd"), ("diffusion_paddle_model.safetensors", "pd"),
    ("diffusion_pytorch_model.safetensors.index.json", "pt"), ("diffusion_pytorch_model.safetensors", "pt"),
    ("model_state.pdparams.index.json", "pd"), ("model_state.pdparams", "pd"),
    ("diffusion_paddle_model.fp16.safetensors", "pd"), ("diffusion_pytorch_model.fp16.safetensors", "pt"),
)
_TRANSFORMERS_WEIGHTS = (  # text encoder; model.safetensors: its metadata tag decides the layout
    ("model.safetensors.index.json", None), ("model.safetensors", None),
    ("model_state.pdparams.index.json", "pd"), ("model_state.pdparams", "pd"),
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PickleRefusedError(ValueError):
    """A folder only offers weights that would have to be unpickled with arbitrary code execution."""


def _pickle_files(folder: str) -> list:
    names = sorted(os.listdir(folder))
    return [n for n in names if n.endswith(_PICKLE_SUFFIXES) or n.endswith(".bin.index.json")]


def _refuse_pickle(folder: str, what: str, files: list) -> PickleRefusedError:
    listed = ", ".join(os.path.join(folder, f) for f in files)
    return PickleRefusedError(
        f"{what} {folder!r}: the only weights here are PyTorch pickles ({listed}). Loading them would run "
        "arbitrary code from the file, so they are refused by default. Convert them to safetensors (e.g. in "
        "diffusers/transformers: model.save_pretrained(folder, safe_serialization=True), which writes "
        "diffusion_pytorch_model.safetensors / model.safetensors), or, only if you trust the file's origin, "
        "pass allow_pickle=True (--allow_pickle_weights).")


def _select_weights(folder: str, what: str, table) -> tuple:
    """(path, layout) of the weights to read: the first existing entry of `table`; raises when only
    pickles (or nothing) are there. layout None means: decided by the safetensors metadata."""
    for name, layout in table:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p, layout
    pickles = _pickle_files(folder)
    if pickles:
        raise _refuse_pickle(folder, what, pickles)
    raise FileNotFoundError(f"{what} {folder!r}: no weights found (expected one of {', '.join(n for n, _ in table)};"
                            f" the folder holds {sorted(os.listdir(folder))})")


def read_weights(path: str) -> tuple:
    """({name: ndarray}, layout) from a safetensors file / index or a `.pdparams` file / index through
    ldm.weights.WeightSource, never executing pickle code (`.pdparams` goes through the restricted
    unpickler: only numpy arrays and plain containers). layout is "pd" for Paddle-layout files
    (metadata format "np"/"pd", or .pdparams) and "pt" otherwise (torch; a safetensors file without
    a format tag is torch, as ppdiffusers and transformers assume)."""
    from ldm.weights import WeightSource

    with WeightSource(path) as src:
        return src.state_dict(), ("pd" if src.info.layout == "paddle" else "pt")


def _build_empty(cls, folder: str):
    """A ppdiffusers model from <folder>/config.json, without spending time on random init."""
    from ppdiffusers.utils.paddle_utils import no_init_weights

    from ldm.weights import read_json

    read_json(os.path.join(folder, "config.json"), "model config")  # a malformed one: named (issue 12 item 9)
    config = cls.load_config(folder)
    with no_init_weights(_enable=True):
        return cls.from_config(config)


def _load_diffusers_model(cls, folder: str, what: str, allow_pickle: bool = False):
    """UNet / VAE from a local folder; strict: missing/unexpected/mis-shaped keys are one error."""
    from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_pytorch_state_dict_to_paddle

    from ldm.weights import assign_state_dict

    _check_folder(folder, what)
    if os.path.lexists(os.path.join(folder, "config.json")):  # checked before the weights (issue 12 item 9)
        from ldm.weights import read_json

        read_json(os.path.join(folder, "config.json"), f"{what} config")
    try:
        path, layout = _select_weights(folder, what, _DIFFUSERS_WEIGHTS)
    except PickleRefusedError:
        if not allow_pickle:
            raise
        logger.warning("%s: loading PyTorch pickle weights from %s (allow_pickle=True: trusted files only)",
                       what, folder)
        model = cls.from_pretrained(folder, from_diffusers=True)
        model.eval()
        return model
    state, fmt = read_weights(path)
    model = _build_empty(cls, folder)
    model._update_deprecated_state_dict(state)
    model._convert_deprecated_attention_blocks(state)
    if layout == "pt" or fmt == "pt":  # torch orientation: Linear weights transposed, buffers renamed
        convert_pytorch_state_dict_to_paddle(model, state)
    assign_state_dict(model, state, where=path)
    model.register_to_config(_name_or_path=folder)  # as from_pretrained does
    model.eval()
    return model


def load_unet(path: str, allow_pickle: bool = False):
    """UNet2DConditionModel from a folder (weights) or a config .json (random init)."""
    from ppdiffusers import UNet2DConditionModel

    if path.endswith(".json"):
        if not os.path.lexists(path):
            raise _missing(path, "UNet config")
        from ldm.weights import read_json

        config = read_json(path, "UNet config")  # invalid JSON, a FIFO...: a WeightsError naming it
        logger.info("UNet: RANDOM initialisation from config %s (pretraining, no UNet weights loaded)", path)
        return UNet2DConditionModel.from_config(config)
    _check_folder(path, "UNet")
    logger.info("UNet: loading weights from %s (fine-tuning / resuming)", path)
    return _load_diffusers_model(UNet2DConditionModel, path, "UNet", allow_pickle)


def load_vae(path: str, allow_pickle: bool = False):
    from ppdiffusers import AutoencoderKL

    return _load_diffusers_model(AutoencoderKL, path, "VAE", allow_pickle)


def load_text_encoder(path: str, allow_pickle: bool = False):
    """CLIPTextModel from a local folder: transformers (PyTorch) `model.safetensors` converted in
    memory, Paddle `model.safetensors`, or `model_state.pdparams` through the restricted unpickler.

    (PaddleNLP's own `from_diffusers` conversion writes a `model_state.pdparams` into the source
    folder, which then shadows the original; we never write into a model folder.)
    """
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    from ldm.weights import assign_state_dict

    _check_folder(path, "text encoder")
    config = CLIPTextConfig.from_pretrained(path)
    try:
        weights, _ = _select_weights(path, "text encoder", _TRANSFORMERS_WEIGHTS)
    except PickleRefusedError:
        if not allow_pickle:
            raise
        logger.warning("text encoder: loading PyTorch pickle weights from %s (allow_pickle=True: trusted files only)",
                       path)
        model = CLIPTextModel(config)
        from ldm.sd.pickle_weights import torch_load_trusted

        load_torch_weights(model, torch_load_trusted(path, "pytorch_model.bin"), where=path)
        model.eval()
        return model
    state, fmt = read_weights(weights)
    model = CLIPTextModel(config)
    if fmt == "pt":
        load_torch_weights(model, state, where=weights)
    else:
        assign_state_dict(model, {k: v for k, v in state.items() if not k.endswith("position_ids")}, where=weights)
    model.eval()
    return model


def load_torch_weights(layer, weights, where: Optional[str] = None) -> None:
    """Load PyTorch-layout weights (a safetensors path, or a {name: ndarray} dict) into a paddle Layer
    with the same parameter names.

    The only layout difference is nn.Linear weights: torch [out, in], paddle [in, out]; they are
    transposed. `position_ids` buffers (not weights) are ignored. Every other key must match.
    """
    from ldm.sd.export import torch_layout_plan
    from ldm.weights import assign_state_dict, opened

    with opened(weights) as src:
        shapes = {k: s for k, s in src.shapes().items() if not k.endswith("position_ids")}
        assign_state_dict(layer, src, where=where or src.description, plan=torch_layout_plan(layer, shapes))


def load_tokenizer(path: str, model_max_length: Optional[int] = None):
    """The CLIP tokenizer of a pipeline's tokenizer folder; prompts are padded to
    `model_max_length`, else to the folder's own (`ldm.clip.folder_max_length`: its
    tokenizer_config.json, at most 77; the rule the Stable Cascade loaders use too)."""
    from ldm.clip import folder_max_length
    from ldm.clip import load_tokenizer as load_clip_tokenizer

    _check_folder(path, "tokenizer")
    return load_clip_tokenizer(path, model_max_length or folder_max_length(path))


def load_scheduler_config(folder: Optional[str]) -> dict:
    """scheduler_config.json of a pipeline folder, or {} (SD v1 defaults)."""
    if not folder:
        return {}
    f = os.path.join(folder, "scheduler_config.json")
    if not os.path.isfile(f):
        return {}
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


CHECKPOINT_UNET_DIR = "unet"  # a training checkpoint holds unet/ (+ unet_ema/, text_encoder/, scheduler/)


def _unet_folder(unet_path: str) -> str:
    """A UNet folder, or a training checkpoint folder (no config.json, a unet/ inside): its unet/."""
    inner = os.path.join(unet_path, CHECKPOINT_UNET_DIR)
    if os.path.isdir(unet_path) and not os.path.isfile(os.path.join(unet_path, "config.json")) and os.path.isdir(inner):
        logger.info("UNet: %s is a training checkpoint, using its %s/", unet_path, CHECKPOINT_UNET_DIR)
        return inner
    return unet_path


def load_for_inference(pretrained: Optional[str], unet_path: Optional[str] = None, allow_pickle: bool = False,
                       vae_path: Optional[str] = None, text_encoder_path: Optional[str] = None,
                       tokenizer_path: Optional[str] = None, scheduler_path: Optional[str] = None):
    """(unet, vae, text_encoder, tokenizer, scheduler_config) for sampling, all in eval mode.

    The UNet comes from `unet_path` (a trained `unet/` or `unet_ema/` folder, or a training
    checkpoint folder holding `unet/`) or <pretrained>/unet. The VAE, text encoder and tokenizer
    come from their own folders when given, else from <pretrained>/vae, text_encoder, tokenizer; the
    tokenizer also defaults to a `tokenizer/` beside the text encoder, and the text encoder of a
    checkpoint whose text encoder was trained (<checkpoint>/text_encoder) wins over the pipeline's.
    So `pretrained` may be None when every component has its folder. The scheduler config is
    `scheduler_path`'s, else the one saved next to the trained UNet (it carries the training
    prediction_type), else <pretrained>/scheduler, else SD v1 defaults.
    PyTorch pickle weights (.bin) are refused unless allow_pickle (trusted files only).
    """
    if pretrained:
        _check_folder(pretrained, "pipeline")
    elif not (unet_path and vae_path and text_encoder_path):
        raise ValueError("give a local pipeline folder (--pretrained_model_name_or_path), or the UNet, VAE and "
                         "text encoder folders (--unet_path --vae_path --text_encoder_path)")
    unet_dir = _unet_folder(unet_path) if unet_path else os.path.join(pretrained, "unet")
    if unet_dir.endswith(".json"):
        raise ValueError(f"{unet_dir} is a config, not trained weights: sampling needs a UNet folder")
    trained_te = os.path.join(os.path.dirname(os.path.normpath(unet_dir)), "text_encoder")
    if not text_encoder_path and unet_path and unet_dir != unet_path and os.path.isdir(trained_te):
        logger.info("text encoder: the checkpoint's trained %s", trained_te)
        text_encoder_path = trained_te
    te_dir = resolve_component(text_encoder_path, pretrained, "text_encoder")
    tok_dir = resolve_component(tokenizer_path, pretrained, "tokenizer")
    if not tokenizer_path and not (tok_dir and os.path.isdir(tok_dir)):
        sibling = os.path.join(os.path.dirname(os.path.normpath(text_encoder_path or te_dir)), "tokenizer")
        if os.path.isdir(sibling):
            tok_dir = sibling
    if not tok_dir:
        raise ValueError("no tokenizer: pass --tokenizer_path (none beside the text encoder, no pipeline folder)")
    _check_folder(tok_dir, "tokenizer")
    unet = load_unet(unet_dir, allow_pickle)
    vae = load_vae(resolve_component(vae_path, pretrained, "vae"), allow_pickle)
    te = load_text_encoder(te_dir, allow_pickle)
    tok = load_tokenizer(tok_dir)  # padded to the folder's model_max_length (77 for SD v1; the demo's: 10)
    positions = getattr(te.config, "max_position_embeddings", None)
    if positions is not None and tok.model_max_length > positions:
        raise ValueError(f"{tok_dir}: the tokenizer pads prompts to {tok.model_max_length} tokens, but the text "
                         f"encoder {te_dir} has {positions} positions (tokenizer_config.json model_max_length)")
    sched = {}
    candidates = [scheduler_path] if scheduler_path else [
        os.path.join(os.path.dirname(os.path.normpath(unet_dir)), "scheduler"),
        os.path.join(pretrained, "scheduler") if pretrained else None]
    for cand in candidates:
        if scheduler_path and not os.path.isfile(os.path.join(cand, "scheduler_config.json")):
            raise FileNotFoundError(f"scheduler: no scheduler_config.json in {cand!r}")
        sched = load_scheduler_config(cand)
        if sched:
            logger.info("scheduler config from %s", cand)
            break
    for m in (unet, vae, te):
        m.eval()
    return unet, vae, te, tok, sched
