"""The offline ``tiny`` preset: every Stable Cascade component with small random weights.

Nothing is downloaded or read from a weights folder: a byte-level CLIP tokenizer (the 256 byte
symbols, the same with ``</w>``, ``<|startoftext|>`` and ``<|endoftext|>``, no merges; written
to a temporary folder and read back), a 2-layer CLIP text and vision model with projection 32,
and the ``tiny`` presets of Stage C / Stage B / Stage A / Previewer (the EfficientNet encoder
keeps its real architecture, built only for img2img). Parameters the reference initialises to
zero get small random values, so the tiny networks respond to their conditioning. Each network
is initialised from its own fixed seed, so the preset is identical in every process; the
caller's global Paddle RNG state is restored afterwards.
"""
from __future__ import annotations

import tempfile
from typing import Callable

import numpy as np
import paddle

from ldm.cascade import effnet, previewer, stage_a, stage_b, stage_c
from ldm.clip import load_tokenizer, write_tiny_clip_tokenizer
from ldm.utils import get_logger

TINY_SEED = 1234
TINY_WIDTH = 32  # CLIP hidden/projection size = Stage B/C tiny c_clip_* (ldm.cascade.stage_c/stage_b)
TINY_MAX_LENGTH = 77
TINY_CLIP = dict(hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=TINY_WIDTH, hidden_act="quick_gelu")
TINY_VISION = dict(image_size=224, patch_size=32)  # the pipeline feeds 224 x 224 crops


def _seeded(offset: int, build: Callable[[], object]) -> Callable[[], object]:
    """Run ``build`` under paddle.seed(TINY_SEED + offset), then restore the global RNG."""
    def run():
        state = paddle.get_rng_state()
        try:
            paddle.seed(TINY_SEED + offset)
            net = build()
        finally:
            paddle.set_rng_state(state)
        return net
    return run


def _fill_zero_init(net, offset: int, std: float = 0.05):
    """Replace the parameters the reference initialises to zero (output convs, mappers, GRN
    gamma/beta) with small seeded normals: otherwise a random network ignores its conditioning."""
    rng = np.random.default_rng(TINY_SEED + offset)
    for name, p in net.named_parameters():
        if name.endswith(("_mean", "_variance")) or float(p.abs().max()) != 0.0:
            continue
        p.set_value(rng.normal(0.0, std, p.shape).astype(np.float32))
    return net


def tiny_tokenizer():
    """The 514-token byte-level CLIP tokenizer (``clip.write_tiny_clip_tokenizer``), via a
    temporary folder that is removed once the tokenizer has read it."""
    with tempfile.TemporaryDirectory() as d:
        write_tiny_clip_tokenizer(d, max_length=TINY_MAX_LENGTH)
        return load_tokenizer(d, max_length=TINY_MAX_LENGTH)


def tiny_text_encoder():
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=514, max_position_embeddings=TINY_MAX_LENGTH, bos_token_id=512,
                         eos_token_id=513, pad_token_id=513, **TINY_CLIP)
    return CLIPTextModelWithProjection(cfg)


def tiny_image_encoder():
    from ppdiffusers.transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP, **TINY_VISION))


def tiny_builders(dtype: str = "float32") -> dict:
    """Builders of all eight components of the tiny preset (each network from its own seed), for
    ``ldm.cascade.components.Components``."""
    if dtype != "float32":
        raise ValueError(f"the tiny preset runs in float32 only, got {dtype}")
    get_logger("ldm.cascade").warning("preset 'tiny': random weights, the images are noise (a smoke test; "
                                      "see the README's weights section for the real model)")

    builders = {
        "tokenizer": tiny_tokenizer,
        "text_encoder": _seeded(1, tiny_text_encoder),
        "image_encoder": _seeded(2, tiny_image_encoder),
        "stage_c": _seeded(3, lambda: _fill_zero_init(stage_c.StageC_tiny(), 3)),
        "stage_b": _seeded(4, lambda: _fill_zero_init(stage_b.StageB_tiny(), 4)),
        "stage_a": _seeded(5, lambda: _fill_zero_init(stage_a.StageA_tiny(), 5)),
        "effnet": _seeded(6, effnet.EfficientNetEncoder),
        "previewer": _seeded(7, lambda: _fill_zero_init(previewer.Previewer_tiny(), 7)),
    }
    return builders
