"""torch -> Paddle key maps for Stage A, the EfficientNet encoder, the Previewer and CLIP, plus the
streaming converters and the strict loaders built on them.

Rules are tables: (regex on the source name, replacement or None to keep the name, transform).
The first matching rule wins. Every transform is listed explicitly: "transpose" is applied only to
real `nn.Linear` weights (torch [out, in] -> Paddle [in, out]); conv, transposed-conv, embedding
and norm tensors keep their layout. BatchNorm running statistics are renamed to Paddle's names
(`running_mean` -> `_mean`, `running_var` -> `_variance`) and `num_batches_tracked` is dropped.

Sources of the names: Stability-AI/StableCascade `modules/stage_a.py`, `effnet.py`, `previewer.py`
(original safetensors), diffusers `PaellaVQModel` (`vquantizer.embedding.weight`), torchvision
`efficientnet_v2_s`, transformers `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection`
and ppdiffusers' CLIP port (same names, Linear weights [in, out]).
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np

from ldm.utils import atomic_open, get_logger
from ldm.weights.io import (
    SafetensorsReader,
    SafetensorsWriter,
    WeightsError,
    check_state_dict,
    load_pdparams,
    to_storage,
)

__all__ = [
    "BN_RULES",
    "DROP_PATTERNS",
    "STAGE_A_RULES",
    "STAGE_A_DIFFUSERS_RULES",
    "EFFNET_RULES",
    "PREVIEWER_RULES",
    "CLIP_RULES",
    "map_key",
    "convert_torch_safetensors",
    "convert_stage_a",
    "convert_vqgan_dir",
    "convert_effnet",
    "convert_previewer",
    "convert_clip_dir",
    "clip_expected_shapes",
    "read_paddle_weights",
    "save_paddle_weights",
    "finish_loading",
]

logger = get_logger(__name__)

# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
DROP_PATTERNS = (r"\.num_batches_tracked$", r"(^|\.)embeddings\.position_ids$")
BN_RULES = [
    (r"\.running_mean$", "._mean", None),
    (r"\.running_var$", "._variance", None),
]
# Stage A: the only Linear layers are the ResBlock channel MLPs.
STAGE_A_RULES = [(r"\.channelwise\.[02]\.weight$", None, "transpose")] + BN_RULES
STAGE_A_DIFFUSERS_RULES = [(r"^vquantizer\.embedding\.weight$", "vquantizer.codebook.weight", None)] + STAGE_A_RULES
# EfficientNet encoder and Previewer: convolutions and BatchNorms only (the SE `fc1`/`fc2` are 1x1
# convolutions, not Linear layers: no transpose).
EFFNET_RULES = list(BN_RULES)
PREVIEWER_RULES = list(BN_RULES)
# CLIP (transformers -> ppdiffusers): same names, Linear weights transposed.
CLIP_RULES = [
    (r"\.self_attn\.(q|k|v|out)_proj\.weight$", None, "transpose"),
    (r"\.mlp\.fc[12]\.weight$", None, "transpose"),
    (r"^(text|visual)_projection\.weight$", None, "transpose"),
]


def map_key(name: str, rules) -> tuple[str | None, str | None]:
    """Source name -> (target name or None when the tensor is dropped, transform)."""
    if any(re.search(p, name) for p in DROP_PATTERNS):
        return None, None
    for pattern, repl, transform in rules:
        if re.search(pattern, name):
            return (re.sub(pattern, repl, name) if repl is not None else name), transform
    return name, None


def _apply(arr: np.ndarray, transform: str | None, name: str) -> np.ndarray:
    if transform is None:
        return arr
    if transform == "transpose":
        if arr.ndim != 2:
            raise WeightsError(f"{name}: expected a 2-D Linear weight to transpose, got shape {arr.shape}")
        return np.ascontiguousarray(arr.T)
    raise ValueError(f"unknown transform {transform!r}")


def _shape_after(shape, transform):
    return tuple(reversed(shape)) if transform == "transpose" else tuple(shape)


# ---------------------------------------------------------------------------------------------
# Model builders (expected shapes come from the real Paddle module)
# ---------------------------------------------------------------------------------------------
def _build(kind: str, shapes: dict, config: dict | None = None):
    """Instantiate the Paddle model of `kind` sized from the mapped shapes; returns (model, config)."""
    if kind == "stage_a":
        from ldm.cascade.stage_a import StageA, stage_a_config_from_shapes

        cfg = dict(stage_a_config_from_shapes(shapes))
        cfg.update(config or {})
        return StageA(**cfg), cfg
    if kind == "effnet":
        from ldm.cascade.effnet import EfficientNetEncoder

        cfg = {"c_latent": int(shapes.get("mapper.0.weight", (16,))[0])}
        return EfficientNetEncoder(**cfg), cfg
    if kind == "previewer":
        from ldm.cascade.previewer import Previewer, previewer_config_from_shapes

        cfg = previewer_config_from_shapes(shapes)
        return Previewer(**cfg), cfg
    raise ValueError(f"unknown model kind {kind!r}")


_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
_KIND_RULES = {"stage_a": STAGE_A_RULES, "effnet": EFFNET_RULES, "previewer": PREVIEWER_RULES}


# ---------------------------------------------------------------------------------------------
# Converters (torch safetensors -> Paddle-layout safetensors), streaming
# ---------------------------------------------------------------------------------------------
def convert_torch_safetensors(src, dst, kind: str, rules=None, dtype: str | None = None, config: dict | None = None):
    """Convert one torch `.safetensors` of `kind` ("stage_a", "effnet", "previewer") into a
    Paddle-layout `.safetensors` with the model config in its metadata. Tensors are read and
    written one at a time. Raises WeightsError listing missing/unexpected/mis-shaped keys."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not src.endswith(".safetensors"):
        raise WeightsError(f"{src}: torch weights must be a .safetensors file (pickled .pt/.ckpt is not read)")
    rules = _KIND_RULES[kind] if rules is None else rules
    with SafetensorsReader(src) as r:
        plan = {}  # target -> (source, transform, shape)
        for name in r.keys():
            tgt, tf = map_key(name, rules)
            if tgt is None:
                continue
            if tgt in plan:
                raise WeightsError(f"{src}: {name!r} and {plan[tgt][0]!r} both map to {tgt!r}")
            plan[tgt] = (name, tf, _shape_after(r.shape(name), tf))
        shapes = {k: v[2] for k, v in plan.items()}
        try:
            model, cfg = _build(kind, shapes, config)
        except ValueError as e:
            raise WeightsError(f"{src}: {e}") from e
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        del model
        check_state_dict(expected, shapes, where=src)
        meta = {"format": "np", "model": kind, "config": json.dumps(cfg), "source": os.path.basename(src)}
        order = list(expected)
        store = dtype or "float32"
        tags = {k: (_TAGS[store] if r.dtype(plan[k][0]) in _FLOAT_TAGS else r.dtype(plan[k][0])) for k in order}
        with SafetensorsWriter(dst, [(k, shapes[k], tags[k]) for k in order], meta) as w:
            for k in order:
                name, tf, _ = plan[k]
                arr = _apply(r.get(name), tf, name)
                if tags[k] in _FLOAT_TAGS:
                    arr = to_storage(arr.astype(np.float32, copy=False), store)[0]
                w.write(k, arr)
    logger.info("converted %s (%d tensors) -> %s", src, len(order), dst)
    return cfg


def convert_stage_a(src, dst, dtype=None, scale_factor=None):
    """Original `stage_a.safetensors` -> Paddle StageA (scale_factor 0.43 unless given)."""
    from ldm.cascade.stage_a import SCALE_FACTOR_ORIGINAL

    sf = SCALE_FACTOR_ORIGINAL if scale_factor is None else float(scale_factor)
    return convert_torch_safetensors(src, dst, "stage_a", STAGE_A_RULES, dtype, {"scale_factor": sf})


def convert_vqgan_dir(vqgan_dir, dst, dtype=None, scale_factor=None):
    """diffusers `vqgan/` folder (PaellaVQModel: config.json + diffusion_pytorch_model.safetensors)
    -> Paddle StageA. The latent scale comes from config.json (0.3764 when absent) unless given."""
    from ldm.cascade.stage_a import SCALE_FACTOR_DIFFUSERS

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
    out = convert_torch_safetensors(src, dst, "stage_a", STAGE_A_DIFFUSERS_RULES, dtype, {"scale_factor": sf})
    for ours, theirs in (("levels", "levels"), ("bottleneck_blocks", "bottleneck_blocks"), ("c_hidden", "embed_dim"),
                         ("c_latent", "latent_channels"), ("codebook_size", "num_vq_embeddings")):
        if theirs in cfg and int(cfg[theirs]) != out[ours]:
            raise WeightsError(f"{cfg_path}: {theirs}={cfg[theirs]} disagrees with the weights ({ours}={out[ours]})")
    return out


def convert_effnet(src, dst, dtype=None):
    return convert_torch_safetensors(src, dst, "effnet", EFFNET_RULES, dtype)


def convert_previewer(src, dst, dtype=None):
    return convert_torch_safetensors(src, dst, "previewer", PREVIEWER_RULES, dtype)


# ---------------------------------------------------------------------------------------------
# CLIP folders (transformers -> ppdiffusers)
# ---------------------------------------------------------------------------------------------
_CLIP_PARTS = {
    "text": dict(prefix="text_model.", projection="text_projection.weight", sub="text_config",
                 model_type="clip_text_model", arch="CLIPTextModelWithProjection",
                 files=("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json")),
    "vision": dict(prefix="vision_model.", projection="visual_projection.weight", sub="vision_config",
                   model_type="clip_vision_model", arch="CLIPVisionModelWithProjection",
                   files=("preprocessor_config.json",)),
}


def _clip_config(src_dir: str, part: str) -> dict:
    path = os.path.join(src_dir, "config.json")
    if not os.path.exists(path):
        raise WeightsError(f"{src_dir}: no config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    info = _CLIP_PARTS[part]
    if cfg.get("model_type") == "clip" or info["sub"] in cfg:  # a full CLIPModel folder
        sub = dict(cfg.get(info["sub"]) or {})
        sub["projection_dim"] = cfg.get("projection_dim", sub.get("projection_dim", 512))
        cfg = sub
    elif cfg.get("model_type", info["model_type"]) != info["model_type"]:
        raise WeightsError(f"{path}: model_type {cfg.get('model_type')!r} is not a CLIP {part} model")
    cfg["model_type"] = info["model_type"]
    cfg["architectures"] = [info["arch"]]
    return cfg


def clip_expected_shapes(cfg: dict, part: str) -> dict:
    """Paddle state-dict shapes of ppdiffusers' CLIP{Text,Vision}ModelWithProjection for a config
    (computed, so the 700M-parameter bigG model need not be instantiated to check a file)."""
    h = int(cfg.get("hidden_size", 512))
    inter = int(cfg.get("intermediate_size", 2048))
    n = int(cfg.get("num_hidden_layers", 12))
    proj = int(cfg.get("projection_dim", 512))
    p = _CLIP_PARTS[part]["prefix"]
    out = {}
    if part == "text":
        out[p + "embeddings.token_embedding.weight"] = (int(cfg.get("vocab_size", 49408)), h)
        out[p + "embeddings.position_embedding.weight"] = (int(cfg.get("max_position_embeddings", 77)), h)
    else:
        ps, img, ch = int(cfg.get("patch_size", 32)), int(cfg.get("image_size", 224)), int(cfg.get("num_channels", 3))
        out[p + "embeddings.class_embedding"] = (h,)
        out[p + "embeddings.patch_embedding.weight"] = (h, ch, ps, ps)
        out[p + "embeddings.position_embedding.weight"] = ((img // ps) ** 2 + 1, h)
        out[p + "pre_layrnorm.weight"] = out[p + "pre_layrnorm.bias"] = (h,)
    for i in range(n):
        lp = f"{p}encoder.layers.{i}."
        for proj_name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{lp}self_attn.{proj_name}.weight"] = (h, h)
            out[f"{lp}self_attn.{proj_name}.bias"] = (h,)
        for ln in ("layer_norm1", "layer_norm2"):
            out[f"{lp}{ln}.weight"] = out[f"{lp}{ln}.bias"] = (h,)
        out[f"{lp}mlp.fc1.weight"], out[f"{lp}mlp.fc1.bias"] = (h, inter), (inter,)
        out[f"{lp}mlp.fc2.weight"], out[f"{lp}mlp.fc2.bias"] = (inter, h), (h,)
    if part == "text":
        out[p + "final_layer_norm.weight"] = out[p + "final_layer_norm.bias"] = (h,)
    else:
        out[p + "post_layernorm.weight"] = out[p + "post_layernorm.bias"] = (h,)
    out[_CLIP_PARTS[part]["projection"]] = (h, proj)
    return out


def _clip_sources(src_dir: str) -> list[str]:
    index = os.path.join(src_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(src_dir, x) for x in files]
    single = os.path.join(src_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise WeightsError(f"{src_dir}: no model.safetensors or model.safetensors.index.json "
                       "(save the transformers model with safe_serialization=True; pickles are not read)")


def _clip_target_name(name: str, part: str) -> str | None:
    """transformers name -> ppdiffusers name; None for tensors of the other tower / CLIPModel extras.
    Handles both layouts: with the `text_model.`/`vision_model.` prefix (transformers 4.x) and
    without it (transformers 5.x)."""
    info, other = _CLIP_PARTS[part], _CLIP_PARTS["vision" if part == "text" else "text"]
    if name.startswith(other["prefix"]) or name == other["projection"] or name == "logit_scale":
        return None
    if name == info["projection"] or name.startswith(info["prefix"]):
        return name
    return info["prefix"] + name  # prefix-less layout


def convert_clip_dir(src_dir, dst_dir, part: str, dtype: str | None = None) -> dict:
    """Convert a transformers CLIP folder (text or vision tower, with projection) into a folder that
    `load_clip_text` / `load_clip_vision` (and ppdiffusers' from_pretrained) read: config.json,
    model.safetensors in Paddle layout (metadata format "np"), and the tokenizer or preprocessor
    files. Any missing, unexpected or mis-shaped key is an error."""
    if part not in _CLIP_PARTS:
        raise ValueError(f"part must be 'text' or 'vision', got {part!r}")
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    cfg = _clip_config(src_dir, part)
    expected = clip_expected_shapes(cfg, part)
    readers = [SafetensorsReader(p) for p in _clip_sources(src_dir)]
    try:
        plan = {}
        for r in readers:
            for name in r.keys():
                if map_key(name, [])[0] is None:  # position_ids buffers
                    continue
                tgt = _clip_target_name(name, part)
                if tgt is None:
                    continue
                _, tf = map_key(tgt, CLIP_RULES)
                if tgt in plan:
                    raise WeightsError(f"{src_dir}: {name!r} and {plan[tgt][1]!r} both map to {tgt!r}")
                plan[tgt] = (r, name, tf, _shape_after(r.shape(name), tf))
        check_state_dict(expected, {k: v[3] for k, v in plan.items()}, where=f"{src_dir} ({part} tower)")
        os.makedirs(dst_dir, exist_ok=True)
        order = list(expected)
        tag = _TAGS[dtype or "float32"]
        with SafetensorsWriter(os.path.join(dst_dir, "model.safetensors"), [(k, expected[k], tag) for k in order],
                               {"format": "np"}) as w:
            for k in order:
                r, name, tf, _ = plan[k]
                arr = _apply(r.get(name).astype(np.float32, copy=False), tf, name)
                w.write(k, to_storage(arr, dtype or "float32")[0])
    finally:
        for r in readers:
            r.close()
    _write_json_atomic(os.path.join(dst_dir, "config.json"), cfg)
    for fname in _CLIP_PARTS[part]["files"]:
        if os.path.exists(os.path.join(src_dir, fname)):
            shutil.copyfile(os.path.join(src_dir, fname), os.path.join(dst_dir, fname))
    logger.info("converted CLIP %s tower %s (%d tensors) -> %s", part, src_dir, len(order), dst_dir)
    return cfg


def _write_json_atomic(path, obj):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Loading Paddle-layout weights (our safetensors or the seed's .pdparams)
# ---------------------------------------------------------------------------------------------
def read_paddle_weights(path, kind: str) -> tuple[list[tuple[str, np.ndarray]], dict]:
    """Read Paddle-layout weights for `kind` from our converted `.safetensors` (metadata returned)
    or a `.pdparams` through the restricted unpickler. `.pdparams` names are normalised the same
    way as torch names (BatchNorm statistics, `num_batches_tracked`) so files that kept torch's
    BatchNorm names load too. A torch-layout `.safetensors` (no "np" format tag) is refused."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"weights file not found: {path}")
    if path.endswith(".pdparams"):
        rules = [r for r in _KIND_RULES[kind] if r[2] is None]  # names only: a .pdparams is Paddle layout
        items = []
        for k, v in load_pdparams(path).items():
            tgt, _ = map_key(k, rules)
            if tgt is not None:
                items.append((tgt, v))
        return items, {}
    with SafetensorsReader(path) as r:
        meta = dict(r.metadata)
        if meta.get("format") not in ("np", "pd"):
            raise WeightsError(
                f"{path}: this safetensors file is not in Paddle layout (metadata format={meta.get('format')!r}); "
                "convert it first with scripts/convert_other_weight.py")
        if meta.get("model", kind) != kind:
            raise WeightsError(f"{path}: holds a {meta['model']!r} model, expected {kind!r}")
        return list(r.items()), meta


def save_paddle_weights(model, path, kind: str, dtype: str | None = None) -> None:
    """Save a StageA / EfficientNetEncoder / Previewer (e.g. a tiny preset with random weights) in
    the converter's format, so `load_stage_a` / `load_effnet` / `load_previewer` rebuild it."""
    from ldm.weights.io import save_safetensors

    if kind not in _KIND_RULES:
        raise ValueError(f"kind must be one of {sorted(_KIND_RULES)}, got {kind!r}")
    meta = {"format": "np", "model": kind, "config": model.config.to_json()}
    save_safetensors(model.state_dict(), path, dtype=dtype, metadata=meta)


def finish_loading(model, items, where, dtype: str = "float32"):
    """Strictly assign `items` to `model`, cast to `dtype`, freeze and switch to eval mode."""
    from ldm.weights.io import assign_state_dict

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    assign_state_dict(model, items, where=str(where))
    if dtype != "float32":
        model.to(dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.stop_gradient = True
    return model
