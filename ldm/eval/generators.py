"""Text-to-image generators for evaluation sweeps: one call signature for both families.

    generator(captions, seed, guidance_scale) -> uint8 (N, H, W, 3)

Image i of a call is sampled from seed + i (SD: `ldm.sd.sampling.generate`, numpy RandomState(seed
+ i) latents; Stable Cascade: `ldm.cascade.pipeline`, per-image streams (seed + i, stage tag)). So
caption k of a caption file gets seed + k whatever the batching, and the same initial latents at
every guidance scale (PaddleMIX `generate_images.py` does the same).

- `SDGenerator`: SD v1 UNet + VAE + CLIP text encoder (ppdiffusers), a ppdiffusers scheduler;
  the guidance scale is the classifier-free guidance of the UNet.
- `CascadeGenerator`: ModelC (Stage C) + ModelB (Stage B + A) as inference.py runs them; the
  guidance scale is Stage C's (the text guidance that matters), Stage B keeps its own `cfg_b`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from ldm.cascade import settings as cascade_settings

__all__ = ["SDGenerator", "SDSettings", "CascadeGenerator", "CascadeSettings"]


@dataclass(frozen=True)
class SDSettings:
    """Defaults: scripts/generate_sd.py's."""
    height: int = 512
    width: int = 512
    num_inference_steps: int = 50
    scheduler: str = "ddim"
    negative_prompt: str = ""


class SDGenerator:
    family = "sd"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: Optional[dict] = None,
                 settings: SDSettings = SDSettings(), source: Optional[dict] = None):
        from ldm.sd.sampling import SCHEDULERS

        if settings.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {settings.scheduler!r}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config or {})
        self.settings, self.source = settings, dict(source or {})

    @classmethod
    def from_pretrained(cls, pretrained: Optional[str], unet_path: Optional[str] = None,
                        settings: SDSettings = SDSettings(), allow_pickle: bool = False, vae_path: Optional[str] = None,
                        text_encoder_path: Optional[str] = None, tokenizer_path: Optional[str] = None,
                        scheduler_path: Optional[str] = None) -> "SDGenerator":
        """A local pipeline folder (vae/, text_encoder/, tokenizer/, scheduler/, unet/) and/or the
        components' own folders: a trained UNet folder (a checkpoint's unet/ or unet_ema/) or a
        training checkpoint folder, VAE, text encoder, tokenizer, scheduler
        (ldm.sd.loading.load_for_inference)."""
        from ldm.sd.loading import load_for_inference

        unet, vae, te, tok, sched = load_for_inference(pretrained, unet_path, allow_pickle=allow_pickle,
                                                       vae_path=vae_path, text_encoder_path=text_encoder_path,
                                                       tokenizer_path=tokenizer_path, scheduler_path=scheduler_path)
        paths = {"pretrained": pretrained, "unet": unet_path, "vae": vae_path, "text_encoder": text_encoder_path,
                 "tokenizer": tokenizer_path, "scheduler": scheduler_path}
        source = {k: os.path.abspath(v) if v else None for k, v in paths.items()}
        return cls(unet, vae, te, tok, sched, settings, source)

    def __call__(self, captions: Sequence[str], seed: int, guidance_scale: float) -> np.ndarray:
        from ldm.sd.sampling import generate, make_scheduler

        s = self.settings
        return generate(self.unet, self.vae, self.text_encoder, self.tokenizer,
                        make_scheduler(s.scheduler, self.scheduler_config), list(captions), s.height, s.width,
                        guidance_scale=guidance_scale, num_inference_steps=s.num_inference_steps, seed=seed,
                        negative_prompt=s.negative_prompt)

    def describe(self) -> dict:
        """What made the images (settings and where the networks came from), JSON-able."""
        return {"family": self.family, **asdict(self.settings), "source": self.source}


@dataclass(frozen=True)
class CascadeSettings:
    """Defaults: ldm.cascade.settings (inference.py's)."""
    height: int = cascade_settings.HEIGHT
    width: int = cascade_settings.WIDTH
    steps_c: int = cascade_settings.STAGE_C_SAMPLING.steps
    steps_b: int = cascade_settings.STAGE_B_SAMPLING.steps
    cfg_b: float = cascade_settings.STAGE_B_SAMPLING.cfg
    shift_c: float = cascade_settings.STAGE_C_SAMPLING.shift
    shift_b: float = cascade_settings.STAGE_B_SAMPLING.shift
    cfg_rho: float = cascade_settings.STAGE_C_SAMPLING.cfg_rho
    negative_prompt: str = ""


class CascadeGenerator:
    family = "cascade"

    def __init__(self, model_c, model_b, settings: CascadeSettings = CascadeSettings(), source: Optional[dict] = None):
        from ldm.cascade.pipeline import check_size

        self.height, self.width = check_size(settings.height, settings.width)
        self.model_c, self.model_b, self.settings = model_c, model_b, settings
        self.source = dict(source or {})

    def __call__(self, captions: Sequence[str], seed: int, guidance_scale: float) -> np.ndarray:
        s, captions = self.settings, list(captions)
        n = len(captions)
        _, latent_c = self.model_c.log_image(captions, height=self.height, width=self.width, cfg=guidance_scale,
                                             batch_size=n, seed=seed, steps=s.steps_c, shift=s.shift_c,
                                             cfg_rho=s.cfg_rho, negative_caption=s.negative_prompt)
        images, _ = self.model_b.log_image(latent_c, captions, height=self.height, width=self.width, batch_size=n,
                                           seed=seed, steps=s.steps_b, cfg=s.cfg_b, shift=s.shift_b,
                                           cfg_rho=s.cfg_rho, negative_caption=s.negative_prompt)
        return np.asarray(images)

    def describe(self) -> dict:
        return {"family": self.family, **asdict(self.settings), "height": self.height, "width": self.width,
                "source": self.source}
