"""CLIP text / image encoders and the CLIP tokenizer, through ppdiffusers' Paddle CLIP port (used by
Stable Cascade and by Stable Diffusion).

- Text: `CLIPTextModelWithProjection` (ViT-bigG-14 laion2B-39B-b160k, projection 1280).
  Stage C uses `hidden_states[-1]` (the last layer's output before the final LayerNorm, as the
  original and diffusers do) [B, 77, 1280] and `text_embeds` [B, 1, 1280].
- Image: `CLIPVisionModelWithProjection` (ViT-L/14), `image_embeds` [B, 1, 768], on images resized
  (shorter side) to 224 with antialiased bicubic interpolation, centre-cropped to 224 and normalised
  with the CLIP mean/std (StableCascade `train/train_c.py` clip_preprocess).
- Tokenizer: the CLIP BPE tokenizer (vocab.json + merges.txt) from the text model's folder.

Folders are local only. A folder holds config.json and either `model.safetensors` in Paddle layout
(what scripts/convert_other_weight.py writes from a transformers folder; metadata format "np") or
a ppdiffusers `model_state.pdparams` (read with the restricted unpickler). Loading is strict: a
missing, unexpected or mis-shaped key raises WeightsError (ppdiffusers' own from_pretrained keeps
random weights for missing keys silently).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import paddle

from ldm.utils import atomic_open, get_logger
from ldm.weights import (
    KeyTable, Op, WeightSource, WeightsError, check_regular_file, finish_loading, key_table, map_key, read_json,
    register_key_table, save_safetensors, weights_metadata,
)

logger = get_logger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIP_IMAGE_SIZE",
    "clip_image_preprocess",
    "load_clip_text",
    "load_clip_vision",
    "load_tokenizer",
    "folder_max_length",
    "bytes_to_unicode",
    "write_clip_bpe_tokenizer",
    "write_tiny_clip_tokenizer",
    "make_tiny_clip_text",
    "make_tiny_clip_vision",
    "CLIP_RULES",
    "clip_expected_shapes",
    "convert_clip_dir",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_BPE_MERGES = 49152 - 256 - 2  # merges used by CLIP: vocab 49408 = 2*256 bytes + merges + 2 specials


# ---------------------------------------------------------------------------------------------
# Image preprocessing
# ---------------------------------------------------------------------------------------------
def _aa_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] resampling matrix of antialiased bicubic interpolation (PIL's filter, cubic
    coefficient a = -0.5, support widened by the downscale factor; what torch's
    `interpolate(..., mode="bicubic", antialias=True)` and torchvision's Resize(antialias=True) use)."""
    def cubic(x, a=-0.5):
        x = np.abs(x)
        return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))

    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        taps = cubic((np.arange(lo, hi) - center + 0.5) * inv)
        w[i, lo:hi] = taps / taps.sum()
    return w.astype(np.float32)


def clip_image_preprocess(images, size: int = CLIP_IMAGE_SIZE):
    """(B, 3, H, W) float in [0, 1] -> (B, 3, size, size) CLIP input: antialiased bicubic resize of
    the shorter side to `size`, centre crop, CLIP mean/std (torchvision Resize(size, BICUBIC,
    antialias=True) + CenterCrop + Normalize, as the StableCascade training code)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"clip_image_preprocess expects (B, 3, H, W), got {list(images.shape)}")
    h, w = images.shape[2], images.shape[3]
    if h <= w:
        nh, nw = size, max(size, int(size * w / h))
    else:
        nh, nw = max(size, int(size * h / w)), size
    x = images.astype("float32")
    if (nh, nw) != (h, w):
        wh = paddle.to_tensor(_aa_bicubic_weights(h, nh))  # (nh, H)
        ww = paddle.to_tensor(_aa_bicubic_weights(w, nw))  # (nw, W)
        x = paddle.matmul(paddle.matmul(wh, x), ww, transpose_y=True)  # (B, 3, nh, nw)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size]  # (B, 3, size, size)
    mean = paddle.to_tensor(CLIP_MEAN, dtype="float32").reshape([1, 3, 1, 1])
    std = paddle.to_tensor(CLIP_STD, dtype="float32").reshape([1, 3, 1, 1])
    return ((x - mean) / std).astype(images.dtype)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _folder_weights(folder: str) -> str:
    """The weight file of a CLIP folder: `model.safetensors`, else `model_state.pdparams`."""
    for name in ("model.safetensors", "model_state.pdparams"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise WeightsError(f"{folder}: no model.safetensors (Paddle layout) or model_state.pdparams")


def _load_clip(folder, part: str, dtype: str):
    from ppdiffusers.transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise WeightsError(f"{folder}: not a CLIP model folder (no config.json)")
    cfg_cls, model_cls = ((CLIPTextConfig, CLIPTextModelWithProjection) if part == "text"
                          else (CLIPVisionConfig, CLIPVisionModelWithProjection))
    config = cfg_cls.from_pretrained(folder)
    path = _folder_weights(folder)
    with WeightSource(path) as src:
        if src.info.layout != "paddle":
            raise WeightsError(
                f"{path}: a transformers (torch layout, format={src.info.format!r}) file; convert the folder first "
                "with scripts/convert_other_weight.py --clip_text_dir/--clip_image_dir")
        plan = key_table(_CLIP_MODELS[part]).plan(src.shapes(), "paddle")
        return finish_loading(model_cls(config), src, path, dtype, plan=plan)


def load_clip_text(folder, dtype: str = "float32"):
    """ppdiffusers `CLIPTextModelWithProjection` from a local folder, strictly loaded, eval mode,
    gradients off. Call as `model(input_ids=ids)`: `.last_hidden_state`, `.text_embeds`."""
    return _load_clip(folder, "text", dtype)


def load_clip_vision(folder, dtype: str = "float32"):
    """ppdiffusers `CLIPVisionModelWithProjection` from a local folder, strictly loaded, eval mode.
    Call as `model(pixel_values=clip_image_preprocess(x))`: `.image_embeds`."""
    return _load_clip(folder, "vision", dtype)


# ---------------------------------------------------------------------------------------------
# Weights: the CLIP key table (transformers -> ppdiffusers) and folder conversion
# ---------------------------------------------------------------------------------------------
# transformers and ppdiffusers use the same names; Linear weights are transposed (Sources:
# transformers CLIPTextModelWithProjection / CLIPVisionModelWithProjection, ppdiffusers' port).
CLIP_RULES = [
    (r"\.self_attn\.(q|k|v|out)_proj\.weight$", None, "transpose"),
    (r"\.mlp\.fc[12]\.weight$", None, "transpose"),
    (r"^(text|visual)_projection\.weight$", None, "transpose"),
]
_CLIP_MODELS = {"text": "clip_text", "vision": "clip_vision"}  # model names of the weights metadata
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


def _clip_plan(shapes, layout: str, part: str) -> dict:
    """Plan to ppdiffusers names: layout "paddle" (ours / ppdiffusers) drops only the position_ids
    buffers; "transformers" also picks this tower's tensors and transposes the Linear weights."""
    plan = {}
    for name, shape in shapes.items():
        if map_key(name, [])[0] is None:  # position_ids buffers
            continue
        tgt = name if layout == "paddle" else _clip_target_name(name, part)
        if tgt is None:
            continue
        _, tf = map_key(tgt, CLIP_RULES if layout == "transformers" else [])
        if tgt in plan:
            raise WeightsError(f"{name!r} and {plan[tgt].sources[0]!r} both map to {tgt!r}")
        shape = tuple(int(s) for s in shape)
        plan[tgt] = Op((name,), "T", shape[::-1]) if tf == "transpose" else Op((name,), "copy", shape)
    return plan


for _part, _model in (("text", "clip_text"), ("vision", "clip_vision")):
    register_key_table(KeyTable(_model, ("paddle", "transformers"),
                                to_paddle=lambda shapes, layout, p=_part: _clip_plan(shapes, layout, p)))


def convert_clip_dir(src_dir, dst_dir, part: str, dtype: str | None = None) -> dict:
    """Convert a transformers CLIP folder (text or vision tower, with projection) into a folder that
    `load_clip_text` / `load_clip_vision` (and ppdiffusers' from_pretrained) read: config.json,
    model.safetensors in Paddle layout (the metadata schema of ldm.weights), and the tokenizer or
    preprocessor files. Any missing, unexpected or mis-shaped key is an error."""
    if part not in _CLIP_PARTS:
        raise ValueError(f"part must be 'text' or 'vision', got {part!r}")
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    cfg = _clip_config(src_dir, part)
    model = _CLIP_MODELS[part]
    with WeightSource(_clip_sources(src_dir)) as src:
        where = f"{src_dir} ({part} tower)"
        try:
            plan = key_table(model).plan(src.shapes(), "transformers")
        except WeightsError as e:
            raise WeightsError(f"{src_dir}: {e}") from e
        os.makedirs(dst_dir, exist_ok=True)
        save_safetensors(src, os.path.join(dst_dir, "model.safetensors"), dtype=dtype or "float32", plan=plan,
                         expected=clip_expected_shapes(cfg, part), where=where,
                         metadata=weights_metadata(model, cfg), finite=True)
    with atomic_open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    for fname in _CLIP_PARTS[part]["files"]:
        if os.path.exists(os.path.join(src_dir, fname)):
            shutil.copyfile(os.path.join(src_dir, fname), os.path.join(dst_dir, fname))
    logger.info("converted CLIP %s tower %s (%d tensors) -> %s", part, src_dir, len(plan), dst_dir)
    return cfg


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def folder_max_length(folder, default: int = CLIP_MAX_LENGTH) -> int:
    """The ``model_max_length`` a tokenizer folder's tokenizer_config.json names (the length its
    text encoder is used with: 77 for CLIP, fewer for the demo's), at most ``default`` (some
    Hugging Face configs hold a huge "no limit" value); ``default`` without a config."""
    path = os.path.join(os.fspath(folder), "tokenizer_config.json")
    if not os.path.lexists(path):
        return int(default)
    value = read_json(path, "tokenizer config").get("model_max_length", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise WeightsError(f"tokenizer config {path}: model_max_length must be a positive number, got {value!r}")
    return int(min(value, default))


def load_tokenizer(folder, max_length: int = CLIP_MAX_LENGTH):
    """The CLIP BPE tokenizer (ppdiffusers/paddlenlp `CLIPTokenizer`) from vocab.json + merges.txt in
    `folder`, with `model_max_length` = `max_length`. Use with truncation=True,
    padding="max_length", max_length=tokenizer.model_max_length."""
    from ppdiffusers.transformers import CLIPTokenizer

    folder = os.fspath(folder)
    for f in ("vocab.json", "merges.txt"):
        if not os.path.lexists(os.path.join(folder, f)):
            raise FileNotFoundError(f"{folder}: no {f} (a CLIP tokenizer folder needs vocab.json and merges.txt)")
        check_regular_file(os.path.join(folder, f), "tokenizer file")
    if not read_json(os.path.join(folder, "vocab.json"), "tokenizer vocabulary"):  # issue 12 item 9
        raise WeightsError(f"tokenizer vocabulary {os.path.join(folder, 'vocab.json')}: empty (no token)")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)
    tok.model_max_length = max_length
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table, in vocabulary order: the 188 printable
    Latin-1 bytes map to themselves (listed first), the other 68 bytes to code points 256...
    (listed after them)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


def _write_tokenizer_files(folder, vocab: dict, merges: list[str], max_length: int):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    cfg = {"model_max_length": max_length, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
           "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def write_clip_bpe_tokenizer(bpe_gz, folder, max_length: int = CLIP_MAX_LENGTH) -> int:
    """Rebuild the 49,408-token CLIP vocab.json / merges.txt from OpenAI's `bpe_simple_vocab_16e6.txt.gz`
    (shipped with open_clip_torch): byte characters, the same with `</w>`, one token per merge,
    then `<|startoftext|>` and `<|endoftext|>`. Returns the vocabulary size."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:1 + _BPE_MERGES]
    if len(merges) != _BPE_MERGES:
        raise ValueError(f"{bpe_gz}: expected at least {_BPE_MERGES} merges, found {len(merges)}")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{bpe_gz}: duplicate tokens in the rebuilt vocabulary")
    _write_tokenizer_files(folder, vocab, merges, max_length)
    return len(vocab)


def write_tiny_clip_tokenizer(folder, max_length: int = CLIP_MAX_LENGTH) -> int:
    """A 514-token offline CLIP tokenizer for tests and tiny presets: the 256 byte characters, the
    same with `</w>`, `<|startoftext|>`, `<|endoftext|>`, and no merges (every character is a
    token). Returns the vocabulary size (use it as the tiny text model's vocab_size)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    _write_tokenizer_files(folder, {t: i for i, t in enumerate(tokens)}, [], max_length)
    return len(tokens)


# ---------------------------------------------------------------------------------------------
# Tiny random CLIP folders (tests and the pipeline's tiny preset)
# ---------------------------------------------------------------------------------------------
def _save_folder(model, config, folder, part: str):
    os.makedirs(folder, exist_ok=True)
    save_safetensors(model.state_dict(), os.path.join(folder, "model.safetensors"),
                     metadata=weights_metadata(_CLIP_MODELS[part]))
    config.save_pretrained(folder)


def make_tiny_clip_text(folder, projection_dim: int = 32, hidden_size: int = 32, num_hidden_layers: int = 2,
                        seed: int = 0) -> str:
    """Write a random tiny CLIP text tower + tiny tokenizer into `folder` (loadable with
    `load_clip_text` / `load_tokenizer`). last_hidden_state has `hidden_size` channels,
    text_embeds `projection_dim`."""
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = write_tiny_clip_tokenizer(folder)
    paddle.seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=4, projection_dim=projection_dim,
                         max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu", bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    cfg.architectures = ["CLIPTextModelWithProjection"]
    _save_folder(CLIPTextModelWithProjection(cfg), cfg, folder, "text")
    return os.fspath(folder)


def make_tiny_clip_vision(folder, projection_dim: int = 32, hidden_size: int = 32, num_hidden_layers: int = 2,
                          seed: int = 0) -> str:
    """Write a random tiny CLIP vision tower (224 px input, patch 32) into `folder`."""
    from ppdiffusers.transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    paddle.seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=num_hidden_layers, num_attention_heads=4, image_size=CLIP_IMAGE_SIZE,
                           patch_size=32, projection_dim=projection_dim, hidden_act="gelu")
    cfg.architectures = ["CLIPVisionModelWithProjection"]
    _save_folder(CLIPVisionModelWithProjection(cfg), cfg, folder, "vision")
    return os.fspath(folder)
