"""Stable Cascade text-to-image: Stage C (text -> 16-channel latent), Stage B (-> 4-channel
latent), Stage A (-> pixels), each sampled with the GDF DDPM sampler and classifier-free guidance.

Follows the official inference notebook (Stability-AI/StableCascade ``inference/
text_to_image.ipynb``, ``train/base.py`` ``get_conditions``, ``train/train_b.py``):
- conditional text: CLIP bigG ``hidden_states[-1]`` [B, 77, 1280] (the last layer output, before
  the final LayerNorm) and pooled ``text_embeds`` [B, 1, 1280], with the tokenizer's attention mask;
- unconditional branch: empty captions (or the negative caption) and zero image embeddings for
  Stage C; for Stage B the pooled empty caption and a zero ``effnet`` (Stage C latent);
- the sampler yields (x0, x, pred); the result is the last x0, as in the notebook.

What ModelC / ModelB share lives here; the networks come from a ``Components`` object
(``ldm.cascade.components``: built from weight files or the offline tiny preset).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from ldm.cascade import settings as cfg_mod
from ldm.cascade.gdf import make_sampler
from ldm.cascade.settings import SamplingConfig
from ldm.utils import get_logger
from ldm.weights import check_storage_dtype

logger = get_logger("ldm.cascade")

STAGE_C_CHANNELS = 16
STAGE_B_CHANNELS = 4
NOISE_TAG_C, NOISE_TAG_B, NOISE_TAG_IMG2IMG = 0xC, 0xB, 0x1


def check_dtype(dtype: str) -> str:
    """float32 everywhere, bfloat16 on a GPU; float16 is refused.

    Stable Cascade's Stage C/B activations overflow float16 (the known upstream NaN / black-image
    problem), so float16 is refused up front with a pointer to bfloat16, which has float32's range.
    Paddle also has no half-precision convolution kernels on CPU.
    """
    check_storage_dtype(dtype)
    if dtype == "float16":
        raise ValueError("dtype float16 is not supported: Stable Cascade's Stage C/B activations overflow "
                         "float16 (NaN / black images); use --dtype bfloat16 on a GPU (same memory, float32 "
                         "range) or float32")
    if dtype != "float32" and not paddle.device.is_compiled_with_cuda():
        raise ValueError(f"dtype {dtype} needs a GPU (Paddle has no {dtype} convolution kernels on "
                         f"CPU); use --dtype float32 on CPU, bfloat16 on a GPU")
    return dtype


# ---------------------------------------------------------------------------- sizes and noise
def check_size(height, width) -> Tuple[int, int]:
    """Validate an image size and round it to a multiple of ``SIZE_MULTIPLE`` (logged)."""
    out = []
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or v != v:
            raise ValueError(f"{name} must be a number of pixels, got {v!r}")
        if not cfg_mod.MIN_SIZE <= v <= cfg_mod.MAX_SIZE:
            raise ValueError(f"{name} must be between {cfg_mod.MIN_SIZE} and {cfg_mod.MAX_SIZE} pixels, got {v}")
        r = max(cfg_mod.MIN_SIZE, int(round(v / cfg_mod.SIZE_MULTIPLE)) * cfg_mod.SIZE_MULTIPLE)
        if r != v:
            logger.warning("%s %s rounded to %d (Stable Cascade sizes are multiples of %d px)",
                           name, v, r, cfg_mod.SIZE_MULTIPLE)
        out.append(r)
    return out[0], out[1]


def stage_c_latent_size(height: int, width: int) -> Tuple[int, int]:
    """(ceil(H / 42.67), ceil(W / 42.67)): 24 x 24 for 1024 x 1024."""
    return math.ceil(height / cfg_mod.STAGE_C_COMPRESSION), math.ceil(width / cfg_mod.STAGE_C_COMPRESSION)


def stage_b_latent_size(height: int, width: int) -> Tuple[int, int]:
    """(ceil(H / 4), ceil(W / 4)): 256 x 256 for 1024 x 1024."""
    return math.ceil(height / cfg_mod.STAGE_A_COMPRESSION), math.ceil(width / cfg_mod.STAGE_A_COMPRESSION)


def size_from_stage_c(hc: int, wc: int) -> Tuple[int, int]:
    """The image size (a multiple of 64) whose Stage C latent is hc x wc; exact for every size
    ``check_size`` returns."""
    m = cfg_mod.SIZE_MULTIPLE
    return (max(m, int(round(hc * cfg_mod.STAGE_C_COMPRESSION / m)) * m),
            max(m, int(round(wc * cfg_mod.STAGE_C_COMPRESSION / m)) * m))


def image_noise_fn(seed: int, batch_size: int, tag: int) -> Callable[[List[int]], paddle.Tensor]:
    """Image i draws from its own numpy PCG64 stream seeded by (seed + i, tag), so image i of a
    batch equals image 0 of a batch of one with seed + i, and Stage C, Stage B and img2img
    (different tags) never reuse each other's numbers."""
    rngs = [np.random.default_rng([int(seed) + i, tag]) for i in range(batch_size)]

    def draw(shape):
        if shape[0] != batch_size:
            raise ValueError(f"noise for a batch of {shape[0]} requested, {batch_size} streams")
        return paddle.to_tensor(np.stack([r.standard_normal(list(shape[1:]), dtype=np.float32) for r in rngs]))

    return draw


# ---------------------------------------------------------------------------- conditioning
def encode_text(tokenizer, text_encoder, captions: List[str]) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """CLIP bigG: (hidden_states[-1] [B, 77, C], text_embeds [B, 1, C]), attention mask applied."""
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_attention_mask=True, return_tensors="pd")
    out = text_encoder(tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       output_hidden_states=True, return_dict=True)
    return out.hidden_states[-1].astype("float32"), out.text_embeds.astype("float32").unsqueeze(1)


def encode_image(image_encoder, images) -> paddle.Tensor:
    """CLIP ViT-L/14 ``image_embeds`` [B, 1, 768] of PIL images (``clip.clip_image_preprocess``:
    bicubic short-side resize to 224, centre crop, CLIP mean/std)."""
    from ldm.clip import clip_image_preprocess

    dtype = next(iter(image_encoder.parameters())).dtype
    pix = paddle.concat([clip_image_preprocess(_pil_to_tensor(im)) for im in images], axis=0)
    return image_encoder(pixel_values=pix.astype(dtype), return_dict=True).image_embeds.astype("float32").unsqueeze(1)


def _pil_to_tensor(image, size: Optional[Tuple[int, int]] = None) -> paddle.Tensor:
    """PIL image -> [1, 3, H, W] float32 in [0, 1], optionally resized (bilinear) to (H, W)."""
    from PIL import Image

    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return paddle.to_tensor(np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 255.0)


def effnet_batch(images, height: int, width: int) -> paddle.Tensor:
    """PIL images -> [B, 3, H, W] in [0, 1] (bilinear resize)."""
    return paddle.concat([_pil_to_tensor(im, (height, width)) for im in images], axis=0)


def to_uint8(images: paddle.Tensor) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8 (rounded)."""
    x = images.astype("float32").clip(0.0, 1.0).numpy().transpose(0, 2, 3, 1)
    return (x * 255.0 + 0.5).astype(np.uint8)


def as_batch(captions, batch_size: int, what: str) -> List[str]:
    """One caption for every image, or exactly one per image."""
    if isinstance(captions, str):
        return [captions] * batch_size
    captions = list(captions)
    if len(captions) != batch_size:
        raise ValueError(f"{len(captions)} {what}s for a batch of {batch_size}")
    return captions


# ---------------------------------------------------------------------------- sampling
def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc)


def run_gdf(gdf, model: Callable, cond: dict, uncond: dict, sampling: SamplingConfig, noise,
            shape=None, x_init=None, t_start: Optional[float] = None, desc: str = "",
            progress: bool = True, final: str = "x0", model_dtype: Optional[str] = None) -> paddle.Tensor:
    """Run the GDF sampler to the end; ``final`` "x0" (the notebook's result) or "x" (the
    sample after the last update, what diffusers' pipelines return)."""
    if final not in ("x0", "x"):
        raise ValueError(f"final must be 'x0' or 'x', got {final!r}")
    it = gdf.sample(model, cond, shape, uncond, sampler=make_sampler(sampling.sampler, gdf), x_init=x_init,
                    timesteps=sampling.steps,
                    t_start=sampling.t_start if t_start is None else t_start, cfg=sampling.cfg,
                    cfg_rho=sampling.cfg_rho, cfg_rho_per_sample=sampling.per_sample_rho,
                    shift=sampling.shift, noise=noise, model_dtype=model_dtype)
    last = None
    with paddle.no_grad():
        for last in _progress(it, sampling.steps, desc, progress):
            pass
    out = last[0] if final == "x0" else last[1]
    if not bool(paddle.isfinite(out).all()):
        hint = "; float16 overflows in Stable Cascade, use --dtype bfloat16" if model_dtype == "float16" else ""
        raise FloatingPointError(f"{desc}: the sampler produced NaN/inf (dtype {model_dtype}){hint}")
    return out


def _cast_inputs(net, dtype: str):
    def call(x, r, **kw):
        kw = {k: (v.astype(dtype) if isinstance(v, paddle.Tensor) else v) for k, v in kw.items()}
        return net(x, r, **kw)
    return call


def sample_stage_c(comps: Components, gdf, captions: List[str], negative: List[str], seed: int,
                   height: int, width: int, sampling: SamplingConfig, images=None, init_images=None,
                   strength: float = cfg_mod.IMG2IMG_STRENGTH, progress: bool = True, final: str = "x0",
                   noise=None, x_init: Optional[paddle.Tensor] = None, low_memory: bool = False) -> paddle.Tensor:
    """Stage C latents [B, 16, ceil(H/42.67), ceil(W/42.67)] (float32).

    images: PIL images for CLIP image embeddings (variation); init_images: PIL images whose
    EfficientNet latent, noised to t = strength, starts the sampler (img2img). ``noise``
    overrides the per-image seeded streams (a callable ``shape -> Tensor``)."""
    bsz = len(captions)
    hc, wc = stage_c_latent_size(height, width)
    if init_images is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    with paddle.no_grad():
        tok, te = comps.get("tokenizer"), comps.get("text_encoder")
        clip_text, clip_pooled = encode_text(tok, te, captions)
        u_text, u_pooled = encode_text(tok, te, negative)
        clip_img = None
        if low_memory:
            comps.release("tokenizer", "text_encoder")
        if images is not None:
            clip_img = encode_image(comps.get("image_encoder"), _broadcast_images(images, bsz))
            if low_memory:
                comps.release("image_encoder")
        t_start = None
        if init_images is not None:
            enc = comps.get("effnet")
            pix = effnet_batch(_broadcast_images(init_images, bsz), hc * cfg_mod.EFFNET_STRIDE, wc * cfg_mod.EFFNET_STRIDE)
            from ldm.cascade.effnet import imagenet_normalize

            latent = enc(imagenet_normalize(pix)).astype("float32")
            if low_memory:
                comps.release("effnet")
            eps = image_noise_fn(seed, bsz, NOISE_TAG_IMG2IMG)([bsz, STAGE_C_CHANNELS, hc, wc])
            x_init = gdf.diffuse(latent, epsilon=eps, t=paddle.full([bsz], strength, "float32"),
                                 shift=sampling.shift).noised
            t_start = strength
    model = comps.get("stage_c")
    u_img = paddle.zeros([bsz, 1, model.clip_img_mapper.weight.shape[0]], dtype="float32")  # Linear [in, out]
    clip_img = u_img if clip_img is None else clip_img
    cond = {"clip_text": clip_text, "clip_text_pooled": clip_pooled, "clip_img": clip_img}
    uncond = {"clip_text": u_text, "clip_text_pooled": u_pooled, "clip_img": u_img}
    noise = image_noise_fn(seed, bsz, NOISE_TAG_C) if noise is None else noise
    out = run_gdf(gdf, _cast_inputs(model, comps.dtype), cond, uncond, sampling, noise,
                  shape=[bsz, STAGE_C_CHANNELS, hc, wc], x_init=x_init, t_start=t_start, desc="Stage C",
                  progress=progress, final=final, model_dtype=comps.dtype)
    if low_memory:
        comps.release("stage_c")
    return out


def _broadcast_images(images, bsz: int):
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) == 1:
        return images * bsz
    if len(images) != bsz:
        raise ValueError(f"{len(images)} images for a batch of {bsz}")
    return images


def preview(comps: Components, latent_c: paddle.Tensor, low_memory: bool = False) -> np.ndarray:
    """Previewer RGB (8x the Stage C latent) as uint8 [B, h, w, 3]."""
    with paddle.no_grad():
        img = comps.get("previewer")(latent_c)
    if low_memory:
        comps.release("previewer")
    return to_uint8(img)


def sample_stage_b(comps: Components, gdf, latent_c: paddle.Tensor, captions: List[str], negative: List[str],
                   seed: int, height: int, width: int, sampling: SamplingConfig, progress: bool = True,
                   final: str = "x0", noise=None, x_init: Optional[paddle.Tensor] = None,
                   low_memory: bool = False) -> paddle.Tensor:
    """Stage B latents [B, 4, ceil(H/4), ceil(W/4)] conditioned on the Stage C latent."""
    bsz = len(captions)
    if latent_c.shape[0] != bsz:
        raise ValueError(f"latent_c has {latent_c.shape[0]} items for a batch of {bsz}")
    hb, wb = stage_b_latent_size(height, width)
    with paddle.no_grad():
        tok, te = comps.get("tokenizer"), comps.get("text_encoder")
        pooled = encode_text(tok, te, captions)[1]
        u_pooled = encode_text(tok, te, negative)[1]
        if low_memory:
            comps.release("tokenizer", "text_encoder")
    latent_c = latent_c.astype("float32")
    cond = {"effnet": latent_c, "clip": pooled}
    uncond = {"effnet": paddle.zeros_like(latent_c), "clip": u_pooled}
    noise = image_noise_fn(seed, bsz, NOISE_TAG_B) if noise is None else noise
    out = run_gdf(gdf, _cast_inputs(comps.get("stage_b"), comps.dtype), cond, uncond, sampling, noise,
                  shape=[bsz, STAGE_B_CHANNELS, hb, wb], x_init=x_init, desc="Stage B", progress=progress,
                  final=final, model_dtype=comps.dtype)
    if low_memory:
        comps.release("stage_b")
    return out


def decode_stage_a(comps: Components, latent_b: paddle.Tensor, low_memory: bool = False) -> paddle.Tensor:
    """Stage A decode -> [B, 3, H, W] floats clipped to [0, 1]."""
    with paddle.no_grad():
        img = comps.get("stage_a").decode(latent_b.astype("float32")).astype("float32").clip(0.0, 1.0)
    if low_memory:
        comps.release("stage_a")
    return img
