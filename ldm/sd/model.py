"""Stable Diffusion v1 as one paddle Layer whose `forward` returns the training loss.

Training step (Rombach et al. 2022; the SD v1 recipe of diffusers `train_text_to_image.py` and
PaddleMIX `examples/stable_diffusion/sd/model.py`, facts only):
frozen VAE (eval, no grad) -> latents x scaling factor; noise (+ optional per-channel offset);
uniform timesteps; optional input perturbation; epsilon or v target; optional per-sample Min-SNR
weights (`ldm/sd/diffusion.py`). The text encoder is frozen unless `train_text_encoder`.
Captions arrive raw (the `ldm.data` sample schema): the step replaces each by "" with probability
`caption_dropout` (SD v1: 10%, what classifier-free guidance relies on) using this Layer's own
numpy generator seeded by (seed, rank), then tokenizes them (pad/truncate to the tokenizer's
`model_max_length`). The generator state is `train_state()` / `set_train_state()` (JSON), as in
the Stage C Layer, so a resumed run can continue the same draws.

The Layer also implements the hooks of the generic trainer pieces in `ldm/train/`:
`param_groups()`, `ema_parameters()`, `save_ema()/load_ema()`, `save_trained()/load_trained()`
and `log_images()`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import paddle
import paddle.nn as nn

from ldm.sd.diffusion import DDPMSchedule, training_terms, weighted_mse
from ldm.sd.sampling import SD_SCALING_FACTOR, SD_V1_SCHEDULER_CONFIG, tokenize_prompts, vae_scaling_factor
from ldm.utils import get_logger
from ldm.weights import assign_state_dict, iter_state_dict, save_safetensors, weights_metadata

logger = get_logger("ldm.sd.model")

__all__ = ["StableDiffusionModel", "DEFAULT_VALIDATION_PROMPTS", "SD_SCALING_FACTOR", "UNET_WEIGHTS", "UNET_EMA_DIR"]

UNET_WEIGHTS = "diffusion_paddle_model.safetensors"  # ppdiffusers' Paddle safetensors file name
UNET_EMA_DIR = "unet_ema"
RNG_TAG = 0x5D  # mixed into the step generator's seed (the Stage C Layer uses 0x5C)
# a full checkpoint (only_save_updated_model=False) is a StableDiffusionPipeline folder
PIPELINE_INDEX = {
    "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
    "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
    "scheduler": ["ppdiffusers", "DDPMScheduler"], "text_encoder": ["ppdiffusers.transformers", "CLIPTextModel"],
    "tokenizer": ["ppdiffusers.transformers", "CLIPTokenizer"], "unet": ["ppdiffusers", "UNet2DConditionModel"],
    "vae": ["ppdiffusers", "AutoencoderKL"],
}
DEFAULT_VALIDATION_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a little girl dances in the cherry blossom rain",
    "a red apple on a wooden table",
    "a watercolor painting of a lighthouse at sunset",
)


def _find_weights(folder: str) -> str:
    for name in (UNET_WEIGHTS, "model.safetensors", "model_state.pdparams"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no Paddle weight file ({UNET_WEIGHTS}, model.safetensors, model_state.pdparams) in {folder}")


class StableDiffusionModel(nn.Layer):
    """UNet + frozen VAE + (frozen or trained) CLIP text encoder; forward(pixel_values, caption) -> loss."""

    def __init__(
        self,
        unet: nn.Layer,
        vae: nn.Layer,
        text_encoder: nn.Layer,
        tokenizer=None,
        scheduler_config: Optional[dict] = None,
        prediction_type: str = "epsilon",
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        snr_gamma: Optional[float] = None,
        train_text_encoder: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        rank: int = 0,
    ):
        super().__init__()
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"UNet in_channels {unet.config.in_channels} != VAE latent_channels {vae.config.latent_channels}"
            )
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"UNet cross_attention_dim {unet.config.cross_attention_dim} != text encoder hidden_size "
                f"{text_encoder.config.hidden_size}"
            )
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config or {})
        self.scheduler_config["prediction_type"] = prediction_type
        self.schedule = DDPMSchedule.from_config(self.scheduler_config)
        self.register_buffer(
            "alphas_cumprod", paddle.to_tensor(self.schedule.alphas_cumprod()), persistable=False
        )  # (T,)
        self.prediction_type = prediction_type
        self.noise_offset, self.input_perturbation, self.snr_gamma = noise_offset, input_perturbation, snr_gamma
        self.train_text_encoder = train_text_encoder
        self.caption_dropout = float(caption_dropout)
        self.seed, self.rank = int(seed), int(rank)
        self.rng = np.random.default_rng([self.seed, self.rank, RNG_TAG])
        self.last_captions: Optional[List[str]] = None  # the captions of the latest step, after dropout
        self.scaling_factor = vae_scaling_factor(vae)
        for p in self.vae.parameters():
            p.stop_gradient = True
        for p in self.text_encoder.parameters():
            p.stop_gradient = not train_text_encoder
        self.train()

    # ------------------------------------------------------------------------------------------
    def train(self):
        super().train()
        self.vae.eval()  # frozen: no dropout / no statistics updates
        if not self.train_text_encoder:
            self.text_encoder.eval()
        return self

    @paddle.no_grad()
    def encode_latents(self, pixel_values: paddle.Tensor, sample: bool = True) -> paddle.Tensor:
        """(B,3,R,R) in [-1,1] -> (B,4,R/8,R/8) scaled latents."""
        dist = self.vae.encode(pixel_values).latent_dist
        z = dist.sample() if sample else dist.mode()
        return z * self.scaling_factor

    def encode_text(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        """(B,L) int64 -> (B,L,D) last hidden state."""
        if self.train_text_encoder:
            return self.text_encoder(input_ids)[0]
        with paddle.no_grad():
            return self.text_encoder(input_ids)[0]

    def drop_captions(self, captions: Sequence[str]) -> List[str]:
        """Each caption replaced by "" with probability `caption_dropout` (this Layer's generator)."""
        keep = self.rng.random(len(captions)) >= self.caption_dropout
        return [str(c) if k else "" for c, k in zip(captions, keep)]

    def tokenize(self, captions: Sequence[str]) -> paddle.Tensor:
        """(B,) str -> (B, L) int64 token ids."""
        if self.tokenizer is None:
            raise ValueError("StableDiffusionModel needs a tokenizer to train on captions")
        return tokenize_prompts(self.tokenizer, list(captions))

    def forward(self, pixel_values: paddle.Tensor, caption: Sequence[str], **unused) -> paddle.Tensor:
        if len(caption) != pixel_values.shape[0]:
            raise ValueError(f"{len(caption)} captions for {pixel_values.shape[0]} images")
        self.last_captions = self.drop_captions(caption)
        input_ids = self.tokenize(self.last_captions)  # (B, L)
        latents = self.encode_latents(pixel_values)  # (B, 4, h, w)
        b, c = latents.shape[:2]
        noise = paddle.randn(latents.shape, dtype=latents.dtype)
        offset = paddle.randn([b, c, 1, 1], dtype=latents.dtype) if self.noise_offset > 0 else None
        perturb = paddle.randn(latents.shape, dtype=latents.dtype) if self.input_perturbation > 0 else None
        timesteps = paddle.randint(0, self.schedule.num_train_timesteps, [b], dtype="int64")  # (B,)
        terms = training_terms(
            latents, noise, timesteps, self.alphas_cumprod, self.prediction_type,
            self.noise_offset, offset, self.input_perturbation, perturb, self.snr_gamma,
        )
        context = self.encode_text(input_ids)  # (B, L, D)
        pred = self.unet(terms.noisy_latents, timesteps, encoder_hidden_states=context).sample  # (B, 4, h, w)
        return weighted_mse(pred, terms.target, terms.weights)

    # ------------------------------------------------------------------ hooks for ldm/train
    def train_state(self) -> dict:
        """This Layer's generator state (JSON-able), saved per rank in every checkpoint."""
        return {"rng": self.rng.bit_generator.state}

    def set_train_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def param_groups(self) -> Dict[str, List]:
        """Trainable parameters by group name ('unet', 'text_encoder') as (name, param) lists."""
        groups = {"unet": [(f"unet.{n}", p) for n, p in self.unet.named_parameters()]}
        if self.train_text_encoder:
            groups["text_encoder"] = [(f"text_encoder.{n}", p) for n, p in self.text_encoder.named_parameters()]
        return groups

    def ema_parameters(self) -> Dict[str, paddle.Tensor]:
        """The parameters an EMA follows: the UNet's, by state-dict name."""
        return dict(self.unet.named_parameters())

    def save_ema(self, checkpoint_dir: str, shadow: Dict[str, paddle.Tensor]) -> None:
        """EMA UNet as `unet_ema/` (loadable by UNet2DConditionModel.from_pretrained)."""
        out = os.path.join(checkpoint_dir, UNET_EMA_DIR)
        os.makedirs(out, exist_ok=True)
        state = {k: v.numpy() for k, v in self.unet.state_dict().items()}
        state.update({k: v.numpy() for k, v in shadow.items()})
        save_safetensors(state, os.path.join(out, UNET_WEIGHTS), metadata=weights_metadata("sd_unet"))
        self.unet.save_config(out)

    def load_ema(self, checkpoint_dir: str) -> Optional[Dict[str, np.ndarray]]:
        folder = os.path.join(checkpoint_dir, UNET_EMA_DIR)
        if not os.path.isdir(folder):
            return None
        names = set(self.ema_parameters())
        return {k: v for k, v in iter_state_dict(_find_weights(folder)) if k in names}

    def save_trained(self, output_dir: str, only_updated: bool = True) -> None:
        """unet/ (+ text_encoder/ when trained) + scheduler/; with only_updated=False also vae/,
        text_encoder/, tokenizer/ and model_index.json: a StableDiffusionPipeline folder."""
        self.unet.save_pretrained(os.path.join(output_dir, "unet"))
        if self.train_text_encoder or not only_updated:
            self.text_encoder.save_pretrained(os.path.join(output_dir, "text_encoder"), safe_serialization=True)
        if not only_updated:
            self.vae.save_pretrained(os.path.join(output_dir, "vae"))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))
            with open(os.path.join(output_dir, "model_index.json"), "w", encoding="utf-8") as f:
                json.dump(PIPELINE_INDEX, f, indent=2)
        sched = os.path.join(output_dir, "scheduler")
        os.makedirs(sched, exist_ok=True)
        cfg = {"_class_name": "DDPMScheduler", **SD_V1_SCHEDULER_CONFIG, **dataclasses.asdict(self.schedule),
               "prediction_type": self.prediction_type}
        with open(os.path.join(sched, "scheduler_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)

    def load_trained(self, checkpoint_dir: str) -> None:
        """Restore what `save_trained` wrote (UNet, and the text encoder when it is trained)."""
        unet_dir = os.path.join(checkpoint_dir, "unet")
        assign_state_dict(self.unet, _find_weights(unet_dir), where=unet_dir)
        if self.train_text_encoder:
            te_dir = os.path.join(checkpoint_dir, "text_encoder")
            if not os.path.isdir(te_dir):
                raise FileNotFoundError(f"{checkpoint_dir} has no text_encoder/ but --train_text_encoder is set")
            from ldm.sd.loading import load_text_encoder  # strict, never unpickles by default

            self.text_encoder.set_state_dict(load_text_encoder(te_dir).state_dict())
        logger.info("restored trained weights from %s", checkpoint_dir)

    @paddle.no_grad()
    def log_images(
        self,
        pixel_values: Optional[paddle.Tensor] = None,
        prompts: Sequence[str] = DEFAULT_VALIDATION_PROMPTS,
        guidance_scales: Sequence[float] = (1.0, 7.5),
        num_inference_steps: int = 50,
        seed: int = 0,
        resolution: Optional[int] = None,
    ) -> Dict[str, np.ndarray]:
        """Images to log: {tag: uint8 (H, W, 3)}: samples per guidance scale + VAE reconstructions."""
        from ldm.sd.sampling import generate, make_scheduler, vae_scale_factor

        was_training = self.training
        self.eval()
        out = {}
        try:
            size = resolution or (pixel_values.shape[-1] if pixel_values is not None
                                  else vae_scale_factor(self.vae) * self.unet.config.sample_size)
            for g in guidance_scales:
                images = generate(self.unet, self.vae, self.text_encoder, self.tokenizer,
                                  make_scheduler("ddim", self.scheduler_config), list(prompts), size, size,
                                  guidance_scale=g, num_inference_steps=num_inference_steps, seed=seed)
                out[f"samples/guidance_{g:g}"] = np.concatenate(list(images), axis=1)  # prompts side by side
            if pixel_values is not None:
                x = pixel_values[:4]
                rec = self.vae.decode(self.encode_latents(x, sample=False) / self.scaling_factor).sample
                pair = paddle.concat([x, rec.clip(-1, 1)], axis=2)  # (n, 3, 2R, R): original above reconstruction
                arr = ((pair.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                out["vae/reconstruction"] = np.concatenate(list(arr), axis=1)
        finally:
            if was_training:
                self.train()
        return out
