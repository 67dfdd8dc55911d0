"""Stable Diffusion v1 training: arguments, the training task (`SDTask`: its parts and its step), the builder.

Training step (Rombach et al. 2022; the SD v1 recipe of diffusers `train_text_to_image.py` and
PaddleMIX `examples/stable_diffusion/sd/model.py`, facts only):
frozen VAE (eval, no grad) -> latents x scaling factor; noise (+ optional per-channel offset);
uniform timesteps; optional input perturbation; epsilon or v target; optional per-sample Min-SNR
weights (`ldm/sd/diffusion.py`). The text encoder is frozen unless `train_text_encoder`.
Captions arrive raw (the `ldm.data` sample schema): the step replaces each by "" with probability
`caption_dropout` (SD v1: 10%, what classifier-free guidance relies on) using the task's own
per-rank numpy generator (`TrainingTask.rng`), then tokenizes them (pad/truncate to the
tokenizer's `model_max_length`). Noise and timesteps come from paddle's generator, whose state the
checkpoint keeps too (`ldm.train.checkpoint`).

Checkpoint layout (`TrainingTask.save_trained` / `save_ema` through `write_part`): `unet/` (+
`text_encoder/` when trained, loadable by `from_pretrained`), `unet_ema/`, `scheduler/`; with
`--only_save_updated_model False` also vae/, tokenizer/ and model_index.json (a
StableDiffusionPipeline folder).

Flags follow section 4 of the seed README (PaddleMIX `ppdiffusers/examples/stable_diffusion`
`sd/sd_args.py` names them). Differences on purpose:
- `FLAG_USE_EMA`, `FLAG_RECOMPUTE`, `FLAG_XFORMERS` are read once, in parsing, as the *defaults* of
  `--use_ema`, `--recompute`, `--enable_xformers_memory_efficient_attention`; an explicit flag wins.
- `--unet_learning_rate` becomes the base learning rate; the text encoder gets its own rate through
  a parameter group (`ldm/train/optim.py`), not by overwriting `learning_rate` for everything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import paddle

from ldm.sd.diffusion import DDPMSchedule, training_terms, weighted_mse
from ldm.sd.sampling import SD_V1_SCHEDULER_CONFIG, tokenize_prompts, vae_scaling_factor
from ldm.train.args import DiffusionTrainingArguments, parse_with_env_defaults
from ldm.train.task import TrainingTask
from ldm.utils import get_logger
from ldm.weights import save_safetensors, weights_metadata

logger = get_logger("ldm.train.sd")

__all__ = ["SDModelArguments", "SDDataArguments", "SDTrainingArguments", "parse_sd_args", "ENV_FLAG_DEFAULTS",
           "SDTask", "SDEncoders", "vae_moments", "sample_latents", "latents_fingerprint", "latents_spec",
           "build_sd_trainer", "build_task", "build_dataset", "DEFAULT_VALIDATION_PROMPTS",
           "UNET_WEIGHTS", "UNET_EMA_DIR"]

UNET_WEIGHTS = "diffusion_paddle_model.safetensors"  # ppdiffusers' Paddle safetensors file name
UNET_EMA_DIR = "unet_ema"
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
    "a red apple on a wooden table",
)  # two: each preview samples every prompt once per guidance scale (issue 12 item 14: keep previews cheap)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
PREDICTION_TYPES = ("epsilon", "v_prediction")

# environment variable -> training-argument name whose default it sets
ENV_FLAG_DEFAULTS = {
    "FLAG_USE_EMA": "use_ema",
    "FLAG_RECOMPUTE": "recompute",
    "FLAG_XFORMERS": "enable_xformers_memory_efficient_attention",
}


@dataclass
class SDModelArguments:
    vae_name_or_path: Optional[str] = field(default=None, metadata={"help": "Local VAE folder (default: <pretrained>/vae)."})
    text_encoder_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Local CLIPTextModel folder (default: <pretrained>/text_encoder)."}
    )
    unet_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "UNet folder (fine-tune) or a UNet config .json (random init). Default: <pretrained>/unet."},
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Local CLIP tokenizer folder (default: <pretrained>/tokenizer)."}
    )
    pretrained_model_name_or_path: Optional[str] = field(
        default="CompVis/stable-diffusion-v1-4",
        metadata={"help": "Local pipeline folder; the explicit *_name_or_path flags take precedence."},
    )
    model_max_length: int = field(default=77, metadata={"help": "Tokenizer max length (captions are truncated)."})
    prediction_type: str = field(default="epsilon", metadata={"help": "epsilon or v_prediction."})
    num_inference_steps: int = field(default=20, metadata={"help": "DDIM steps of the logged preview images."})
    train_text_encoder: bool = field(default=False, metadata={"help": "Also train the text encoder."})
    noise_offset: float = field(default=0.0, metadata={"help": "Scale of the per-channel noise offset."})
    snr_gamma: Optional[float] = field(default=None, metadata={"help": "Min-SNR weighting gamma (5.0 recommended)."})
    input_perturbation: float = field(default=0.0, metadata={"help": "Scale of the input perturbation (0.1 recommended)."})

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"--prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.model_max_length <= 0:
            raise ValueError(f"--model_max_length must be positive, got {self.model_max_length}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"--snr_gamma must be positive, got {self.snr_gamma}")
        if self.noise_offset < 0 or self.input_perturbation < 0:
            raise ValueError("--noise_offset and --input_perturbation must be >= 0")


@dataclass
class SDDataArguments:
    file_list: str = field(
        default="./data/filelist/train.filelist.list",
        metadata={"help": "A .filelist.list (filelists, optional weights), a .filelist, or one part file; or webdataset "
                          "tar shards: a tar, a listing of tars, or a pattern such as shards/{00000..00099}.tar."},
    )
    resolution: int = field(default=512, metadata={"help": "Training image size (square)."})
    center_crop: bool = field(default=False, metadata={"help": "Centre crop (default: random crop, as diffusers)."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flip."})
    caption_drop_prob: float = field(
        default=0.1,
        metadata={"help": "Probability of training on an empty caption (SD v1: 0.1, what guidance > 1 relies on)."},
    )
    latents_path: Optional[str] = field(
        default=None,
        metadata={"help": "Folder of precomputed VAE latent moments + CLIP text outputs: scripts/precompute_latents.py "
                          "writes it from --file_list; the trainer then trains from it instead of --file_list, "
                          "without loading the VAE and the text encoder (unless previews need them); --resolution, "
                          "--random_flip and the encoder flags must match the precompute's."},
    )

    def __post_init__(self):
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0.0 <= self.caption_drop_prob <= 1.0:
            raise ValueError(f"--caption_drop_prob must be in [0, 1], got {self.caption_drop_prob}")


@dataclass
class SDTrainingArguments(DiffusionTrainingArguments):
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "Memory-efficient attention (default from FLAG_XFORMERS)."}
    )
    only_save_updated_model: bool = field(
        default=True, metadata={"help": "Checkpoints hold only trained parts: unet/ (+unet_ema/, +text_encoder/)."}
    )
    unet_learning_rate: Optional[float] = field(default=None, metadata={"help": "UNet learning rate (default: learning_rate)."})
    text_encoder_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Text encoder learning rate (default: learning_rate)."}
    )
    validation_prompts: Optional[List[str]] = field(
        default=None, metadata={"help": "Prompts of the logged samples (default: a fixed list of 2)."}
    )
    ignore_data_skip: bool = field(
        default=False,
        metadata={"help": "On resume, start a re-seeded data stream instead of continuing the stream at the "
                          "exact position of the checkpoint (the default)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.unet_learning_rate is None:
            self.unet_learning_rate = self.learning_rate
        if self.text_encoder_learning_rate is None:
            self.text_encoder_learning_rate = self.learning_rate
        # the scheduler drives the base rate, which is the UNet's; other groups are scaled from it
        self.learning_rate = self.unet_learning_rate


def parse_sd_args(argv=None):
    """Parse (model, data, training) arguments; env flags become defaults of their explicit flags."""
    return parse_with_env_defaults((SDModelArguments, SDDataArguments, SDTrainingArguments), ENV_FLAG_DEFAULTS, argv)


# ---------------------------------------------------------------------------------------------
# The training task
# ---------------------------------------------------------------------------------------------
def vae_moments(vae, pixel_values: paddle.Tensor):
    """(mean, std) of the VAE's latent distribution of (B, 3, R, R) pixels in [-1, 1]: float32
    (B, 4, R/8, R/8) each, unscaled (what scripts/precompute_latents.py stores)."""
    with paddle.no_grad():
        dist = vae.encode(pixel_values).latent_dist
    return dist.mean, dist.std


def sample_latents(mean: paddle.Tensor, std: paddle.Tensor, scaling_factor: float) -> paddle.Tensor:
    """(mean + std * eps) * scaling_factor with eps ~ N(0, 1) of the mean's shape from paddle's
    generator: the draw of ppdiffusers' `DiagonalGaussianDistribution.sample`, written once here so
    that training from images and from stored moments draws the same numbers in the same order
    (a fresh sample per epoch, as mosaicml/diffusion does with precomputed latent moments)."""
    eps = paddle.randn(mean.shape, dtype=mean.dtype)
    return (mean + std * eps) * scaling_factor


def _find_weights(folder: str) -> str:
    for name in (UNET_WEIGHTS, "model.safetensors", "model_state.pdparams"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no Paddle weight file ({UNET_WEIGHTS}, model.safetensors, model_state.pdparams) in {folder}")



class SDTask(TrainingTask):
    """UNet (trained) + frozen VAE + (frozen or trained) CLIP text encoder.

    forward(pixel_values [B, R, R, 3] uint8, caption [B] str) -> scalar loss; from precomputed
    latents (`--latents_path`, `ldm.data.cache`): forward(caption, latent_mean, latent_std, clip_text)
    with the VAE and text encoder None (`scaling_factor` given) and `cached_constants["clip_text"]`,
    the empty caption's outputs, swapped in where a caption is dropped. Both paths draw the same
    random numbers in the same order (caption dropout, the latent sample, noise, timesteps).
    """

    state_file = "train_sd_state_rank{}.json"
    rng_tag = 0x5D  # the Stage C task uses 0x5C

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
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
        scaling_factor: Optional[float] = None,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
        if vae is None and scaling_factor is None:
            raise ValueError("SDTask without a VAE (precomputed latents) needs the VAE's scaling_factor")
        if train_text_encoder and text_encoder is None:
            raise ValueError("--train_text_encoder needs the text encoder: it cannot train from precomputed outputs")
        if vae is not None and unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"UNet in_channels {unet.config.in_channels} != VAE latent_channels {vae.config.latent_channels}"
            )
        if text_encoder is not None and unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"UNet cross_attention_dim {unet.config.cross_attention_dim} != text encoder hidden_size "
                f"{text_encoder.config.hidden_size}"
            )
        super().__init__(seed=seed, rank=rank)
        self.add_trained("unet", unet)
        self.add_frozen("vae", vae)
        (self.add_trained if train_text_encoder else self.add_frozen)("text_encoder", text_encoder)
        self.tokenizer = tokenizer
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
        self.last_captions: Optional[List[str]] = None  # the captions of the latest step, after dropout
        self.scaling_factor = float(scaling_factor) if vae is None else vae_scaling_factor(vae)
        self.cached_constants: Optional[Dict[str, np.ndarray]] = None  # the empty caption's cached outputs
        self.train()

    # ------------------------------------------------------------------------------------------
    @paddle.no_grad()
    def encode_latents(self, pixel_values: paddle.Tensor, sample: bool = True) -> paddle.Tensor:
        """(B,3,R,R) in [-1,1] -> (B,4,R/8,R/8) scaled latents (a sample, or the mean)."""
        mean, std = vae_moments(self.vae, pixel_values)
        return sample_latents(mean, std, self.scaling_factor) if sample else mean * self.scaling_factor

    def encode_text(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        """(B,L) int64 -> (B,L,D) last hidden state."""
        if self.train_text_encoder:
            return self.text_encoder(input_ids)[0]
        with paddle.no_grad():
            return self.text_encoder(input_ids)[0]

    def drop_captions(self, captions: Sequence[str]) -> List[str]:
        """Each caption replaced by "" with probability `caption_dropout` (the task's generator)."""
        return self._drop(captions)[0]

    def _drop(self, captions: Sequence[str]):
        keep = self.rng.random(len(captions)) >= self.caption_dropout
        return [str(c) if k else "" for c, k in zip(captions, keep)], keep

    def cached_context(self, clip_text: paddle.Tensor, keep: np.ndarray) -> paddle.Tensor:
        """(B, L, D) stored text-encoder outputs, the stored empty caption's where not keep[i]."""
        clip_text = clip_text.astype("float32")
        if keep.all():
            return clip_text
        if not self.cached_constants or "clip_text" not in self.cached_constants:
            raise ValueError("the precomputed latents hold no empty-caption entry (caption dropout needs it)")
        empty = paddle.to_tensor(np.asarray(self.cached_constants["clip_text"], np.float32)).unsqueeze(0)
        mask = paddle.to_tensor(keep).reshape([-1, 1, 1]).expand(clip_text.shape)
        return paddle.where(mask, clip_text, empty.expand(clip_text.shape))

    def tokenize(self, captions: Sequence[str]) -> paddle.Tensor:
        """(B,) str -> (B, L) int64 token ids."""
        if self.tokenizer is None:
            raise ValueError("SDTask needs a tokenizer to train on captions")
        return tokenize_prompts(self.tokenizer, list(captions))

    def forward(self, pixel_values: Optional[paddle.Tensor] = None, caption: Sequence[str] = (),
                latent_mean: Optional[paddle.Tensor] = None, latent_std: Optional[paddle.Tensor] = None,
                clip_text: Optional[paddle.Tensor] = None, **unused) -> paddle.Tensor:
        pixel_values = self.pixels(pixel_values)  # uint8 [B, R, R, 3] batch -> float32 [B, 3, R, R] in [-1, 1]
        n = (pixel_values if latent_mean is None else latent_mean).shape[0]
        if len(caption) != n:
            raise ValueError(f"{len(caption)} captions for {n} images")
        self.last_captions, keep = self._drop(caption)
        if latent_mean is None:
            input_ids = self.tokenize(self.last_captions)  # (B, L)
            latents = self.encode_latents(pixel_values)  # (B, 4, h, w)
        else:  # precomputed moments (--latents_path): the draw of encode_latents
            latents = sample_latents(latent_mean.astype("float32"), latent_std.astype("float32"), self.scaling_factor)
        b, c = latents.shape[:2]
        noise = paddle.randn(latents.shape, dtype=latents.dtype)
        offset = paddle.randn([b, c, 1, 1], dtype=latents.dtype) if self.noise_offset > 0 else None
        perturb = paddle.randn(latents.shape, dtype=latents.dtype) if self.input_perturbation > 0 else None
        timesteps = paddle.randint(0, self.schedule.num_train_timesteps, [b], dtype="int64")  # (B,)
        terms = training_terms(
            latents, noise, timesteps, self.alphas_cumprod, self.prediction_type,
            self.noise_offset, offset, self.input_perturbation, perturb, self.snr_gamma,
        )
        context = self.encode_text(input_ids) if latent_mean is None else self.cached_context(clip_text, keep)
        pred = self.unet(terms.noisy_latents, timesteps, encoder_hidden_states=context).sample  # (B, 4, h, w)
        return weighted_mse(pred, terms.target, terms.weights)

    # ------------------------------------------------------------------ task hooks
    def ema_parameters(self) -> Dict[str, paddle.Tensor]:
        """The parameters an EMA follows: the UNet's (as diffusers' train_text_to_image)."""
        return {k: p for k, p in self.trainable_parameters().items() if k.startswith("unet.")}

    def enable_recompute(self) -> None:
        self.unet.enable_gradient_checkpointing()
        logger.info("recompute: gradient checkpointing on the UNet")

    def write_part(self, name: str, folder: str, state, ema: bool) -> None:
        """unet/, unet_ema/, text_encoder/: folders `from_pretrained` loads."""
        if name == "unet" and ema:
            out = os.path.join(folder, UNET_EMA_DIR)
            os.makedirs(out, exist_ok=True)
            save_safetensors(state, os.path.join(out, UNET_WEIGHTS), metadata=weights_metadata("sd_unet"))
            self.unet.save_config(out)
        elif name == "unet":
            self.unet.save_pretrained(os.path.join(folder, "unet"))
        elif name == "text_encoder" and not ema:
            self.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
        else:
            raise ValueError(f"SDTask has no file layout for {name!r} (ema={ema})")

    def read_part(self, name: str, folder: str, ema: bool):
        if name == "unet":
            sub = os.path.join(folder, UNET_EMA_DIR if ema else "unet")
            return _find_weights(sub) if os.path.isdir(sub) else None
        sub = os.path.join(folder, "text_encoder")
        if name != "text_encoder" or ema or not os.path.isdir(sub):
            return None
        from ldm.sd.loading import load_text_encoder  # strict, never unpickles by default

        return load_text_encoder(sub).state_dict()

    def save_trained(self, folder: str, only_updated: bool = True) -> None:
        """The trained parts + scheduler/; with only_updated=False also vae/, text_encoder/,
        tokenizer/ and model_index.json: a StableDiffusionPipeline folder."""
        super().save_trained(folder, only_updated)
        if not only_updated:
            if not self.train_text_encoder:
                self.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
            self.vae.save_pretrained(os.path.join(folder, "vae"))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
            with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
                json.dump(PIPELINE_INDEX, f, indent=2)
        sched = os.path.join(folder, "scheduler")
        os.makedirs(sched, exist_ok=True)
        cfg = {"_class_name": "DDPMScheduler", **SD_V1_SCHEDULER_CONFIG, **dataclasses.asdict(self.schedule),
               "prediction_type": self.prediction_type}
        with open(os.path.join(sched, "scheduler_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)

    default_guidance_scale = 7.5

    @paddle.no_grad()
    def sample_images(self, captions: Sequence[str], seed: int, guidance_scale: float, num_inference_steps: int = 50,
                      resolution: Optional[int] = None) -> np.ndarray:
        """uint8 (N, R, R, 3): DDIM samples of `captions` (image i from seed + i); R defaults to the
        UNet's sample size in pixels."""
        from ldm.sd.sampling import generate, make_scheduler, vae_scale_factor

        size = resolution or vae_scale_factor(self.vae) * self.unet.config.sample_size
        return generate(self.unet, self.vae, self.text_encoder, self.tokenizer,
                        make_scheduler("ddim", self.scheduler_config), list(captions), size, size,
                        guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed)

    @paddle.no_grad()
    def log_images(
        self,
        pixel_values: Optional[paddle.Tensor] = None,
        prompts: Sequence[str] = DEFAULT_VALIDATION_PROMPTS,
        guidance_scales: Sequence[float] = (1.0, 7.5),
        num_inference_steps: int = 20,
        seed: int = 0,
        resolution: Optional[int] = None,
    ) -> Dict[str, np.ndarray]:
        """Images to log: {tag: uint8 (H, W, 3)}: samples per guidance scale + VAE reconstructions."""
        out, pixel_values = {}, self.pixels(pixel_values)
        with self.evaluating():
            size = resolution or (pixel_values.shape[-1] if pixel_values is not None else None)
            for g in guidance_scales:
                images = self.sample_images(prompts, seed, g, num_inference_steps, size)
                out[f"samples/guidance_{g:g}"] = np.concatenate(list(images), axis=1)  # prompts side by side
            if pixel_values is not None:
                x = pixel_values[:4]
                rec = self.vae.decode(self.encode_latents(x, sample=False) / self.scaling_factor).sample
                pair = paddle.concat([x, rec.clip(-1, 1)], axis=2)  # (n, 3, 2R, R): original above reconstruction
                arr = ((pair.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                out["vae/reconstruction"] = np.concatenate(list(arr), axis=1)
        return out


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------
class SDEncoders:
    """The frozen encoders of an SD run as `ldm.data.cache.build_encoder_cache` calls them (what
    scripts/precompute_latents.py stores; kohya-ss/sd-scripts' --cache_latents /
    --cache_text_encoder_outputs and mosaicml/diffusion's precomputed latents, facts only):
    image fields "latent_mean" / "latent_std" (`vae_moments`, unscaled), caption field
    "clip_text" (the last hidden state the UNet attends to), and the constant entry: the empty
    caption's "clip_text" (caption dropout). The pixels arrive as the data kind yields them."""

    def __init__(self, vae, text_encoder, tokenizer):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer

    def cache_images(self, pixel_values: np.ndarray) -> Dict[str, np.ndarray]:
        x = paddle.to_tensor(pixel_values)
        if x.dtype == paddle.uint8:  # the uint8 [B, H, W, 3] sample schema
            from ldm.data.transforms import normalize_pixels

            x = normalize_pixels(x, "minus_one_one")
        mean, std = vae_moments(self.vae, x.astype("float32"))
        return {"latent_mean": mean.numpy(), "latent_std": std.numpy()}

    @paddle.no_grad()
    def cache_captions(self, captions: Sequence[str]) -> Dict[str, np.ndarray]:
        return {"clip_text": self.text_encoder(tokenize_prompts(self.tokenizer, list(captions)))[0].numpy()}

    def cache_constants(self) -> Dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.cache_captions([""]).items()}


def _folder_digest(folder: str) -> str:
    """sha256 of every file below `folder` (relative names and bytes)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode("utf-8") + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:32]


def _encoder_paths(model_args):
    """The component paths of the VAE, text encoder and tokenizer flags (no UNet needed)."""
    from ldm.sd.loading import SHIPPED_CONFIG_DIR, resolve_paths

    return resolve_paths(dataclasses.replace(model_args,
                                             unet_name_or_path=os.path.join(SHIPPED_CONFIG_DIR, "unet_config.json")))


def latents_fingerprint(model_args) -> str:
    """What precomputed SD latents depend on, as JSON: the content of the VAE, text encoder and
    tokenizer folders and the tokenizer's max length (other encoders give other entries, and a
    run with other encoders is refused naming the part that differs)."""
    paths = _encoder_paths(model_args)
    return json.dumps({"recipe": "sd", "vae": _folder_digest(paths.vae),
                       "text_encoder": _folder_digest(paths.text_encoder), "tokenizer": _folder_digest(paths.tokenizer),
                       "model_max_length": int(model_args.model_max_length)}, sort_keys=True)


def latents_spec(data_args, seed: int, fingerprint: str, file_list: Optional[str] = None):
    """The "cached" DatasetSpec of precomputed SD latents in `data_args.latents_path` (a stream
    over LAION part files / tar shards, centre crop, [-1, 1]); `file_list`: the source to compute
    them from (scripts/precompute_latents.py), None to train from them."""
    import ldm.data

    opts = {"source_kind": "laion", "fingerprint": fingerprint, "source_options": {}}  # a stream source
    if file_list is not None:  # the kind the trainer would read it with: "laion", or "tar" (ldm.data.tars)
        opts.update(source_kind=ldm.data.tars.stream_kind(file_list), source_path=file_list)
    return ldm.data.DatasetSpec("cached", data_args.latents_path, resolution=data_args.resolution, center_crop=True,
                                random_flip=data_args.random_flip, seed=seed, options=opts)


def _vae_config_scaling_factor(vae_path: str) -> float:
    from ldm.sd.sampling import SD_SCALING_FACTOR
    from ldm.weights.source import read_json

    cfg = os.path.join(vae_path, "config.json")
    return float((read_json(cfg, "VAE config") if os.path.isfile(cfg) else {}).get("scaling_factor") or SD_SCALING_FACTOR)


def build_task(model_args, training_args, caption_dropout: float = 0.0, latents: bool = False) -> SDTask:
    """The SD task from the component flags; `caption_dropout` is `--caption_drop_prob`. With
    `latents` (training from precomputed latents) the VAE, text encoder and tokenizer are loaded
    only when previews or --eval_captions need them."""
    from ldm.sd.loading import load_scheduler_config, load_text_encoder, load_tokenizer, load_unet, load_vae, resolve_paths

    paths = resolve_paths(model_args)
    pre = model_args.pretrained_model_name_or_path
    if model_args.unet_name_or_path and pre:
        logger.info("--unet_name_or_path %s takes precedence over %s/unet", model_args.unet_name_or_path, pre)
    unet = load_unet(paths.unet)
    previews = training_args.image_logging_steps > 0 or getattr(training_args, "eval_captions", None)
    vae = text_encoder = tokenizer = None
    if not latents or previews:
        vae, text_encoder = load_vae(paths.vae), load_text_encoder(paths.text_encoder)
        tokenizer = load_tokenizer(paths.tokenizer, model_args.model_max_length)
    else:
        logger.info("training from precomputed latents: the VAE and the text encoder are not loaded")
    if training_args.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
            logger.info("memory-efficient attention enabled")
        except (NotImplementedError, ValueError, ImportError, RuntimeError) as e:
            logger.warning("memory-efficient attention unavailable here (%s); using standard attention", e)
    task = SDTask(
        unet, vae, text_encoder, tokenizer, scheduler_config=load_scheduler_config(paths.scheduler),
        prediction_type=model_args.prediction_type, noise_offset=model_args.noise_offset,
        input_perturbation=model_args.input_perturbation, snr_gamma=model_args.snr_gamma,
        train_text_encoder=model_args.train_text_encoder, caption_dropout=caption_dropout,
        seed=training_args.seed, rank=max(training_args.process_index, 0),
        scaling_factor=_vae_config_scaling_factor(paths.vae),
    )
    if training_args.recompute:
        task.enable_recompute()
    return task


def build_dataset(data_args, training_args, start_step: int = 0, fingerprint: Optional[str] = None):
    """The `--file_list` stream (ldm.data kind "laion", or "tar" for a tar, a listing of tars or a pattern
    such as shards/{00000..00099}.tar; pixels in [-1, 1], raw captions), or with
    `--latents_path` the stream of its precomputed latents (`fingerprint`: `latents_fingerprint`)."""
    import ldm.data

    if data_args.latents_path:
        spec = latents_spec(data_args, training_args.seed, fingerprint)
    else:
        spec = ldm.data.DatasetSpec(ldm.data.tars.stream_kind(data_args.file_list), data_args.file_list,  # or "tar"
                                    resolution=data_args.resolution,
                                    center_crop=data_args.center_crop, random_flip=data_args.random_flip,
                                    seed=training_args.seed, options={"infinite": True})
    ds = ldm.data.build_dataset(spec)
    if training_args.ignore_data_skip:  # a fresh stream; else DiffusionTrainer resumes it at its position
        ds.set_epoch(start_step)
    return ds


def _check_latents(task: SDTask, dataset) -> None:
    """The stored fields fit the UNet (latent channels, text width) and caption dropout."""
    width = np.shape(dataset.constants.get("clip_text", np.zeros((0, 0))))[-1]
    if width != task.unet.config.cross_attention_dim:
        raise ValueError(f"the precomputed text outputs are {width} wide, the UNet's cross_attention_dim is "
                         f"{task.unet.config.cross_attention_dim} (other text encoder?)")
    if not {"latent_mean", "latent_std", "clip_text"} <= set(dataset.fields):
        raise ValueError(f"{dataset.cache.folder} holds {dataset.fields}, not SD latents (latent_mean, latent_std, "
                         f"clip_text)")
    channels = dataset.cache.part_record(dataset.first_key, 0, ["latent_mean"])["latent_mean"].shape[0]
    if channels != task.unet.config.in_channels:
        raise ValueError(f"the precomputed latents have {channels} channels, the UNet's in_channels is "
                         f"{task.unet.config.in_channels} (other VAE?)")


def build_sd_trainer(model_args, data_args, training_args, resume: Optional[str] = None):
    """(DiffusionTrainer, task, ema_callback) ready for `trainer.fit(resume, ema)`."""
    from ldm.train.callbacks import standard_callbacks
    from ldm.train.checkpoint import checkpoint_global_step
    from ldm.train.optim import build_param_groups
    from ldm.train.trainer import DiffusionTrainer

    latents = bool(data_args.latents_path) and training_args.do_train
    if latents and model_args.train_text_encoder:
        raise ValueError("--train_text_encoder cannot train from --latents_path (the text encoder outputs are stored)")
    fingerprint = latents_fingerprint(model_args) if latents else None
    dataset = build_dataset(data_args, training_args, checkpoint_global_step(resume), fingerprint) \
        if training_args.do_train else None  # (before the task: a mismatched latents folder fails fast)
    task = build_task(model_args, training_args, data_args.caption_drop_prob, latents=latents)
    if latents:
        task.cached_constants = dataset.constants
        _check_latents(task, dataset)
    image_kwargs = dict(prompts=tuple(training_args.validation_prompts or DEFAULT_VALIDATION_PROMPTS),
                        num_inference_steps=model_args.num_inference_steps, seed=training_args.seed,
                        resolution=data_args.resolution)
    callbacks, ema = standard_callbacks(training_args, image_kwargs)
    trainer = DiffusionTrainer(model=task, args=training_args, train_dataset=dataset, callbacks=callbacks)
    trainer.set_optimizer_grouped_parameters(build_param_groups(
        task.param_groups(),
        {"unet": training_args.unet_learning_rate, "text_encoder": training_args.text_encoder_learning_rate},
        base_learning_rate=training_args.learning_rate, weight_decay=training_args.weight_decay))
    return trainer, task, ema


@dataclass
class PrecomputeArguments:
    batch_size: int = field(default=8, metadata={"help": "Images per VAE / text encoder call."})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")


def parse_precompute_args(argv=None):
    """(model, data, precompute) arguments of scripts/precompute_latents.py: the trainer's model and
    data flags (the same encoders, --file_list, --resolution, --random_flip) plus --batch_size."""
    return parse_with_env_defaults((SDModelArguments, SDDataArguments, PrecomputeArguments), {}, argv)


def precompute_latents(model_args, data_args, batch_size: int = 8) -> dict:
    """One pass over `--file_list` that stores, into `--latents_path`, the VAE latent moments and
    CLIP text outputs of every valid record (and the empty caption's outputs) for training with
    `--latents_path` (`SDEncoders`, `ldm.data.cache` streams); parts already stored are kept, so a
    stopped pass continues. Returns {"latents_path", "parts", "records", "valid", "invalid"}."""
    from ldm.data.cache import EncoderCache, build_encoder_cache, stream_id
    from ldm.sd.loading import load_text_encoder, load_tokenizer, load_vae

    if not data_args.latents_path:
        raise ValueError("--latents_path (the output folder) is required")
    fingerprint = latents_fingerprint(model_args)
    spec = latents_spec(data_args, 0, fingerprint, file_list=data_args.file_list)
    paths = _encoder_paths(model_args)
    encoders = SDEncoders(load_vae(paths.vae), load_text_encoder(paths.text_encoder),
                          load_tokenizer(paths.tokenizer, model_args.model_max_length))
    cache = build_encoder_cache(spec, encoders.cache_images, encoders.cache_captions, encoders.cache_constants,
                                batch_size=batch_size)
    record = EncoderCache(cache.folder).streams[stream_id(spec, fingerprint)]
    counts: Dict[str, int] = {}
    valid = total = 0
    for key in {p["key"] for p in record["parts"]}:
        status = cache.part_records(key)[0]
        total += len(status)
        valid += int((status == 0).sum())
        for s in status[status != 0].tolist():
            reason = record["reasons"][abs(s) - 1]
            counts[reason] = counts.get(reason, 0) + 1
    return {"latents_path": cache.folder, "parts": len(record["parts"]), "records": total, "valid": valid,
            "invalid": dict(sorted(counts.items()))}
