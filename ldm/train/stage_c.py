"""Stage C fine-tuning: arguments, the training task (`StageCTask`: its parts and its step), the builder.

Training step (Stability-AI/StableCascade `train/train_c.py` `forward_pass` and `train/base.py`
`get_conditions`, facts only):
- latents: frozen EfficientNet encoder on the ImageNet-normalised [0, 1] image at the training
  resolution R (no extra resize), giving 16 x R/32 x R/32 (24 x 24 at the original 768 px);
- text: frozen CLIP bigG `hidden_states[-1]` [B, 77, 1280] + pooled `text_embeds` [B, 1, 1280];
  each caption is replaced by "" with probability 5%;
- image: CLIP ViT-L/14 `image_embeds` [B, 1, 768] for ~10% of the samples when an image encoder
  is configured (224 bicubic resize + centre crop + CLIP mean/std), zeros otherwise;
- GDF `diffuse(latents, shift=1, loss_shift=1)`; per-sample MSE(pred, epsilon) averaged over
  C, H, W, times the P2 (1 / (1 + SNR)) or adaptive loss weight, averaged over the batch;
  adaptive buckets are updated with the unweighted per-sample losses.
The PaddleNLP Trainer divides the returned loss by `gradient_accumulation_steps` itself
(`Trainer.training_step`), so it is NOT divided here; clipping at `max_grad_norm` is the
Trainer's global-norm clip.

The random draws of the step (caption dropout, image-embedding choice, t and epsilon) come from
the task's own per-rank numpy generator (`TrainingTask.rng`, seeded by (seed, rank)); its state
and the adaptive buckets are saved per rank in every checkpoint (`train_c_state_rank<k>.json`),
so a resumed run continues with the same numbers.

Checkpoint files (`TrainingTask.save_trained` / `save_ema`): `stage_c.safetensors` and
`stage_c_ema.safetensors`, our Paddle layout with the network config in the metadata
(`ldm.cascade.loading.load_stage_c(path, preset=None)` and `inference.py` load them), plus
`train_c_config.json`.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import paddle

from ldm.cascade import settings as cfg_mod
from ldm.cascade.settings import CascadeConfig, SamplingConfig
from ldm.cascade.stage_c import StageCConfig
from ldm.data.buckets import OFFICIAL_ASPECT_RATIOS, parse_aspect_ratios
from ldm.train.args import DiffusionTrainingArguments, check_precision, parse_with_env_defaults
from ldm.train.lora import LoRAArguments, cast_frozen_base, enable_lora, write_lora_files
from ldm.train.task import TrainingTask
from ldm.utils import get_logger

logger = get_logger("ldm.train.stage_c")

__all__ = ["StageCModelArguments", "StageCDataArguments", "StageCTrainingArguments", "parse_stage_c_args",
           "StageCTask", "build_stage_c_trainer", "build_components", "stage_c_config_of", "STAGE_C_FILE",
           "STAGE_C_EMA_FILE", "DEFAULT_PREVIEW_PROMPTS"]

MODEL_VERSIONS = (*cfg_mod.STAGE_C_FILES, "tiny", "demo")
STAGE_C_FILE = "stage_c.safetensors"  # TrainingTask.write_part names: <part>[_ema].safetensors
STAGE_C_EMA_FILE = "stage_c_ema.safetensors"
TRAIN_CONFIG_FILE = "train_c_config.json"
CAPTION_DROPOUT = 0.05  # train/base.py get_conditions: np.random.rand(b) > 0.05 keeps a caption
IMAGE_EMBED_PROB = 0.1  # train/base.py get_conditions: np.random.rand(b) > 0.9 gets an image embedding
TRAIN_SHIFT = 1.0  # train_c.py forward_pass: diffuse(latents, shift=1, loss_shift=1)
PREVIEW_CFG, PREVIEW_SHIFT = 5.0, 1.0  # train_c.py sampling_configs (cfg 5, shift 1)
DEFAULT_PREVIEW_PROMPTS = (
    "A beauty girl in winter",
    "a red fox sitting in the snow, photograph",
    "a bowl of fruit on a wooden table, oil painting",
    "an astronaut riding a horse on the moon",
)
ENV_FLAG_DEFAULTS = {"FLAG_USE_EMA": "use_ema", "FLAG_RECOMPUTE": "recompute"}
NO_IMAGE_ENCODER = ("", "none")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
@dataclass
class CascadeModelArguments(LoRAArguments):
    """The flags the Stable Cascade recipes (Stage C, Stage B) share; a recipe adds its own and
    names its versions (`versions`) and probabilities (`probabilities`) for the checks."""

    weights_path: str = field(default=cfg_mod.WEIGHTS_PATH, metadata={"help": "Folder of the weight files (config.py)."})
    effnet: str = field(default=CascadeConfig.effnet, metadata={"help": "EfficientNet encoder weights."})
    clip_text: str = field(default=CascadeConfig.clip_text, metadata={"help": "CLIP bigG text folder (model + tokenizer)."})
    adaptive_loss_weight: bool = field(default=False, metadata={"help": "AdaptiveLossWeight instead of P2."})
    model_max_length: int = field(default=77, metadata={"help": "Tokenizer max length (captions are truncated)."})
    caption_dropout: float = field(default=CAPTION_DROPOUT, metadata={"help": "Probability of an empty caption."})

    versions = ()
    probabilities = ("caption_dropout",)

    def __post_init__(self):
        super().__post_init__()
        if self.model_version not in self.versions:
            raise ValueError(f"--model_version must be one of {self.versions}, got {self.model_version!r}")
        if self.model_max_length <= 0 or self.num_inference_steps <= 0:
            raise ValueError("--model_max_length and --num_inference_steps must be positive")
        for name in self.probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class StageCModelArguments(CascadeModelArguments):
    model_version: str = field(default=CascadeConfig.model_c_version, metadata={
        "help": "Stage C size: 1B (lite), 3.6B, tiny (random tiny networks, offline, for tests) or demo (the demo "
                "presets; frozen parts from the demo files in --weights_path, scripts/train_demo.sh)."})
    stage_c: Optional[str] = field(default=None, metadata={
        "help": "Stage C weights to fine-tune (name in weights_path or a path); default stage_c_lite (1B) / stage_c "
                "(3.6B). With tiny: optional weights of a tiny Stage C."})
    previewer: str = field(default=CascadeConfig.previewer, metadata={"help": "Previewer weights (preview images)."})
    clip_image: str = field(default=CascadeConfig.clip_image, metadata={
        "help": "CLIP ViT-L/14 vision folder for the image embeddings (used in 1 of 10 steps); 'none' disables (zeros). The default "
                "folder is optional: when it is absent, zeros are used with a warning."})
    num_inference_steps: int = field(default=20, metadata={"help": "Sampler steps of the logged preview images."})
    image_embed_prob: float = field(default=IMAGE_EMBED_PROB, metadata={
        "help": "Probability of a CLIP image embedding (when an image encoder is configured)."})

    versions = MODEL_VERSIONS
    probabilities = ("caption_dropout", "image_embed_prob")


@dataclass
class StageCDataArguments:
    dataset_path: Optional[str] = field(default=None, metadata={
        "help": "Folder of NAME.jpg + NAME.txt pairs (0001.jpg, 0001.txt, ...), or webdataset tar shards: a folder "
                "of *.tar or a pattern such as shards/{00000..00099}.tar (ldm.data.tars)."})
    resolution: int = field(default=768, metadata={"help": "Training image size (square, multiple of 32); "
                                                           "the Stage C latent is resolution / 32."})
    center_crop: bool = field(default=True, metadata={"help": "Centre crop (else a random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flip."})
    skip_missing_captions: bool = field(default=False, metadata={"help": "Skip images without NAME.txt."})
    multi_aspect_ratio: List[str] = field(default_factory=lambda: list(OFFICIAL_ASPECT_RATIOS), metadata={
        "help": "Aspect buckets (ldm.data.buckets): ratios w/h such as 1/1 2/3 3/4 9/16 or 0.75, each in both "
                "orientations; an image goes to the nearest one at about --resolution^2 pixels and every batch holds "
                "one bucket. Default: the official list. 1 turns buckets off (square crops)."})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Encoder cache folder (ldm.data.cache): the frozen encoders' outputs are computed once into it (a "
                "changed image is recomputed) and the run trains from them without building those encoders. Needs "
                "--center_crop True; --random_flip caches both orientations."})

    def __post_init__(self):
        if self.resolution < 32 or self.resolution % 32:
            raise ValueError(f"--resolution must be a positive multiple of 32 (EfficientNet stride), got {self.resolution}")
        parse_aspect_ratios(self.multi_aspect_ratio)  # a bad ratio fails here, not at the dataset


@dataclass
class StageCTrainingArguments(DiffusionTrainingArguments):
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay per optimiser step."})
    preview_prompts: Optional[List[str]] = field(default=None, metadata={
        "help": "Prompts of the logged previews (default: a fixed list of 4)."})


def cascade_defaults(cascade: CascadeConfig) -> dict:
    """Argument defaults taken from a CascadeConfig (the entry point passes the one of config.py)."""
    return dict(model_version=cascade.model_c_version, weights_path=cascade.weights_path, effnet=cascade.effnet,
                previewer=cascade.previewer, clip_text=cascade.clip_text, clip_image=cascade.clip_image or "none")


def parse_stage_c_args(argv=None, cascade: Optional[CascadeConfig] = None):
    """(model, data, training) arguments; FLAG_USE_EMA / FLAG_RECOMPUTE set the flags' defaults, and
    `cascade` (config.py's CASCADE, passed by the entry point) the defaults of the weight flags."""
    model_args, data_args, training_args = parse_with_env_defaults(
        (StageCModelArguments, StageCDataArguments, StageCTrainingArguments), ENV_FLAG_DEFAULTS, argv,
        defaults=cascade_defaults(cascade) if cascade is not None else None)
    if training_args.do_train and not data_args.dataset_path:
        raise ValueError("--dataset_path is required with --do_train (a folder of NAME.jpg + NAME.txt pairs)")
    check_precision(training_args)
    return model_args, data_args, training_args


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------
def build_components(model_args: StageCModelArguments):
    """(Components, has_image_encoder): the tiny preset or the files of config.py / the flags."""
    from ldm.cascade import components as cp

    want_image = str(model_args.clip_image).lower() not in NO_IMAGE_ENCODER
    if model_args.model_version in cp.OFFLINE_PRESETS:  # tiny (random) or demo (the demo files)
        return cp.training_components(model_args.model_version, "stage_c", model_args.stage_c,
                                      model_args.weights_path), want_image
    import dataclasses

    cfg = dataclasses.replace(
        CascadeConfig(), weights_path=model_args.weights_path, effnet=model_args.effnet,
        stage_c=model_args.stage_c or cfg_mod.STAGE_C_FILES[model_args.model_version], previewer=model_args.previewer,
        clip_text=model_args.clip_text, clip_image=model_args.clip_image if want_image else None,
        model_c_version=model_args.model_version, dtype="float32")
    needed = ["tokenizer", "text_encoder", "stage_c", "effnet", "previewer"]
    if want_image:
        folder = os.path.join(cfg.weights_path, cfg.clip_image)
        if os.path.isfile(os.path.join(folder, "config.json")):
            needed.append("image_encoder")
        elif model_args.clip_image != CascadeConfig.clip_image:
            raise FileNotFoundError(f"--clip_image {folder}: no config.json there (pass --clip_image none to train "
                                    f"without image embeddings)")
        else:
            logger.warning("no CLIP image encoder at %s: image embeddings are zeros (the %d%% image-conditioned "
                           "samples of the original recipe are skipped)", folder, round(100 * model_args.image_embed_prob))
            want_image = False
    try:
        return cp.file_components(cfg, needed), want_image
    except cp.MissingWeightsError as e:
        raise cp.MissingWeightsError(f"{e}\nFor an offline demo without weights: --model_version tiny "
                                     f"(MODEL_VERSION=tiny sh train.sh).") from None


def stage_c_config_of(model_version: str) -> StageCConfig:
    """The StageC constructor arguments of a preset (stored in the checkpoint files). Stage C is
    always loaded with its preset, so a file of another size fails with the mismatched keys."""
    from ldm.cascade.stage_c import stage_c_config

    return stage_c_config(model_version)


# ---------------------------------------------------------------------------------------------
# The training task
# ---------------------------------------------------------------------------------------------
class CascadeTask(TrainingTask):
    """What the Stable Cascade recipes (Stage C, Stage B) share beyond TrainingTask: one trained
    network `part` (with its ldm.lora `stage`, `lora_target`), saved as `weight_files` (float32,
    network config in the metadata) + `train_config_file`, the community LoRA files of a
    --lora_rank run, recompute on every block, and the adaptive loss-weight buckets (`self.gdf`,
    `self.adaptive`) in the per-rank task state of every checkpoint."""

    lora_target = ("stage_c", "c")  # (trained part, ldm.lora stage)
    pixel_normalize = "zero_one"  # EfficientNet (ImageNet mean/std after it) and Stage A take [0, 1]
    size_multiple = cfg_mod.EFFNET_STRIDE  # image sides of the aspect buckets (EfficientNet stride)
    weight_files = (STAGE_C_FILE, STAGE_C_EMA_FILE)
    train_config_file = TRAIN_CONFIG_FILE

    base_dtype = "float32"  # of the frozen base of a LoRA run (ldm.train.lora.cast_frozen_base)

    @contextlib.contextmanager
    def evaluating(self, ema=None):
        """TrainingTask.evaluating, under bf16 autocast when the frozen base is stored in bfloat16
        (previews and held-out losses run outside the Trainer's --bf16 step)."""
        with super().evaluating(ema) as with_ema, paddle.amp.auto_cast(
                enable=self.base_dtype == "bfloat16", dtype="bfloat16", level="O1"):
            yield with_ema

    def enable_recompute(self) -> None:
        part = self.lora_target[0]
        getattr(self, part).enable_gradient_checkpointing()
        logger.info("recompute: activation checkpointing on every %s block", part)

    def write_part(self, name: str, folder: str, state, ema: bool) -> None:
        """<part>[_ema].safetensors, float32, with the network config in the metadata."""
        from ldm.weights import save_safetensors, weights_metadata

        path = os.path.join(folder, self.weight_files[1 if ema else 0])
        save_safetensors(state, path, dtype="float32", metadata=weights_metadata(name, self.config))

    def save_trained(self, folder: str, only_updated: bool = True) -> None:
        super().save_trained(folder, only_updated)
        write_lora_files(self, folder)  # with --lora_rank: <part>_lora.safetensors (community format)
        with open(os.path.join(folder, self.train_config_file), "w", encoding="utf-8") as f:
            json.dump({f"{self.lora_target[0]}_config": self.config.to_dict(), "adaptive_loss_weight": self.adaptive},
                      f, indent=1)

    def save_ema(self, folder: str, shadow) -> None:
        super().save_ema(folder, shadow)
        write_lora_files(self, folder, shadow)

    # ---------------------------------------------------------------- encoder cache (--cache_dir)
    cache_encoders = ("effnet", "text_encoder")  # frozen parts the cache replaces
    preview_encoders = ()  # of those, what previews / --eval_captions still need
    cached_constants = None  # {field: array} of the cache's constant entry (the empty caption's outputs)

    def cache_constants(self) -> Dict[str, np.ndarray]:
        """The empty caption's cached fields (what caption dropout swaps in)."""
        return {k: v[0] for k, v in self.cache_captions([""]).items()}

    def cached_captions(self, batch, keep: np.ndarray, names: Sequence[str]):
        """The cached caption fields `names` of the batch, the empty caption's where not keep[i]."""
        if not self.cached_constants:
            raise ValueError("the encoder cache has no empty-caption entry (caption dropout needs it)")
        out = []
        for n in names:
            x = batch[n].astype("float32")
            empty = paddle.to_tensor(np.asarray(self.cached_constants[n], np.float32)).unsqueeze(0).expand(x.shape)
            mask = paddle.to_tensor(keep).reshape([-1] + [1] * (len(x.shape) - 1)).expand(x.shape)
            out.append(paddle.where(mask, x, empty))
        return out

    def drop_cached_encoders(self, keep: Sequence[str] = ()) -> None:
        """Forget the frozen encoders the cache replaces (all but `keep`)."""
        for name in self.cache_encoders:
            if name not in keep and getattr(self, name, None) is not None:
                setattr(self, name, None)

    def train_state(self) -> dict:
        state = super().train_state()
        if self.adaptive:
            state["adaptive_loss"] = self.gdf.loss_weight.state_dict()
        return state

    def set_train_state(self, state: dict) -> None:
        super().set_train_state(state)
        if self.adaptive and "adaptive_loss" in state:
            self.gdf.loss_weight.set_state_dict(state["adaptive_loss"])


class StageCTask(CascadeTask):
    """Stage C (trained) + frozen EfficientNet, CLIP text (+ optional image) encoders, Previewer.

    forward(pixel_values [B, R, R, 3] uint8 (normalised to [0, 1] in the step), caption [B] str) -> scalar loss.
    """

    state_file = "train_c_state_rank{}.json"
    rng_tag = 0x5C

    def __init__(self, components, config, adaptive_loss_weight: bool = False, use_image_encoder: bool = True,
                 model_max_length: int = 77, caption_dropout: float = CAPTION_DROPOUT,
                 image_embed_prob: float = IMAGE_EMBED_PROB, seed: int = 0, rank: int = 0):
        super().__init__(seed=seed, rank=rank)
        from ldm.cascade.gdf import stable_cascade_gdf

        self.config = StageCConfig.from_dict(config)
        self.add_trained("stage_c", components.get("stage_c"))
        self.add_frozen("effnet", components.get("effnet"))
        self.add_frozen("text_encoder", components.get("text_encoder"))
        self.add_frozen("previewer", components.get("previewer"))
        use_image = use_image_encoder and components.has("image_encoder")
        self.add_frozen("image_encoder", components.get("image_encoder") if use_image else None)
        self.tokenizer = components.get("tokenizer")
        max_pos = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", model_max_length)
        if model_max_length > max_pos:
            raise ValueError(f"--model_max_length {model_max_length} exceeds the text encoder's {max_pos} positions")
        self.tokenizer.model_max_length = int(model_max_length)
        self.gdf = stable_cascade_gdf(adaptive_loss_weight=adaptive_loss_weight)
        self.adaptive = bool(adaptive_loss_weight)
        self.caption_dropout, self.image_embed_prob = float(caption_dropout), float(image_embed_prob)
        self.c_clip_img = int(self.stage_c.clip_img_mapper.weight.shape[0])  # paddle Linear weight [in, out]
        self.train()

    # -------------------------------------------------------------------------- conditioning
    @paddle.no_grad()
    def encode_latents(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """[B, 3, R, R] in [0, 1] -> EfficientNet latents [B, 16, R/32, R/32] (float32)."""
        from ldm.cascade.effnet import imagenet_normalize

        return self.effnet(imagenet_normalize(pixel_values.astype("float32"))).astype("float32")

    @paddle.no_grad()
    def encode_captions(self, captions: Sequence[str]):
        from ldm.cascade.pipeline import encode_text

        return encode_text(self.tokenizer, self.text_encoder, [str(c) for c in captions])

    @paddle.no_grad()
    def encode_images(self, pixel_values: paddle.Tensor, use: np.ndarray) -> paddle.Tensor:
        """CLIP image embeddings [B, 1, c_clip_img] for the samples with use[i], zeros elsewhere."""
        b = pixel_values.shape[0]
        emb = np.zeros([b, 1, self.c_clip_img], np.float32)
        if self.image_encoder is not None and use.any():
            from PIL import Image

            from ldm.cascade.pipeline import encode_image

            idx = np.nonzero(use)[0]
            arr = (pixel_values.astype("float32").numpy()[idx].clip(0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)
            emb[idx] = encode_image(self.image_encoder, [Image.fromarray(a) for a in arr]).numpy()
        return paddle.to_tensor(emb)

    def draw(self, shape: Sequence[int]):
        """(t [B], epsilon [B, ...]) from the task's generator (see the module docstring)."""
        from ldm.cascade.gdf.schedules import TRAIN_T_MIN

        u = self.rng.random(shape[0], dtype=np.float32)
        t = np.clip(1.0 - u + TRAIN_T_MIN, TRAIN_T_MIN, 1.0).astype(np.float32)
        eps = self.rng.standard_normal(list(shape), dtype=np.float32)
        return paddle.to_tensor(t), paddle.to_tensor(eps)

    # -------------------------------------------------------------------------- encoder cache
    cache_encoders = ("effnet", "text_encoder", "image_encoder")
    preview_encoders = ("text_encoder",)  # previews sample from the preview prompts

    def cache_images(self, pixel_values: np.ndarray) -> Dict[str, np.ndarray]:
        """Cached image fields: "latents" (EfficientNet), "clip_img" (with an image encoder)."""
        x = self.pixels(pixel_values)
        out = {"latents": self.encode_latents(x).numpy()}
        if self.image_encoder is not None:
            out["clip_img"] = self.encode_images(x, np.ones(x.shape[0], bool)).numpy()
        return out

    def cache_captions(self, captions: Sequence[str]) -> Dict[str, np.ndarray]:
        text, pooled = self.encode_captions(captions)
        return {"clip_text": text.numpy(), "clip_pooled": pooled.numpy()}

    # -------------------------------------------------------------------------- training step
    def forward(self, pixel_values: Optional[paddle.Tensor] = None, caption: Sequence[str] = (), **cached) -> paddle.Tensor:
        pixel_values = self.pixels(pixel_values)  # uint8 [B, H, W, 3] batch -> float32 [B, 3, H, W] in [0, 1]
        b = pixel_values.shape[0] if pixel_values is not None else cached["latents"].shape[0]
        if len(caption) != b:
            raise ValueError(f"{len(caption)} captions for {b} images")
        keep = self.rng.random(b) >= self.caption_dropout
        use_img = self.rng.random(b) < self.image_embed_prob
        if "latents" in cached:  # precomputed encoder outputs (--cache_dir, ldm.data.cache)
            latents = cached["latents"].astype("float32")
            clip_text, clip_pooled = self.cached_captions(cached, keep, ("clip_text", "clip_pooled"))
            clip_img = paddle.zeros([b, 1, self.c_clip_img], "float32")
            if "clip_img" in cached:
                clip_img = paddle.where(paddle.to_tensor(use_img).reshape([-1, 1, 1]).expand(clip_img.shape),
                                        cached["clip_img"].astype("float32"), clip_img)
        else:
            latents = self.encode_latents(pixel_values)  # (B, 16, R/32, R/32)
            clip_text, clip_pooled = self.encode_captions([c if k else "" for c, k in zip(caption, keep)])
            clip_img = self.encode_images(pixel_values, use_img)  # (B, 1, c_clip_img)
        t, eps = self.draw(latents.shape)
        with paddle.no_grad():
            d = self.gdf.diffuse(latents, epsilon=eps, t=t, shift=TRAIN_SHIFT, loss_shift=TRAIN_SHIFT)
        pred = self.stage_c(d.noised, d.noise_cond, clip_text=clip_text, clip_text_pooled=clip_pooled,
                            clip_img=clip_img)  # (B, 16, h, w)
        loss = ((pred.astype("float32") - d.target) ** 2).mean(axis=[1, 2, 3])  # (B,)
        if self.adaptive:
            self.gdf.loss_weight.update_buckets(d.logSNR, loss)
        return (loss * d.loss_weight).mean()

    @paddle.no_grad()
    def denoising_loss(self, latents, eps, t, clip_text, clip_pooled, clip_img, weighted: bool = False) -> float:
        """Mean MSE(pred, epsilon) at fixed noise and times (held-out evaluation; no RNG, no buckets)."""
        with self.evaluating():
            d = self.gdf.diffuse(latents, epsilon=eps, t=t, shift=TRAIN_SHIFT, loss_shift=TRAIN_SHIFT)
            pred = self.stage_c(d.noised, d.noise_cond, clip_text=clip_text, clip_text_pooled=clip_pooled, clip_img=clip_img)
            loss = ((pred.astype("float32") - d.target) ** 2).mean(axis=[1, 2, 3])
            return float((loss * d.loss_weight).mean() if weighted else loss.mean())

    # -------------------------------------------------------------------------- previews
    default_guidance_scale = PREVIEW_CFG

    @paddle.no_grad()
    def sample_images(self, captions: Sequence[str], seed: int, guidance_scale: float, num_inference_steps: int = 20,
                      latent_size: int = 24) -> np.ndarray:
        """uint8 (N, 8 * latent_size, 8 * latent_size, 3): Previewer images of Stage C samples of
        `captions` (GDF with the preview shift, empty-caption guidance; image i from seed + i).
        Stage B and A are not part of a Stage C run, so these previews are what it can score."""
        from ldm.cascade import pipeline as pl

        n = len(captions)
        text, pooled = self.encode_captions(list(captions))
        u_text, u_pooled = self.encode_captions([""] * n)
        img = paddle.zeros([n, 1, self.c_clip_img], "float32")
        cond = {"clip_text": text, "clip_text_pooled": pooled, "clip_img": img}
        uncond = {"clip_text": u_text, "clip_text_pooled": u_pooled, "clip_img": paddle.zeros_like(img)}
        sampling = SamplingConfig(steps=int(num_inference_steps), cfg=float(guidance_scale), shift=PREVIEW_SHIFT)
        latent = pl.run_gdf(self.gdf, self.stage_c, cond, uncond, sampling, pl.image_noise_fn(seed, n, pl.NOISE_TAG_C),
                            shape=[n, pl.STAGE_C_CHANNELS, latent_size, latent_size], desc="preview", progress=False)
        return pl.to_uint8(self.previewer(latent))

    @paddle.no_grad()
    def log_images(self, pixel_values: Optional[paddle.Tensor] = None, prompts: Sequence[str] = DEFAULT_PREVIEW_PROMPTS,
                   num_inference_steps: int = 20, seed: int = 0, latent_size: Optional[int] = None,
                   ema=None) -> Dict[str, np.ndarray]:
        """{tag: uint8 [H, W, 3]}: Previewer images of Stage C samples for the fixed `prompts`
        (side by side; with the EMA weights when `ema` (an EMACallback) has them), and of the
        EfficientNet latents of the current batch (a reconstruction check)."""
        from ldm.cascade import pipeline as pl

        pixel_values = self.pixels(pixel_values)
        n = len(prompts)
        size = latent_size or (pixel_values.shape[-1] // cfg_mod.EFFNET_STRIDE if pixel_values is not None else 24)
        with self.evaluating(ema) as with_ema:
            images = self.sample_images(prompts, seed, PREVIEW_CFG, num_inference_steps, size)
            out = {("preview/ema" if with_ema else "preview/model"): np.concatenate(list(images), axis=1)}
            if pixel_values is not None:
                rec = self.previewer(self.encode_latents(pixel_values[:n]))
                out["preview/batch_reconstruction"] = np.concatenate(list(pl.to_uint8(rec)), axis=1)
        return out


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------
def build_stage_c_trainer(model_args, data_args, training_args, components=None, config=None):
    """(DiffusionTrainer, task, ema_callback) ready for `trainer.train(resume_from_checkpoint=...)`.

    components / config: custom networks and their Stage C config (benchmarks, tests); default:
    `build_components(model_args)` and the preset of `--model_version`."""
    if components is None:
        comps, use_image = build_components(model_args)
    else:
        comps, use_image = components, str(model_args.clip_image).lower() not in NO_IMAGE_ENCODER
    cache, keep = encoder_cache_plan(StageCTask, model_args, data_args, training_args)
    comps = without_cached_encoders(comps, cache, StageCTask.cache_encoders, keep)
    task = StageCTask(comps, config or stage_c_config_of(model_args.model_version), model_args.adaptive_loss_weight,
                      use_image, model_args.model_max_length, model_args.caption_dropout, model_args.image_embed_prob,
                      seed=training_args.seed, rank=max(training_args.process_index, 0))
    return assemble_trainer(task, model_args, data_args, training_args,
                            dataset=use_encoder_cache(task, comps, cache, keep, training_args),
                            latent_size=data_args.resolution // cfg_mod.EFFNET_STRIDE)


# ---------------------------------------------------------------------------------------------
# Encoder cache (--cache_dir): one mechanism, ldm.data.cache
# ---------------------------------------------------------------------------------------------
FINGERPRINT_FLAGS = ("model_version", "weights_path", "effnet", "stage_a", "clip_text", "clip_image", "model_max_length")


def folder_spec(task, data_args, training_args):
    """The DatasetSpec of the trainers' image folder ([0, 1], what EfficientNet and Stage A take), or of
    their tar shards (kind "tar": a folder of tars or a pattern; a stream, square crops, bad samples
    skipped and counted)."""
    from ldm.data import DatasetSpec
    from ldm.data.tars import is_tar_source

    if is_tar_source(data_args.dataset_path):
        if bucket_options(task, data_args):
            logger.warning("%s: tar shards are a stream: no aspect buckets, square %d px crops (--multi_aspect_ratio "
                           "needs a caption folder)", data_args.dataset_path, data_args.resolution)
        return DatasetSpec("tar", data_args.dataset_path, resolution=data_args.resolution,
                           normalize=task.pixel_normalize, center_crop=data_args.center_crop,
                           random_flip=data_args.random_flip, seed=training_args.seed, options={"infinite": True})
    return DatasetSpec("folder", data_args.dataset_path, resolution=data_args.resolution, normalize=task.pixel_normalize,
                       center_crop=data_args.center_crop, random_flip=data_args.random_flip, seed=training_args.seed,
                       options={"skip_missing_captions": data_args.skip_missing_captions,
                                **bucket_options(task, data_args)})


def encoder_cache_plan(task_cls, model_args, data_args, training_args):
    """(the "cached" DatasetSpec of the run or None, the encoders previews keep). The fingerprint
    holds the recipe and the encoder flags, so other encoders never read these entries."""
    if not getattr(data_args, "cache_dir", None) or not training_args.do_train:
        return None, ()
    from ldm.data.cache import cached_spec, check_cacheable

    source = folder_spec(task_cls, data_args, training_args)
    check_cacheable(source)
    fingerprint = json.dumps({"recipe": task_cls.__name__, **{k: getattr(model_args, k, None) for k in FINGERPRINT_FLAGS}},
                             sort_keys=True)
    previews = training_args.image_logging_steps > 0 or getattr(training_args, "eval_captions", None)
    return cached_spec(source, data_args.cache_dir, fingerprint), task_cls.preview_encoders if previews else ()


def without_cached_encoders(comps, cache_spec, encoders, keep):
    """`comps`, with the cached encoders never built when the cache already holds every entry."""
    from ldm.cascade.components import Components
    from ldm.data.cache import missing_entries

    if cache_spec is None or missing_entries(cache_spec):
        return comps
    none = {n: (lambda: None) for n in encoders if n not in keep and comps.has(n)}
    logger.info("encoder cache %s is complete: %s not built", cache_spec.path, ", ".join(sorted(none)) or "nothing")
    return Components({**comps.builders, **none}, comps.dtype)


def use_encoder_cache(task, comps, cache_spec, keep, training_args):
    """The "cached" dataset of the run (missing entries computed with the task's encoders first),
    the encoders it replaces released; None without a cache."""
    if cache_spec is None:
        return None
    from ldm.data import build_dataset
    from ldm.data.cache import build_encoder_cache

    build_encoder_cache(cache_spec, task.cache_images, task.cache_captions, task.cache_constants,
                        batch_size=training_args.per_device_train_batch_size)
    task.drop_cached_encoders(keep)
    comps.release(*[n for n in task.cache_encoders if n not in keep])
    dataset = build_dataset(cache_spec)
    task.cached_constants = dataset.constants
    return dataset


def bucket_options(task, data_args) -> dict:
    """Folder-dataset options of --multi_aspect_ratio (none when it is off): the ratios and the
    task's size multiple (`size_multiple`: 32 for Stage C, 64 for Stage B)."""
    ratios = parse_aspect_ratios(getattr(data_args, "multi_aspect_ratio", None))
    return {"multi_aspect_ratio": ratios, "size_multiple": task.size_multiple} if ratios else {}


def assemble_trainer(task, model_args, data_args, training_args, dataset=None, **image_kwargs):
    """(DiffusionTrainer, task, ema_callback) of a Stable Cascade task: its LoRA adapters
    (--lora_rank), recompute, the folder dataset in [0, 1] (what EfficientNet and Stage A take),
    the standard callbacks (previews with the EMA weights) and the optimiser's parameter list."""
    from ldm.data import build_dataset
    from ldm.train.callbacks import standard_callbacks
    from ldm.train.trainer import DiffusionTrainer

    spec = model_args.lora_spec()
    if spec is not None:  # --lora_rank: only the adapters train (ldm.train.lora)
        enable_lora(task, *task.lora_target, spec, seed=training_args.seed)
        if training_args.bf16 and paddle.is_compiled_with_cuda():  # base frozen, bf16 on GPU (issue 11)
            cast_frozen_base(task, "bfloat16")
    if training_args.recompute:
        task.enable_recompute()
    if dataset is None and training_args.do_train:  # (a given dataset: the encoder cache's)
        dataset = build_dataset(folder_spec(task, data_args, training_args))
    image_kwargs = dict(prompts=tuple(training_args.preview_prompts or DEFAULT_PREVIEW_PROMPTS),
                        num_inference_steps=model_args.num_inference_steps, seed=training_args.seed, **image_kwargs)
    callbacks, ema = standard_callbacks(training_args, image_kwargs, ema_to_images=True)  # previews with the EMA
    trainer = DiffusionTrainer(model=task, args=training_args, train_dataset=dataset, callbacks=callbacks)
    # a flat list of the trained parameters: weight decay on all of them, as the original's AdamW
    # (bitsandbytes AdamW8bit, weight_decay 0.01 everywhere); the frozen encoders get no optimiser
    # state; and the sharding optimisers (ZeRO stage 1/2) accept only a list, not parameter groups
    trainer.set_optimizer_grouped_parameters(list(task.trainable_parameters().values()))
    return trainer, task, ema
