"""Text-to-image sampling with an SD v1 UNet (classifier-free guidance), and PNG writing.

Same computation as ppdiffusers/diffusers `StableDiffusionPipeline.__call__` without the safety
checker: prompt embeddings (unconditional = empty prompt), latent noise x init_noise_sigma,
scheduler loop with `scale_model_input` / `step`, guidance eps_u + g (eps_c - eps_u) when g > 1,
VAE decode of latents / scaling factor. Each image i uses latent noise from seed + i, so an image
is reproducible from the seed written in its metadata, whatever the batch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import paddle

__all__ = ["SCHEDULERS", "make_scheduler", "generate", "vae_scaling_factor", "SD_SCALING_FACTOR", "vae_scale_factor", "SD_V1_SCHEDULER_CONFIG",
           "tokenize_prompts"]

SD_SCALING_FACTOR = 0.18215  # AutoencoderKL kl-f8 of SD v1 (vae/config.json `scaling_factor`)


def vae_scaling_factor(vae) -> float:
    """The latent scaling factor of `vae` (its config's `scaling_factor`, else SD v1's 0.18215)."""
    return float(getattr(vae.config, "scaling_factor", None) or SD_SCALING_FACTOR)


SD_V1_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
}


def _scheduler_classes() -> Dict[str, type]:
    from ppdiffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                             EulerDiscreteScheduler)

    return {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
            "euler-ancestral": EulerAncestralDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}


SCHEDULERS = ("ddim", "euler", "euler-ancestral", "dpm")


def make_scheduler(name: str, config: Optional[dict] = None):
    """A ppdiffusers scheduler by short name, configured from a (training) scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    cfg = dict(SD_V1_SCHEDULER_CONFIG)
    cfg.update({k: v for k, v in (config or {}).items() if not k.startswith("_")})
    return _scheduler_classes()[name].from_config(cfg)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell: 2 ** (number of VAE blocks - 1) (8 for SD v1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tokenize_prompts(tokenizer, prompts: List[str]) -> paddle.Tensor:
    """(N, L) int64 token ids, padded to and truncated at `tokenizer.model_max_length`."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np").input_ids
    return paddle.to_tensor(np.asarray(ids, dtype=np.int64))


@paddle.no_grad()
def generate(
    unet, vae, text_encoder, tokenizer, scheduler, prompts: Sequence[str], height: int, width: int,
    guidance_scale: float = 7.5, num_inference_steps: int = 50, seed: int = 0, negative_prompt: str = "",
    callback=None,
) -> np.ndarray:
    """-> uint8 (N, height, width, 3). `callback(i, t, latents)` is called after every step."""
    f = vae_scale_factor(vae)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of the VAE factor {f}, got {height}x{width}")
    if num_inference_steps < 1:
        raise ValueError("num_inference_steps must be >= 1")
    prompts = list(prompts)
    n = len(prompts)
    cond = text_encoder(tokenize_prompts(tokenizer, prompts))[0]  # (N, L, D)
    use_cfg = guidance_scale > 1.0
    if use_cfg:
        uncond = text_encoder(tokenize_prompts(tokenizer, [negative_prompt] * n))[0]
        context = paddle.concat([uncond, cond])  # (2N, L, D)
    else:
        context = cond
    c = unet.config.in_channels
    shape = (c, height // f, width // f)
    noise = np.stack([np.random.RandomState(seed + i).standard_normal(shape) for i in range(n)]).astype(np.float32)
    scheduler.set_timesteps(num_inference_steps)
    latents = paddle.to_tensor(noise) * scheduler.init_noise_sigma  # (N, 4, h, w)
    generator = paddle.Generator().manual_seed(seed)  # ancestral samplers' per-step noise
    for i, t in enumerate(scheduler.timesteps):
        inp = paddle.concat([latents, latents]) if use_cfg else latents
        inp = scheduler.scale_model_input(inp, t)
        eps = unet(inp, t, encoder_hidden_states=context).sample
        if use_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        kwargs = {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}
        latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
        if callback is not None:
            callback(i, t, latents)
    images = vae.decode(latents / vae_scaling_factor(vae)).sample  # (N, 3, H, W) in ~[-1, 1]
    images = ((images.clip(-1, 1) + 1) * 127.5).round().numpy().transpose(0, 2, 3, 1)
    return images.astype(np.uint8)


