"""Command-line arguments of the Stable Diffusion v1 pretraining script.

The flags follow section 4 of the seed README (PaddleMIX `ppdiffusers/examples/stable_diffusion`
`sd/sd_args.py` names them). Differences on purpose:
- `FLAG_USE_EMA`, `FLAG_RECOMPUTE`, `FLAG_XFORMERS` are read once, here, as the *defaults* of
  `--use_ema`, `--recompute`, `--enable_xformers_memory_efficient_attention`; an explicit flag wins.
- `--unet_learning_rate` becomes the base learning rate; the text encoder gets its own rate through
  a parameter group (`ldm/train/optim.py`), not by overwriting `learning_rate` for everything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ldm.train.args import DiffusionTrainingArguments, parse_with_env_defaults

__all__ = ["SDModelArguments", "SDDataArguments", "SDTrainingArguments", "parse_sd_args", "ENV_FLAG_DEFAULTS"]

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
    num_inference_steps: int = field(default=50, metadata={"help": "Sampling steps of the logged validation images."})
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
        metadata={"help": "A .filelist.list (filelists, optional weights), a .filelist, or one part file."},
    )
    resolution: int = field(default=512, metadata={"help": "Training image size (square)."})
    center_crop: bool = field(default=False, metadata={"help": "Centre crop (default: random crop, as diffusers)."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flip."})
    caption_drop_prob: float = field(
        default=0.1,
        metadata={"help": "Probability of training on an empty caption (SD v1: 10%, what guidance > 1 relies on)."},
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
        default=None, metadata={"help": "Prompts of the logged samples (default: a fixed list of 4)."}
    )
    ignore_data_skip: bool = field(
        default=True,
        metadata={"help": "On resume, do not replay the consumed batches: the data stream is re-seeded instead."},
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
