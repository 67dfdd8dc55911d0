"""The Stable Cascade family of the demo (issue 14): the parts users normally download, made here
for the "demo" presets, and the generation call of the score script.

Every network is the project's own class in its "demo" preset (``STAGE_A_PRESETS["demo"]``,
``EFFNET_PRESETS["demo"]``, ``PREVIEWER_PRESETS["demo"]``, ``STAGE_B_PRESETS["demo"]``,
``STAGE_C_PRESETS["demo"]``: the only place their numbers live) and is saved with
``ldm.cascade.loading.save_network`` (config in the metadata), so the shipped files load through
the same loaders as the real weights (``ldm.cascade.components.demo_components``).

- CLIP text: a random, frozen ppdiffusers ``CLIPTextModelWithProjection`` (``CLIP_CONFIG``: 2
  layers, width 64, projection 64, 77 positions) with the demo's word-level tokenizer
  (``ldm.demo.sd.write_tokenizer``: one token per caption word), in a ``clip_text/`` folder as
  ``scripts/convert_other_weight.py`` writes it. Its token and position embeddings are drawn at
  std 1 (``EMBEDDING_STD``), so each position's hidden state is dominated by its own word and
  position: Stage C reads the colour, shape and background words from them (with CLIP's 0.02 the
  random layers' output dominated, captions one word apart were at cosine 0.93-0.98 at that word,
  and a Stage C trained on them ignored the text). The pooled output is then about the same for
  every caption (cosine > 0.99): Stage B, which only sees it, works from the Stage C latent.
- Stage A (f4 VQGAN): trained as a plain autoencoder (``train_stage_a``: L1 + L2 on random crops of
  rendered shapes). Stage B trains on and the pipeline decodes the unquantised latent (as the
  original's train_b.py), so the codebook is never used; ``scale_factor`` is set afterwards to the
  std of the latents of the data (Stage B then sees unit-variance latents, as SD's 0.18215).
- EfficientNet encoder + Previewer (``train_encoder_previewer``): trained together as an
  autoencoder, image -> 16-channel latent at stride 32 -> Previewer RGB at 1/4 of the image side,
  L1 + L2 against the image box-downsampled 4x, at the input sizes Stage B and Stage C use
  (128-256 px). Batch statistics train every BatchNorm (then frozen, as the real encoder's), so the
  mapper's affine-free BatchNorm ends with unit-variance latent channels: the Stage C latent.
- Stage B and Stage C are trained by the project's trainers (``scripts/train_stage_b_trainer.py``,
  ``train_stage_c_trainer.py`` with ``--model_version demo``), see ``scripts/train_demo.sh``.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence

import numpy as np

from ldm.demo.sd import DEMO_CLIP
from ldm.utils import get_logger

logger = get_logger("ldm.demo.cascade")

__all__ = ["write_clip_text", "train_stage_a", "train_encoder_previewer", "generate", "CLIP_PROJECTION"]

CLIP_PROJECTION = 64  # pooled text width = STAGE_B/C_PRESETS["demo"] c_clip / c_clip_text_pooled
# the demo CLIP text encoder: the word tokenizer's ids (ldm.demo.sd.DEMO_CLIP), width 64 (the "demo"
# presets' c_clip_text / c_clip), CLIP's 77 positions
CLIP_CONFIG = dict({k: DEMO_CLIP[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")},
                   hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77)
EMBEDDING_STD = 1.0  # init std of its token and position embeddings (write_clip_text)
# captions are padded to MAX_LENGTH tokens (bos, 7 words, eos, 1 pad; the clip_text folder's
# tokenizer_config.json, read by the loaders; the trainers get --model_max_length MAX_LENGTH): at
# 77, 68 padding positions, the same for every caption, would fill Stage C's text attention
MAX_LENGTH = 10
IMAGE_SIZE = 256  # the demo's images (settings.TINY_SIZE, the presets' default size)
ENCODER_SIDES = (128, 160, 192, 224, 256)  # Stage B's EfficientNet inputs at 256 px (factor 0.5-1), Stage C's 192


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _render_batch(rng: np.random.Generator, n: int, size: int, crop: Optional[int] = None) -> np.ndarray:
    """(n, 3, s, s) float32 in [0, 1]: random trained combinations rendered at `size`, randomly
    cropped to `crop` when given."""
    from ldm.demo.shapes import combinations, render

    combos = combinations(held_out=False)
    out = []
    for _ in range(n):
        img = np.asarray(render(*combos[int(rng.integers(len(combos)))], size=size, rng_or_seed=rng), np.float32)
        if crop:
            top, left = (int(v) for v in rng.integers(0, size - crop + 1, size=2))
            img = img[top:top + crop, left:left + crop]
        out.append(img.transpose(2, 0, 1) / 255.0)
    return np.stack(out).astype(np.float32)


def _optimizer(parameters, learning_rate: float, steps: int):
    import paddle

    schedule = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate, T_max=max(1, steps), eta_min=learning_rate * 0.05)
    return paddle.optimizer.AdamW(schedule, parameters=parameters, weight_decay=0.0), schedule


def _fit(name: str, batch_loss, parameters, steps: int, learning_rate: float, log_every: int) -> List[float]:
    """`steps` AdamW steps (cosine decay to 5%) on `batch_loss()`; returns the losses."""
    opt, schedule = _optimizer(parameters, learning_rate, steps)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paddle's BatchNorm warns on every training call
        for step in range(int(steps)):
            loss = batch_loss()
            loss.backward()
            opt.step()
            opt.clear_grad()
            schedule.step()
            losses.append(float(loss))
            if log_every and (step + 1) % log_every == 0:
                logger.info("%s step %d/%d loss %.4f", name, step + 1, steps, np.mean(losses[-log_every:]))
    return losses


def _reconstruction_loss(pred, target):
    import paddle.nn.functional as F

    return F.mse_loss(pred, target) + F.l1_loss(pred, target)


def _check_steps(steps: int, batch_size: int):
    if int(steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")


# ---------------------------------------------------------------------------------------------
# CLIP text (random, frozen)
# ---------------------------------------------------------------------------------------------
def write_clip_text(folder: str, seed: int = 0) -> str:
    """``folder`` = a CLIP text folder (config.json, model.safetensors, vocab.json, merges.txt) of
    a random CLIPTextModelWithProjection of ``CLIP_CONFIG``; loads with ``ldm.clip.load_clip_text``
    and ``load_tokenizer``. Paddle's init (``seed``), then the token and position embeddings redrawn
    from N(0, EMBEDDING_STD^2) (numpy, [seed, 0xC7]): at CLIP's 0.02 they are small against the
    random layers' output and every position holds about the same mixture of the caption's words
    (two captions at cosine 0.93-0.98 at the word where they differ, measured); at 1.0 each
    position's output is dominated by its own word + position (cosine ~0.45-0.6 there)."""
    import json

    import paddle
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm.demo.sd import save_model, write_tokenizer

    write_tokenizer(folder)
    config_file = os.path.join(folder, "tokenizer_config.json")  # captions are padded to MAX_LENGTH tokens
    with open(config_file, encoding="utf-8") as f:
        tok_config = json.load(f)
    tok_config["model_max_length"] = MAX_LENGTH
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(tok_config, f)
    paddle.seed(seed)
    config = CLIPTextConfig(**CLIP_CONFIG, projection_dim=CLIP_PROJECTION)
    config.architectures = ["CLIPTextModelWithProjection"]
    model = CLIPTextModelWithProjection(config)
    rng = np.random.default_rng([seed, 0xC7])
    emb = model.text_model.embeddings
    for w in (emb.token_embedding.weight, emb.position_embedding.weight):
        w.set_value(paddle.to_tensor(rng.standard_normal(w.shape).astype(np.float32) * EMBEDDING_STD))
    save_model(model, folder, "model.safetensors", "clip_text")
    return folder


# ---------------------------------------------------------------------------------------------
# Stage A
# ---------------------------------------------------------------------------------------------
def train_stage_a(steps: int = 600, batch_size: int = 8, crop: int = 128, learning_rate: float = 2e-3,
                  seed: int = 0, log_every: int = 50):
    """A StageA of the demo preset trained to reconstruct crops of rendered shapes, its
    ``scale_factor`` set to the std of its latents over 64 full images. Returns (net, losses)."""
    import paddle

    from ldm.cascade.stage_a import STAGE_A_PRESETS, StageA

    _check_steps(steps, batch_size)
    paddle.seed(seed)
    rng = np.random.default_rng([seed, 0xA])
    net = StageA(STAGE_A_PRESETS["demo"])
    net.train()

    def batch_loss():
        x = paddle.to_tensor(_render_batch(rng, batch_size, IMAGE_SIZE, crop))
        return _reconstruction_loss(net(x)[0], x)

    losses = _fit("stage A", batch_loss, net.parameters(), steps, learning_rate, log_every)
    net.eval()
    with paddle.no_grad():
        x = paddle.to_tensor(_render_batch(np.random.default_rng([seed, 0xA, 1]), 64, IMAGE_SIZE))
        std = float(net.encode(x)[0].std()) * net.scale_factor
    out = StageA(net.config.replace(scale_factor=std))
    out.set_state_dict(net.state_dict())
    out.eval()
    logger.info("stage A: latent std %.4f -> scale_factor", std)
    return out, losses


# ---------------------------------------------------------------------------------------------
# EfficientNet encoder + Previewer
# ---------------------------------------------------------------------------------------------
def train_encoder_previewer(steps: int = 3600, batch_size: int = 8, learning_rate: float = 3e-3, seed: int = 0,
                            sides: Sequence[int] = ENCODER_SIDES, log_every: int = 50):
    """(EfficientNetEncoder, Previewer) of the demo presets trained together: the Previewer of the
    encoder's latent reconstructs the image box-downsampled 4x, at input sides drawn from `sides`
    (multiples of 32). Returns (encoder, previewer, losses), both frozen in eval mode."""
    import paddle
    import paddle.nn as nn
    import paddle.nn.functional as F

    from ldm.cascade.effnet import EFFNET_PRESETS, EfficientNetEncoder, imagenet_normalize
    from ldm.cascade.previewer import PREVIEWER_PRESETS, Previewer

    _check_steps(steps, batch_size)
    if not sides or any(int(s) % 32 or int(s) < 32 for s in sides):
        raise ValueError(f"sides must be multiples of 32, got {sides}")
    paddle.seed(seed)
    rng = np.random.default_rng([seed, 0xE])
    enc, prev = EfficientNetEncoder(EFFNET_PRESETS["demo"]), Previewer(PREVIEWER_PRESETS["demo"])
    frozen_stats = [m for m in enc.sublayers() if isinstance(m, nn.BatchNorm2D)]
    for m in frozen_stats:  # the encoder's BatchNorms run on their stored statistics; train them first
        m._use_global_stats = False
    enc.train()
    prev.train()

    def batch_loss():
        side = int(sides[int(rng.integers(len(sides)))])
        x = paddle.to_tensor(_render_batch(rng, batch_size, side))
        pred = prev(enc(imagenet_normalize(x)))  # (B, 3, side / 4, side / 4)
        return _reconstruction_loss(pred, F.avg_pool2d(x, 4))

    try:
        losses = _fit("encoder + previewer", batch_loss, enc.parameters() + prev.parameters(), steps, learning_rate,
                      log_every)
    finally:
        for m in frozen_stats:
            m._use_global_stats = True
    enc.eval()
    prev.eval()
    for p in enc.parameters() + prev.parameters():
        p.stop_gradient = True
    return enc, prev, losses


# ---------------------------------------------------------------------------------------------
# generation (scripts/demo_score.py --family cascade, tests)
# ---------------------------------------------------------------------------------------------
_MODELS = {}


def generate(caption: str, n: int = 1, seed: int = 0, weights_path: Optional[str] = None,
             **sampling) -> List[np.ndarray]:
    """``n`` uint8 (256, 256, 3) images of ``caption`` from the demo weights (``weights_path``,
    default the shipped assets/demo/cascade): image i from seed + i, exactly what
    ``python inference.py --preset demo --caption ... --seed ...`` writes with the same settings.
    ``sampling``: steps_c, cfg_c, shift_c, steps_b, cfg_b, shift_b (default: inference.py's)."""
    import dataclasses

    from ldm.cascade import components as cp
    from ldm.cascade import settings as st
    from ldm.model_b import ModelB
    from ldm.model_c import ModelC

    unknown = set(sampling) - {f"{k}_{s}" for k in ("steps", "cfg", "shift") for s in "cb"}
    if unknown:
        raise ValueError(f"unknown sampling settings {sorted(unknown)}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    key = os.path.abspath(weights_path or st.DEMO_WEIGHTS_PATH)
    if key not in _MODELS:
        cfg = dataclasses.replace(st.DEMO, weights_path=key)
        comps = cp.demo_components(weights_path=key)
        _MODELS.clear()
        _MODELS[key] = (ModelC(cfg, progress=False, components=comps), ModelB(cfg, progress=False, components=comps))
    model_c, model_b = _MODELS[key]
    c, b = st.STAGE_C_SAMPLING, st.STAGE_B_SAMPLING
    size = st.TINY_SIZE
    _, latent_c = model_c.log_image(caption, height=size, width=size, batch_size=int(n), seed=int(seed),
                                    steps=sampling.get("steps_c", c.steps), cfg=sampling.get("cfg_c", c.cfg),
                                    shift=sampling.get("shift_c", c.shift), cfg_rho=c.cfg_rho, t_start=st.DEMO.t_start)
    images, _ = model_b.log_image(latent_c, caption, seed=int(seed), batch_size=int(n), height=size, width=size,
                                  steps=sampling.get("steps_b", b.steps), cfg=sampling.get("cfg_b", b.cfg),
                                  shift=sampling.get("shift_b", b.shift), cfg_rho=b.cfg_rho, t_start=st.DEMO.t_start)
    return list(images)
