"""Stage B fine-tuning: arguments, the training task (`StageBTask`), the builder.

Training step (Stability-AI/StableCascade `train/train_b.py` `get_conditions`, `forward_pass`,
`_pyramid_noise`, and `train/base.py`; facts only):
- latents: frozen Stage A `encode(images)[0]` of the [0, 1] image (4 x R/4 x R/4);
- EfficientNet latents: one factor f ~ U(0.5, 1) per batch; the image resized (nearest) to
  floor(R * f / 32) * 32 per side, through the frozen EfficientNet encoder (ImageNet-normalised);
  zeros for the samples with rand > 0.9 (~10%);
- text: pooled CLIP bigG `text_embeds` [B, 1, 1280], the caption replaced by "" with probability 5%;
- noise: pyramid noise: epsilon ~ N(0, 1), plus, for i = 1 .. 9, N(0, 1) noise of size
  (H / 2^i, W / 2^i) upsampled (nearest) times 0.75^i when one side is in [1, 16], stopping when a
  side reaches 1, divided by sqrt(sum of the squared multipliers) (the original sizes both sides
  from the height; this uses each side's own);
- GDF `diffuse(latents, shift=1, loss_shift=1)`, per-sample MSE(pred, epsilon) over C, H, W,
  times the P2 or the adaptive loss weight (buckets updated with the unweighted losses), averaged.
- previews: Stage B samples conditioned on the batch's EfficientNet latents (cfg 1.5, shift 1,
  10 steps, the empty caption and zero latents as the unconditional), decoded by Stage A, and the
  Stage A reconstruction of the batch.

The draws come from the task's per-rank generator (its state in `train_b_state_rank<k>.json`).
Checkpoint files: `stage_b.safetensors` / `stage_b_ema.safetensors` (our Paddle layout, network
config in the metadata: `ldm.cascade.loading.load_stage_b(path, preset=None)`, `inference.py
--stage_b`), `train_b_config.json`; with `--lora_rank`, the adapters (ldm.train.lora).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from ldm.cascade import settings as cfg_mod
from ldm.cascade.settings import CascadeConfig, SamplingConfig
from ldm.cascade.stage_b import StageBConfig, stage_b_config
from ldm.data.buckets import parse_aspect_ratios
from ldm.train.args import check_precision, parse_with_env_defaults
from ldm.train.stage_c import (CAPTION_DROPOUT, DEFAULT_PREVIEW_PROMPTS, ENV_FLAG_DEFAULTS, TRAIN_SHIFT, CascadeTask,
                               CascadeModelArguments, StageCDataArguments, StageCTask, StageCTrainingArguments,
                               assemble_trainer, encoder_cache_plan, use_encoder_cache, without_cached_encoders)
from ldm.utils import get_logger

logger = get_logger("ldm.train.stage_b")

__all__ = ["StageBModelArguments", "StageBDataArguments", "parse_stage_b_args", "StageBTask", "build_stage_b_trainer",
           "build_stage_b_components", "pyramid_noise", "STAGE_B_FILE", "STAGE_B_EMA_FILE"]

MODEL_VERSIONS = (*cfg_mod.STAGE_B_FILES, "tiny", "demo")
STAGE_B_FILE = "stage_b.safetensors"
STAGE_B_EMA_FILE = "stage_b_ema.safetensors"
TRAIN_CONFIG_FILE = "train_b_config.json"
EFFNET_PROB = 0.9  # train_b.py: np.random.rand(b) <= 0.9 gets EfficientNet latents
EFFNET_FACTOR = (0.5, 1.0)  # train_b.py: np.random.uniform(0.5, 1)
PYRAMID_LEVELS, PYRAMID_SIZE_RANGE, PYRAMID_DECAY = 10, (1, 16), 0.75  # forward_pass / _pyramid_noise
PREVIEW_CFG, PREVIEW_SHIFT, PREVIEW_STEPS = 1.5, 1.0, 10  # train_b.py sampling_configs
SIZE_MULTIPLE = cfg_mod.SIZE_MULTIPLE  # Stage A / 4, Stage B patch 2 and its downscalers


@dataclass
class StageBModelArguments(CascadeModelArguments):
    model_version: str = field(default=CascadeConfig.model_b_version, metadata={
        "help": "Stage B size: 700M (lite), 3B, tiny (random tiny networks, offline, for tests) or demo (the demo "
                "presets; frozen parts from the demo files in --weights_path, scripts/train_demo.sh)."})
    stage_b: Optional[str] = field(default=None, metadata={
        "help": "Stage B weights to fine-tune (name in weights_path or a path); default stage_b_lite (700M) / stage_b "
                "(3B). With tiny: optional weights of a tiny Stage B."})
    stage_a: str = field(default=CascadeConfig.stage_a, metadata={"help": "Stage A (VQGAN) weights."})
    num_inference_steps: int = field(default=PREVIEW_STEPS, metadata={"help": "Sampler steps of the preview images."})
    effnet_prob: float = field(default=EFFNET_PROB, metadata={
        "help": "Probability that a sample gets its EfficientNet latents (else zeros)."})

    versions = MODEL_VERSIONS
    probabilities = ("caption_dropout", "effnet_prob")


@dataclass
class StageBDataArguments(StageCDataArguments):
    resolution: int = field(default=1024, metadata={"help": f"Training image size (square, multiple of "
                                                            f"{SIZE_MULTIPLE}); the Stage B latent is resolution / 4."})

    def __post_init__(self):
        if self.resolution < SIZE_MULTIPLE or self.resolution % SIZE_MULTIPLE:
            raise ValueError(f"--resolution must be a positive multiple of {SIZE_MULTIPLE} for Stage B, "
                             f"got {self.resolution}")
        parse_aspect_ratios(self.multi_aspect_ratio)  # a bad --multi_aspect_ratio fails here


def cascade_defaults(cascade: CascadeConfig) -> dict:
    return dict(model_version=cascade.model_b_version, weights_path=cascade.weights_path, effnet=cascade.effnet,
                stage_a=cascade.stage_a, clip_text=cascade.clip_text)


def parse_stage_b_args(argv=None, cascade: Optional[CascadeConfig] = None):
    """(model, data, training) arguments, as `parse_stage_c_args` (FLAG_USE_EMA / FLAG_RECOMPUTE
    defaults, `cascade` the defaults of the weight flags)."""
    m, d, t = parse_with_env_defaults(
        (StageBModelArguments, StageBDataArguments, StageCTrainingArguments), ENV_FLAG_DEFAULTS, argv,
        defaults=cascade_defaults(cascade) if cascade is not None else None)
    check_precision(t)
    return m, d, t


def build_stage_b_components(model_args):
    """Stage B, Stage A, EfficientNet, tokenizer + CLIP text of the run (tiny: the offline preset)."""
    from ldm.cascade import components as cp

    if model_args.model_version in cp.OFFLINE_PRESETS:  # tiny (random) or demo (the demo files)
        return cp.training_components(model_args.model_version, "stage_b", model_args.stage_b, model_args.weights_path)
    cfg = dataclasses.replace(
        CascadeConfig(), weights_path=model_args.weights_path, effnet=model_args.effnet, stage_a=model_args.stage_a,
        stage_b=model_args.stage_b or cfg_mod.STAGE_B_FILES[model_args.model_version], clip_text=model_args.clip_text,
        clip_image=None, model_b_version=model_args.model_version, dtype="float32")
    try:
        return cp.file_components(cfg, ["tokenizer", "text_encoder", "stage_b", "stage_a", "effnet"])
    except cp.MissingWeightsError as e:
        raise cp.MissingWeightsError(f"{e}\nFor an offline demo without weights: --model_version tiny "
                                     f"(STAGE=b MODEL_VERSION=tiny sh train.sh).") from None


def pyramid_noise(eps: np.ndarray, rng: np.random.Generator, levels: int = PYRAMID_LEVELS,
                  size_range=PYRAMID_SIZE_RANGE) -> np.ndarray:
    """Pyramid noise of `eps` [B, C, H, W] (see the module docstring); extra draws from `rng`."""
    b, c, hh, ww = eps.shape
    out = eps.astype(np.float32).copy()
    multipliers = [1.0]
    for i in range(1, levels):
        m = PYRAMID_DECAY ** i
        h, w = hh // (2 ** i), ww // (2 ** i)
        if size_range is None or size_range[0] <= h <= size_range[1] or size_range[0] <= w <= size_range[1]:
            offset = rng.standard_normal((b, c, h, w), dtype=np.float32)
            rows, cols = (np.arange(hh) * h) // hh, (np.arange(ww) * w) // ww  # nearest upsampling
            out += offset[:, :, rows][:, :, :, cols] * np.float32(m)
            multipliers.append(m)
        if h <= 1 or w <= 1:
            break
    return (out / np.float32(sum(m * m for m in multipliers) ** 0.5)).astype(np.float32)


class StageBTask(CascadeTask):
    """Stage B (trained) + frozen Stage A, EfficientNet, CLIP text encoder.

    forward(pixel_values [B, R, R, 3] uint8 (normalised to [0, 1] in the step), caption [B] str) -> scalar loss.
    """

    state_file = "train_b_state_rank{}.json"
    rng_tag = 0x5B
    lora_target = ("stage_b", "b")
    size_multiple = SIZE_MULTIPLE  # aspect-bucket sides: Stage A / 4, patch 2, three halvings (64 px)
    weight_files = (STAGE_B_FILE, STAGE_B_EMA_FILE)
    train_config_file = TRAIN_CONFIG_FILE

    def __init__(self, components, config, adaptive_loss_weight: bool = False, model_max_length: int = 77,
                 caption_dropout: float = CAPTION_DROPOUT, effnet_prob: float = EFFNET_PROB, seed: int = 0, rank: int = 0):
        super().__init__(seed=seed, rank=rank)
        from ldm.cascade.gdf import stable_cascade_gdf

        self.config = StageBConfig.from_dict(config)
        self.add_trained("stage_b", components.get("stage_b"))
        self.add_frozen("stage_a", components.get("stage_a"))
        self.add_frozen("effnet", components.get("effnet"))
        self.add_frozen("text_encoder", components.get("text_encoder"))
        self.tokenizer = components.get("tokenizer")
        max_pos = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", model_max_length)
        if model_max_length > max_pos:
            raise ValueError(f"--model_max_length {model_max_length} exceeds the text encoder's {max_pos} positions")
        self.tokenizer.model_max_length = int(model_max_length)
        self.gdf = stable_cascade_gdf(adaptive_loss_weight=adaptive_loss_weight)
        self.adaptive = bool(adaptive_loss_weight)
        self.caption_dropout, self.effnet_prob = float(caption_dropout), float(effnet_prob)
        self.c_effnet = int(self.config.c_effnet)
        self.train()

    # the conditioning shared with Stage C (EfficientNet latents, CLIP text, t / epsilon draws)
    encode_effnet = StageCTask.encode_latents
    encode_captions = StageCTask.encode_captions
    draw = StageCTask.draw


    @paddle.no_grad()
    def encode_latents(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """[B, 3, R, R] in [0, 1] -> Stage A latents [B, 4, R/4, R/4] (float32)."""
        return self.stage_a.encode(pixel_values.astype("float32"))[0].astype("float32")

    @staticmethod
    def effnet_size(hh: int, ww: int, factor: float):
        """(h, w) of the EfficientNet input of an hh x ww image at `factor` (multiples of 32)."""
        return int((hh * factor) // 32) * 32, int((ww * factor) // 32) * 32

    @classmethod
    def effnet_sizes(cls, hh: int, ww: int):
        """Every EfficientNet input size a factor in EFFNET_FACTOR gives (what the cache stores):
        the size is constant between the factors where hh * f or ww * f crosses a multiple of 32."""
        lo, hi = EFFNET_FACTOR
        cuts = sorted({lo, hi, *(32 * k / n for n in (hh, ww) for k in range(1, n // 32 + 1) if lo < 32 * k / n < hi)})
        probes = [*cuts[:-1], *((a + b) / 2 for a, b in zip(cuts, cuts[1:])), np.nextafter(hi, lo)]
        return sorted({s for s in (cls.effnet_size(hh, ww, float(f)) for f in probes) if min(s) >= 32})

    cache_encoders = ("stage_a", "effnet", "text_encoder")
    preview_encoders = ()  # Stage B previews condition on a batch image: none in a cached run

    def cache_images(self, pixel_values: np.ndarray) -> Dict[str, np.ndarray]:
        """Cached image fields: "latents" (Stage A) and "effnet_<h>x<w>", the EfficientNet latents at
        every input size the random factor can give (so the cached step is the recipe's, exactly)."""
        x = self.pixels(pixel_values).astype("float32")
        out = {"latents": self.encode_latents(x).numpy()}
        for eh, ew in self.effnet_sizes(*x.shape[-2:]):
            out[f"effnet_{eh}x{ew}"] = self.encode_effnet(F.interpolate(x, size=[eh, ew], mode="nearest")).numpy()
        return out

    def cache_captions(self, captions: Sequence[str]) -> Dict[str, np.ndarray]:
        return {"clip_pooled": self.encode_captions(captions)[1].numpy()}

    @paddle.no_grad()
    def effnet_conditions(self, pixel_values: paddle.Tensor, factor: float, use: np.ndarray) -> paddle.Tensor:
        """EfficientNet latents of the images resized (nearest) by `factor` to a multiple of 32,
        for the samples with use[i]; zeros elsewhere. [B, 16, h, w]."""
        b, _, hh, ww = pixel_values.shape
        eh, ew = self.effnet_size(hh, ww, factor)
        if eh < 32 or ew < 32:
            raise ValueError(f"images of {hh}x{ww} are too small for EfficientNet latents at factor {factor:.3f}")
        out = paddle.zeros([b, self.c_effnet, eh // 32, ew // 32], "float32")
        idx = np.nonzero(use)[0]
        if len(idx):
            small = F.interpolate(pixel_values.astype("float32")[paddle.to_tensor(idx)], size=[eh, ew], mode="nearest")
            lat = self.encode_effnet(small)
            out = paddle.scatter(out, paddle.to_tensor(idx), lat, overwrite=True) if len(idx) < b else lat
        return out

    def draw_noise(self, shape):
        t, eps = self.draw(shape)
        return t, paddle.to_tensor(pyramid_noise(eps.numpy(), self.rng))

    def forward(self, pixel_values: Optional[paddle.Tensor] = None, caption: Sequence[str] = (), **cached) -> paddle.Tensor:
        pixel_values = self.pixels(pixel_values)  # uint8 [B, H, W, 3] batch -> float32 [B, 3, H, W] in [0, 1]
        b = pixel_values.shape[0] if pixel_values is not None else cached["latents"].shape[0]
        if len(caption) != b:
            raise ValueError(f"{len(caption)} captions for {b} images")
        keep = self.rng.random(b) >= self.caption_dropout
        factor = float(self.rng.uniform(*EFFNET_FACTOR))
        use = self.rng.random(b) < self.effnet_prob
        if "latents" in cached:  # precomputed encoder outputs (--cache_dir, ldm.data.cache)
            latents = cached["latents"].astype("float32")
            eh, ew = self.effnet_size(latents.shape[-2] * 4, latents.shape[-1] * 4, factor)
            if eh < 32 or ew < 32:
                raise ValueError(f"images of {latents.shape[-2] * 4}x{latents.shape[-1] * 4} are too small for "
                                 f"EfficientNet latents at factor {factor:.3f}")
            lat = cached[f"effnet_{eh}x{ew}"].astype("float32")
            effnet = paddle.where(paddle.to_tensor(use).reshape([-1, 1, 1, 1]).expand(lat.shape), lat,
                                  paddle.zeros_like(lat))
            pooled = self.cached_captions(cached, keep, ("clip_pooled",))[0]
        else:
            effnet = self.effnet_conditions(pixel_values, factor, use)
            pooled = self.encode_captions([c if k else "" for c, k in zip(caption, keep)])[1]  # (B, 1, c_clip)
            latents = self.encode_latents(pixel_values)  # (B, 4, R/4, R/4)
        t, eps = self.draw_noise(latents.shape)
        with paddle.no_grad():
            d = self.gdf.diffuse(latents, epsilon=eps, t=t, shift=TRAIN_SHIFT, loss_shift=TRAIN_SHIFT)
        pred = self.stage_b(d.noised, d.noise_cond, effnet=effnet, clip=pooled)
        loss = ((pred.astype("float32") - d.target) ** 2).mean(axis=[1, 2, 3])  # (B,)
        if self.adaptive:
            self.gdf.loss_weight.update_buckets(d.logSNR, loss)
        return (loss * d.loss_weight).mean()

    @paddle.no_grad()
    def denoising_loss(self, latents, eps, t, effnet, clip) -> float:
        """Mean MSE(pred, epsilon) at fixed noise, times and conditions (held-out evaluation)."""
        with self.evaluating():
            d = self.gdf.diffuse(latents, epsilon=eps, t=t, shift=TRAIN_SHIFT, loss_shift=TRAIN_SHIFT)
            pred = self.stage_b(d.noised, d.noise_cond, effnet=effnet, clip=clip)
            return float(((pred.astype("float32") - d.target) ** 2).mean())

    # -------------------------------------------------------------------------- previews
    default_guidance_scale = PREVIEW_CFG

    @paddle.no_grad()
    def sample_latents(self, effnet: paddle.Tensor, captions: Sequence[str], seed: int, guidance_scale: float,
                       num_inference_steps: int, size) -> paddle.Tensor:
        """Stage B latents [N, 4, *size] of `captions` on EfficientNet latents `effnet`."""
        from ldm.cascade import pipeline as pl

        n = len(captions)
        pooled = self.encode_captions(list(captions))[1]
        u_pooled = self.encode_captions([""] * n)[1]
        cond, uncond = {"effnet": effnet, "clip": pooled}, {"effnet": paddle.zeros_like(effnet), "clip": u_pooled}
        sampling = SamplingConfig(steps=int(num_inference_steps), cfg=float(guidance_scale), shift=PREVIEW_SHIFT)
        return pl.run_gdf(self.gdf, self.stage_b, cond, uncond, sampling, pl.image_noise_fn(seed, n, pl.NOISE_TAG_B),
                          shape=[n, pl.STAGE_B_CHANNELS, *size], desc="preview", progress=False)

    @paddle.no_grad()
    def log_images(self, pixel_values: Optional[paddle.Tensor] = None, prompts: Sequence[str] = DEFAULT_PREVIEW_PROMPTS,
                   num_inference_steps: int = PREVIEW_STEPS, seed: int = 0, ema=None, **unused) -> Dict[str, np.ndarray]:
        """{tag: uint8 [H, W, 3]}: Stage A decodes of Stage B samples on the EfficientNet latents of the
        batch (with the EMA weights when `ema` has them; captions `prompts`), and the Stage A
        reconstruction of the batch. Stage B needs images to condition on: none without a batch."""
        from ldm.cascade import pipeline as pl

        if pixel_values is None:
            return {}
        x = self.pixels(pixel_values).astype("float32")
        n = min(len(prompts), x.shape[0])
        x = x[:n]
        out = {}
        with self.evaluating(ema) as with_ema:
            effnet = self.encode_effnet(x)
            size = [x.shape[-2] // 4, x.shape[-1] // 4]
            lat = self.sample_latents(effnet, list(prompts)[:n], seed, PREVIEW_CFG, num_inference_steps, size)
            img = self.stage_a.decode(lat).clip(0.0, 1.0)
            out["preview/ema" if with_ema else "preview/model"] = np.concatenate(list(pl.to_uint8(img)), axis=1)
            rec = self.stage_a.decode(self.encode_latents(x)).clip(0.0, 1.0)
            out["preview/batch_reconstruction"] = np.concatenate(list(pl.to_uint8(rec)), axis=1)
        return out


def build_stage_b_trainer(model_args, data_args, training_args, components=None, config=None):
    """(DiffusionTrainer, task, ema_callback) ready for `trainer.fit(resume, ema)`; as
    `ldm.train.stage_c.build_stage_c_trainer`."""
    if training_args.eval_captions:
        raise ValueError("--eval_captions samples images from captions alone; Stage B needs a Stage C latent or an "
                         "image to condition on (evaluate the full pipeline with scripts/evaluate.py)")
    comps = components if components is not None else build_stage_b_components(model_args)
    if config is None:
        config = comps.get("stage_b").config if model_args.stage_b else stage_b_config(model_args.model_version)
    cache, keep = encoder_cache_plan(StageBTask, model_args, data_args, training_args)
    comps = without_cached_encoders(comps, cache, StageBTask.cache_encoders, keep)
    task = StageBTask(comps, config, model_args.adaptive_loss_weight, model_args.model_max_length,
                      model_args.caption_dropout, model_args.effnet_prob, seed=training_args.seed,
                      rank=max(training_args.process_index, 0))
    return assemble_trainer(task, model_args, data_args, training_args,
                            dataset=use_encoder_cache(task, comps, cache, keep, training_args))
