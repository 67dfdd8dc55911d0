"""ModelB: Stage C latent + caption -> Stage B latent -> Stage A pixels.

The seed's public API (stable_cascade_README.md): ``ModelB(); model_b.eval();
image_b, latent_b = model_b.log_image(latent_c, caption, seed=seed, batch_size=batch_size)``;
``image_b`` iterates over uint8 HxWx3 arrays. The work is done by ``ldm.cascade.pipeline``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import paddle

from ldm.cascade import settings as cfg_mod
from ldm.cascade.settings import CascadeConfig, SamplingConfig
from ldm.cascade import components as cp
from ldm.cascade import pipeline as pl
from ldm.cascade.gdf import stable_cascade_gdf
from ldm.model_c import Captions


class ModelB:
    """Tokenizer + CLIP bigG text encoder (pooled embedding), Stage B, Stage A and the GDF.
    Arguments as ``ModelC``; a ModelC and a ModelB with the same config share one text encoder."""

    def __init__(self, config: Optional[CascadeConfig] = None, preset: Optional[str] = None,
                 low_memory: bool = False, progress: bool = True, components: Optional[cp.Components] = None):
        self.config = config or CascadeConfig()
        self.low_memory = bool(low_memory)
        self.progress = bool(progress)
        self.components = components or cp.shared_components(self.config, preset, cp.NEEDED_B)
        self.gdf = stable_cascade_gdf()

    def eval(self) -> "ModelB":
        """Kept for the seed's API: every network is always in eval mode here."""
        return self

    def log_image(self, latent_c: paddle.Tensor, caption: Captions, height: Optional[int] = None,
                  width: Optional[int] = None, batch_size: Optional[int] = None, seed: int = cfg_mod.SEED,
                  steps: int = cfg_mod.STAGE_B_SAMPLING.steps, cfg: float = cfg_mod.STAGE_B_SAMPLING.cfg,
                  shift: float = cfg_mod.STAGE_B_SAMPLING.shift, cfg_rho: float = cfg_mod.STAGE_B_SAMPLING.cfg_rho,
                  negative_caption: Captions = "", per_sample_rho: bool = True,
                  final: str = "x0", noise=None, x_init: Optional[paddle.Tensor] = None,
                  t_start: float = 1.0, return_float: bool = False) -> Tuple[np.ndarray, paddle.Tensor]:
        """Sample Stage B on ``latent_c`` [B, 16, hc, wc] and decode with Stage A. The first
        arguments keep the order of the seed's (PaddleMIX) ModelB.log_image(latent, caption,
        height, width, batch_size, seed, steps).

        height/width default to the size ModelC used (the multiple of 64 whose Stage C latent
        is hc x wc). Image i uses seed + i; ``noise``/``x_init``/``t_start``/``final`` as ModelC. Returns (images uint8 [B, H, W, 3] - float32
        [B, 3, H, W] in [0, 1] with ``return_float`` - , latent_b float32 [B, 4, H/4, W/4]).
        """
        if latent_c.ndim != 4 or latent_c.shape[1] != pl.STAGE_C_CHANNELS:
            raise ValueError(f"latent_c must be [B, 16, h, w], got {list(latent_c.shape)}")
        bsz = latent_c.shape[0] if batch_size is None else int(batch_size)
        if bsz != latent_c.shape[0]:
            raise ValueError(f"batch_size {bsz} but latent_c holds {latent_c.shape[0]} latents")
        dh, dw = pl.size_from_stage_c(latent_c.shape[2], latent_c.shape[3])
        height, width = pl.check_size(height or dh, width or dw)
        sampling = SamplingConfig(steps=int(steps), cfg=float(cfg), shift=float(shift), cfg_rho=float(cfg_rho),
                                  t_start=float(t_start), per_sample_rho=per_sample_rho)
        captions = pl.as_batch(caption, bsz, "caption")
        negative = pl.as_batch(negative_caption, bsz, "negative caption")
        latent_b = pl.sample_stage_b(self.components, self.gdf, latent_c, captions, negative, int(seed), height,
                                     width, sampling, progress=self.progress, final=final, noise=noise,
                                     x_init=x_init, low_memory=self.low_memory)
        pixels = pl.decode_stage_a(self.components, latent_b, self.low_memory)
        return (pixels if return_float else pl.to_uint8(pixels)), latent_b
