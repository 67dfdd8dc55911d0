"""Stage C fine-tuning: arguments, the training Layer whose `forward` returns the loss, builders.

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
this Layer's own numpy generator seeded by (seed, rank): each rank gets different noise, and the
generator state (plus the adaptive buckets) is saved per rank in every checkpoint
(`train_c_state_rank<k>.json`) so that a resumed run continues with the same numbers.

Checkpoint files written through the hooks of `ldm/train` (`save_trained`, `save_ema`):
`stage_c.safetensors` and `stage_c_ema.safetensors`, our Paddle layout with the network config in
the metadata (`ldm.cascade.stage_c.load_stage_c(path, preset=None)` and `inference.py` load them).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import paddle
import paddle.nn as nn
from paddlenlp.trainer import TrainerCallback

from ldm.cascade import settings as cfg_mod
from ldm.cascade.settings import CascadeConfig, SamplingConfig
from ldm.cascade.stage_c import StageCConfig
from ldm.train.args import DiffusionTrainingArguments, check_precision, parse_with_env_defaults
from ldm.utils import atomic_open, get_logger

logger = get_logger("ldm.cascade.train_c")

__all__ = ["StageCModelArguments", "StageCDataArguments", "StageCTrainingArguments", "parse_stage_c_args",
           "StageCTrainer", "build_stage_c_trainer", "TrainStateCallback", "STAGE_C_FILE", "STAGE_C_EMA_FILE",
           "DEFAULT_PREVIEW_PROMPTS", "enable_recompute", "write_stage_c"]

MODEL_VERSIONS = (*cfg_mod.STAGE_C_FILES, "tiny")
STAGE_C_FILE = "stage_c.safetensors"
STAGE_C_EMA_FILE = "stage_c_ema.safetensors"
STATE_FILE = "train_c_state_rank{}.json"
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
class StageCModelArguments:
    model_version: str = field(default=CascadeConfig.model_c_version, metadata={
        "help": "Stage C size: 1B (lite), 3.6B, or tiny (random tiny networks, offline, for tests/demos)."})
    weights_path: str = field(default=cfg_mod.WEIGHTS_PATH, metadata={"help": "Folder of the weight files (config.py)."})
    stage_c: Optional[str] = field(default=None, metadata={
        "help": "Stage C weights to fine-tune (name in weights_path or a path); default stage_c_lite (1B) / stage_c "
                "(3.6B). With tiny: optional weights of a tiny Stage C."})
    effnet: str = field(default=CascadeConfig.effnet, metadata={"help": "EfficientNet encoder weights."})
    previewer: str = field(default=CascadeConfig.previewer, metadata={"help": "Previewer weights (preview images)."})
    clip_text: str = field(default=CascadeConfig.clip_text, metadata={"help": "CLIP bigG text folder (model + tokenizer)."})
    clip_image: str = field(default=CascadeConfig.clip_image, metadata={
        "help": "CLIP ViT-L/14 vision folder for the 10% image embeddings; 'none' disables (zeros). The default "
                "folder is optional: when it is absent, zeros are used with a warning."})
    adaptive_loss_weight: bool = field(default=False, metadata={"help": "AdaptiveLossWeight instead of P2."})
    model_max_length: int = field(default=77, metadata={"help": "Tokenizer max length (captions are truncated)."})
    num_inference_steps: int = field(default=20, metadata={"help": "Sampler steps of the logged preview images."})
    caption_dropout: float = field(default=CAPTION_DROPOUT, metadata={"help": "Probability of an empty caption."})
    image_embed_prob: float = field(default=IMAGE_EMBED_PROB, metadata={
        "help": "Probability of a CLIP image embedding (when an image encoder is configured)."})

    def __post_init__(self):
        if self.model_version not in MODEL_VERSIONS:
            raise ValueError(f"--model_version must be one of {MODEL_VERSIONS}, got {self.model_version!r}")
        if self.model_max_length <= 0 or self.num_inference_steps <= 0:
            raise ValueError("--model_max_length and --num_inference_steps must be positive")
        for name in ("caption_dropout", "image_embed_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class StageCDataArguments:
    dataset_path: Optional[str] = field(default=None, metadata={
        "help": "Folder of NAME.jpg + NAME.txt pairs (0001.jpg, 0001.txt, ...)."})
    resolution: int = field(default=768, metadata={"help": "Training image size (square, multiple of 32); "
                                                           "the Stage C latent is resolution / 32."})
    center_crop: bool = field(default=True, metadata={"help": "Centre crop (else a random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flip."})
    skip_missing_captions: bool = field(default=False, metadata={"help": "Skip images without NAME.txt."})

    def __post_init__(self):
        if self.resolution < 32 or self.resolution % 32:
            raise ValueError(f"--resolution must be a positive multiple of 32 (EfficientNet stride), got {self.resolution}")


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
    if model_args.model_version == "tiny":
        from ldm.cascade.stage_c import load_stage_c

        comps = cp.tiny_components()
        if model_args.stage_c:
            comps.builders["stage_c"] = lambda: load_stage_c(model_args.stage_c, "tiny")
        return comps, want_image
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


def enable_recompute(net: nn.Layer) -> None:
    """Recompute (activation checkpointing) of every Stage C block in training mode.

    StageC runs its blocks through `_run_block(block, x, r_embed, clip, skip)`; an instance
    attribute with the same name wraps each call in `paddle.distributed.fleet.utils.recompute`,
    so only the block inputs are kept between forward and backward.
    """
    from paddle.distributed.fleet.utils import recompute

    run = getattr(type(net), "_run_block", None)
    if run is None:
        raise TypeError(f"{type(net).__name__} has no _run_block: --recompute cannot wrap its blocks")

    def run_block(block, x, r_embed, clip, skip=None):
        if not net.training:
            return run(block, x, r_embed, clip, skip)
        return recompute(run, block, x, r_embed, clip, skip, use_reentrant=False)

    net._run_block = run_block


def write_stage_c(items, path: str, config, dtype: Optional[str] = None) -> None:
    """Stream (name, array|Tensor) pairs into our Stage C safetensors layout (config in metadata)."""
    from ldm.cascade.loading import FORMAT_TAG
    from ldm.weights.io import SafetensorsWriter, to_storage

    def arr(v):
        return v.astype("float32").numpy() if isinstance(v, paddle.Tensor) and v.dtype != paddle.float32 else (
            v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v))

    items = list(items)
    probe = {k: to_storage(np.zeros((0,), np.float32), dtype)[1] for k, _ in items}
    meta = {"format": FORMAT_TAG, "stage": "c", "config": StageCConfig.from_dict(config).to_json()}
    with SafetensorsWriter(path, [(k, tuple(v.shape), probe[k]) for k, v in items], meta) as w:
        for k, v in items:
            w.write(k, to_storage(arr(v).astype(np.float32, copy=False), dtype)[0])


# ---------------------------------------------------------------------------------------------
# The training Layer
# ---------------------------------------------------------------------------------------------
class StageCTrainer(nn.Layer):
    """Stage C (trained) + frozen EfficientNet, CLIP text (+ optional image) encoders, Previewer.

    forward(pixel_values [B, 3, R, R] in [0, 1], caption [B] str) -> scalar loss.
    Implements the hooks of `ldm/train`: ema_parameters, save_ema/load_ema, save_trained/
    load_trained, log_images, param_groups.
    """

    def __init__(self, components, config: dict, adaptive_loss_weight: bool = False, use_image_encoder: bool = True,
                 model_max_length: int = 77, caption_dropout: float = CAPTION_DROPOUT,
                 image_embed_prob: float = IMAGE_EMBED_PROB, seed: int = 0, rank: int = 0):
        super().__init__()
        from ldm.cascade.gdf import stable_cascade_gdf

        self.components = components
        self.config = StageCConfig.from_dict(config)
        self.stage_c = components.get("stage_c")
        self.effnet = components.get("effnet")
        self.text_encoder = components.get("text_encoder")
        self.previewer = components.get("previewer")
        self.image_encoder = components.get("image_encoder") if use_image_encoder and components.has("image_encoder") else None
        self.tokenizer = components.get("tokenizer")
        max_pos = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", model_max_length)
        if model_max_length > max_pos:
            raise ValueError(f"--model_max_length {model_max_length} exceeds the text encoder's {max_pos} positions")
        self.tokenizer.model_max_length = int(model_max_length)
        self.frozen = [m for m in (self.effnet, self.text_encoder, self.image_encoder, self.previewer) if m is not None]
        for m in self.frozen:
            for p in m.parameters():
                p.stop_gradient = True
        for p in self.stage_c.parameters():
            p.stop_gradient = False
        self.gdf = stable_cascade_gdf(adaptive_loss_weight=adaptive_loss_weight)
        self.adaptive = bool(adaptive_loss_weight)
        self.caption_dropout, self.image_embed_prob = float(caption_dropout), float(image_embed_prob)
        self.c_clip_img = int(self.stage_c.clip_img_mapper.weight.shape[0])  # paddle Linear weight [in, out]
        self.seed, self.rank = int(seed), int(rank)
        self.rng = np.random.default_rng([self.seed, self.rank, 0x5C])
        self.train()

    # -------------------------------------------------------------------------- modes
    def train(self):
        super().train()
        self._freeze_modes()
        return self

    def _freeze_modes(self):
        """Frozen parts stay in eval mode (BatchNorm statistics, dropout), even after a wrapper
        such as DataParallel set `training` on every sublayer."""
        for m in self.frozen:
            if m.training:
                m.eval()

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
        """(t [B], epsilon [B, ...]) from this Layer's generator (see the module docstring)."""
        from ldm.cascade.gdf.schedules import TRAIN_T_MIN

        u = self.rng.random(shape[0], dtype=np.float32)
        t = np.clip(1.0 - u + TRAIN_T_MIN, TRAIN_T_MIN, 1.0).astype(np.float32)
        eps = self.rng.standard_normal(list(shape), dtype=np.float32)
        return paddle.to_tensor(t), paddle.to_tensor(eps)

    # -------------------------------------------------------------------------- training step
    def forward(self, pixel_values: paddle.Tensor, caption: Sequence[str], **unused) -> paddle.Tensor:
        self._freeze_modes()
        b = pixel_values.shape[0]
        if len(caption) != b:
            raise ValueError(f"{len(caption)} captions for {b} images")
        keep = self.rng.random(b) >= self.caption_dropout
        use_img = self.rng.random(b) < self.image_embed_prob
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
        was = self.stage_c.training
        self.stage_c.eval()
        try:
            d = self.gdf.diffuse(latents, epsilon=eps, t=t, shift=TRAIN_SHIFT, loss_shift=TRAIN_SHIFT)
            pred = self.stage_c(d.noised, d.noise_cond, clip_text=clip_text, clip_text_pooled=clip_pooled, clip_img=clip_img)
            loss = ((pred.astype("float32") - d.target) ** 2).mean(axis=[1, 2, 3])
            return float((loss * d.loss_weight).mean() if weighted else loss.mean())
        finally:
            if was:
                self.stage_c.train()

    # -------------------------------------------------------------------------- ldm/train hooks
    def param_groups(self) -> Dict[str, List]:
        return {"stage_c": [(f"stage_c.{n}", p) for n, p in self.stage_c.named_parameters()]}

    def ema_parameters(self) -> Dict[str, paddle.Tensor]:
        return dict(self.stage_c.named_parameters())

    def save_ema(self, checkpoint_dir: str, shadow: Dict[str, paddle.Tensor]) -> None:
        state = [(k, shadow.get(k, v)) for k, v in self.stage_c.state_dict().items()]
        write_stage_c(state, os.path.join(checkpoint_dir, STAGE_C_EMA_FILE), self.config)

    def load_ema(self, checkpoint_dir: str) -> Optional[Dict[str, np.ndarray]]:
        from ldm.weights.io import iter_state_dict

        path = os.path.join(checkpoint_dir, STAGE_C_EMA_FILE)
        return dict(iter_state_dict(path)) if os.path.isfile(path) else None

    def save_trained(self, output_dir: str, only_updated: bool = True) -> None:
        write_stage_c(self.stage_c.state_dict().items(), os.path.join(output_dir, STAGE_C_FILE), self.config)
        with open(os.path.join(output_dir, TRAIN_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({"stage_c_config": self.config.to_dict(), "adaptive_loss_weight": self.adaptive}, f, indent=1)

    def load_trained(self, checkpoint_dir: str) -> None:
        from ldm.weights.io import assign_state_dict, iter_state_dict

        path = os.path.join(checkpoint_dir, STAGE_C_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{checkpoint_dir} has no {STAGE_C_FILE}: not a Stage C checkpoint")
        assign_state_dict(self.stage_c, list(iter_state_dict(path)), where=path)
        logger.info("restored Stage C from %s", path)

    def train_state(self) -> dict:
        state = {"rng": self.rng.bit_generator.state}
        if self.adaptive:
            state["adaptive_loss"] = self.gdf.loss_weight.state_dict()
        return state

    def set_train_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        if self.adaptive and "adaptive_loss" in state:
            self.gdf.loss_weight.set_state_dict(state["adaptive_loss"])

    # -------------------------------------------------------------------------- previews
    @paddle.no_grad()
    def log_images(self, pixel_values: Optional[paddle.Tensor] = None, prompts: Sequence[str] = DEFAULT_PREVIEW_PROMPTS,
                   num_inference_steps: int = 20, seed: int = 0, latent_size: Optional[int] = None,
                   ema=None) -> Dict[str, np.ndarray]:
        """{tag: uint8 [H, W, 3]}: Previewer images of Stage C samples for the fixed `prompts`
        (side by side; with the EMA weights when `ema` (an EMACallback) has them), and of the
        EfficientNet latents of the current batch (a reconstruction check)."""
        from ldm.cascade import pipeline as pl

        shadow = getattr(ema, "shadow", None) or None
        n = len(prompts)
        size = latent_size or (pixel_values.shape[-1] // cfg_mod.EFFNET_STRIDE if pixel_values is not None else 24)
        was = self.stage_c.training
        self.stage_c.eval()
        backup = self._swap_in(shadow) if shadow else None
        try:
            text, pooled = self.encode_captions(list(prompts))
            u_text, u_pooled = self.encode_captions([""] * n)
            img = paddle.zeros([n, 1, self.c_clip_img], "float32")
            cond = {"clip_text": text, "clip_text_pooled": pooled, "clip_img": img}
            uncond = {"clip_text": u_text, "clip_text_pooled": u_pooled, "clip_img": paddle.zeros_like(img)}
            sampling = SamplingConfig(steps=int(num_inference_steps), cfg=PREVIEW_CFG, shift=PREVIEW_SHIFT)
            latent = pl.run_gdf(self.gdf, self.stage_c, cond, uncond, sampling, pl.image_noise_fn(seed, n, pl.NOISE_TAG_C),
                                shape=[n, pl.STAGE_C_CHANNELS, size, size], desc="preview", progress=False)
            out = {("preview/ema" if shadow else "preview/model"): np.concatenate(list(pl.to_uint8(self.previewer(latent))), axis=1)}
            if pixel_values is not None:
                rec = self.previewer(self.encode_latents(pixel_values[:n]))
                out["preview/batch_reconstruction"] = np.concatenate(list(pl.to_uint8(rec)), axis=1)
        finally:
            if backup is not None:
                self._swap_in(backup)
            if was:
                self.stage_c.train()
        return out

    def _swap_in(self, values: Dict[str, paddle.Tensor]) -> Dict[str, np.ndarray]:
        """Set Stage C parameters to `values`; return the previous ones (host copies)."""
        old = {}
        for k, p in self.stage_c.named_parameters():
            if k in values:
                old[k] = p.numpy()
                v = values[k]
                p.set_value(v.astype(p.dtype) if isinstance(v, paddle.Tensor) else paddle.to_tensor(v).astype(p.dtype))
        return old


# ---------------------------------------------------------------------------------------------
# Callbacks and assembly
# ---------------------------------------------------------------------------------------------
class TrainStateCallback(TrainerCallback):
    """Saves the Layer's per-rank generator state (+ adaptive buckets) into each checkpoint and
    restores it when training resumes; sets the dataset epoch (fresh random crops per epoch)."""

    def __init__(self, layer: StageCTrainer, dataset=None):
        self.layer, self.dataset = layer, dataset

    def on_train_begin(self, args, state, control, **kwargs):
        resume = getattr(args, "resume_from_checkpoint", None)
        if state.global_step > 0 and resume and os.path.isdir(str(resume)):
            path = os.path.join(str(resume), STATE_FILE.format(self.layer.rank))
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    self.layer.set_train_state(json.load(f))
            else:
                logger.warning("%s missing: the training noise stream restarts from the seed", path)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch + 1e-6))

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        with atomic_open(os.path.join(folder, STATE_FILE.format(self.layer.rank)), "w") as f:
            json.dump(self.layer.train_state(), f)
        if args.world_size > 1:  # every rank's file exists before rank 0 marks the checkpoint complete
            paddle.distributed.barrier()


def build_stage_c_trainer(model_args, data_args, training_args, components=None, config: Optional[dict] = None):
    """(DiffusionTrainer, layer, ema_callback) ready for `trainer.train(resume_from_checkpoint=...)`.

    components / config: custom networks and their Stage C config (benchmarks, tests); default:
    `build_components(model_args)` and the preset of `--model_version`."""
    from ldm.data import DatasetSpec, build_dataset
    from ldm.train.callbacks import standard_callbacks
    from ldm.train.trainer import DiffusionTrainer

    if components is None:
        comps, use_image = build_components(model_args)
    else:
        comps, use_image = components, str(model_args.clip_image).lower() not in NO_IMAGE_ENCODER
    rank = max(training_args.process_index, 0)
    layer = StageCTrainer(comps, config or stage_c_config_of(model_args.model_version), model_args.adaptive_loss_weight,
                          use_image, model_args.model_max_length, model_args.caption_dropout,
                          model_args.image_embed_prob, seed=training_args.seed, rank=rank)
    if training_args.recompute:
        enable_recompute(layer.stage_c)
        logger.info("recompute: activation checkpointing on every Stage C block")
    dataset = build_dataset(DatasetSpec(  # [0, 1]: what EfficientNet takes
        "folder", data_args.dataset_path, resolution=data_args.resolution, normalize="zero_one",
        center_crop=data_args.center_crop, random_flip=data_args.random_flip, seed=training_args.seed,
        options={"skip_missing_captions": data_args.skip_missing_captions})) if training_args.do_train else None
    image_kwargs = dict(prompts=tuple(training_args.preview_prompts or DEFAULT_PREVIEW_PROMPTS),
                        num_inference_steps=model_args.num_inference_steps, seed=training_args.seed,
                        latent_size=data_args.resolution // cfg_mod.EFFNET_STRIDE)
    callbacks, ema = standard_callbacks(training_args, image_kwargs, extra=[TrainStateCallback(layer, dataset)],
                                        ema_to_images=True)  # previews with the EMA weights
    trainer = DiffusionTrainer(model=layer, args=training_args, train_dataset=dataset, callbacks=callbacks)
    # a flat list of the Stage C parameters: weight decay on all of them, as the original's AdamW
    # (bitsandbytes AdamW8bit, weight_decay 0.01 everywhere); the frozen encoders get no optimiser
    # state; and the sharding optimisers (ZeRO stage 1/2) accept only a list, not parameter groups
    trainer.set_optimizer_grouped_parameters([p for _, p in layer.param_groups()["stage_c"] if not p.stop_gradient])
    return trainer, layer, ema
