"""ModelC: text (and optionally an image) -> Stage C latent + a Previewer image.

The seed's public API (stable_cascade_README.md): ``ModelC(); model.eval();
image, latent_c = model.log_image(caption, seed=seed, batch_size=batch_size)``. The work is done
by ``ldm.cascade.pipeline``; this class only holds the settings and the components.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import paddle

from ldm.cascade import settings as cfg_mod
from ldm.cascade.settings import CascadeConfig, SamplingConfig
from ldm.cascade import components as cp
from ldm.cascade import pipeline as pl
from ldm.cascade.gdf import stable_cascade_gdf

Captions = Union[str, Sequence[str]]


class ModelC:
    """Tokenizer + CLIP bigG text encoder, optional CLIP ViT-L image encoder, Stage C,
    EfficientNet (img2img only), Previewer and the GDF.

    Args:
        config: where the weights are and which versions/dtype (default
            ``ldm.cascade.settings.CascadeConfig()``; ``inference.py`` passes the one of the
            top-level ``config.py``).
        preset: None (weights from ``config.weights_path``) or "tiny" (random tiny networks,
            offline, for a first run and tests).
        low_memory: build each network when needed and free it right after its stage.
        progress: show a tqdm bar while sampling.
        components: a ready ``components.Components`` (tests, custom networks).
    """

    def __init__(self, config: Optional[CascadeConfig] = None, preset: Optional[str] = None,
                 low_memory: bool = False, progress: bool = True, components: Optional[cp.Components] = None):
        self.config = config or CascadeConfig()
        self.low_memory = bool(low_memory)
        self.progress = bool(progress)
        self.components = components or cp.shared_components(self.config, preset, cp.NEEDED_C)
        self.gdf = stable_cascade_gdf()

    def eval(self) -> "ModelC":
        """Kept for the seed's API: every network is always in eval mode here."""
        return self

    def log_image(self, caption: Captions, height: int = cfg_mod.HEIGHT, width: int = cfg_mod.WIDTH,
                  cfg: float = cfg_mod.STAGE_C_SAMPLING.cfg, batch_size: int = 1, seed: int = cfg_mod.SEED,
                  steps: int = cfg_mod.STAGE_C_SAMPLING.steps, shift: float = cfg_mod.STAGE_C_SAMPLING.shift,
                  cfg_rho: float = cfg_mod.STAGE_C_SAMPLING.cfg_rho, negative_caption: Captions = "",
                  image=None, init_image=None, strength: float = cfg_mod.IMG2IMG_STRENGTH,
                  per_sample_rho: bool = True, final: str = "x0", noise=None,
                  x_init: Optional[paddle.Tensor] = None, t_start: float = 1.0) -> Tuple[np.ndarray, paddle.Tensor]:
        """Sample Stage C for ``batch_size`` images of ``caption`` (a string or one per image). The
        first arguments keep the order of the seed's (PaddleMIX) ModelC.log_image(caption, height,
        width, cfg, batch_size, seed, steps).

        image: PIL image(s) whose CLIP embedding conditions the result (image variation);
        init_image: PIL image(s) to start from (img2img, ``strength`` in (0, 1] = how much of the
        schedule is re-run). Image i uses seed + i. ``noise``/``x_init``/``t_start``/``final``
        expose the sampler for tests (see ``pipeline.run_gdf``).

        Returns (previews uint8 [B, 8*hc, 8*wc, 3], latent_c float32 [B, 16, hc, wc]) with
        hc = ceil(height / 42.67).
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        height, width = pl.check_size(height, width)
        captions = pl.as_batch(caption, int(batch_size), "caption")
        negative = pl.as_batch(negative_caption, int(batch_size), "negative caption")
        sampling = SamplingConfig(steps=int(steps), cfg=float(cfg), shift=float(shift), cfg_rho=float(cfg_rho),
                                  t_start=float(t_start), per_sample_rho=per_sample_rho)
        latent_c = pl.sample_stage_c(self.components, self.gdf, captions, negative, int(seed), height, width,
                                     sampling, images=image, init_images=init_image, strength=strength,
                                     progress=self.progress, final=final, noise=noise, x_init=x_init,
                                     low_memory=self.low_memory)
        return pl.preview(self.components, latent_c, self.low_memory), latent_c
