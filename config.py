"""Stable Cascade settings: where the weights are, which model versions, which dtype.

Edit `WEIGHTS_PATH` here, or set the environment variable `STABLE_CASCADE_WEIGHTS`, if the
weights are not in `./stable_cascade_weights` (the folder the README's download step creates).
Each component may be a `.safetensors` file (the default, produced by `scripts/convert_*.py`) or
the seed's pre-converted `.pdparams` (read with a restricted loader that runs no pickle code):
for a file name given without an extension, `<name>.safetensors` is preferred and
`<name>.pdparams` is used when only that exists.

No logic lives here: the `ldm` package resolves and checks the paths.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

WEIGHTS_PATH: str = os.environ.get("STABLE_CASCADE_WEIGHTS", "./stable_cascade_weights")

# Component files inside WEIGHTS_PATH (names as in the seed's stable_cascade_weights.tar.gz).
EFFNET: str = "effnet_encoder"
STAGE_A: str = "stage_a"
STAGE_B: str = "stage_b_lite"  # "stage_b" for the 3B model
STAGE_C: str = "stage_c_lite"  # "stage_c" for the 3.6B model
PREVIEWER: str = "previewer"
# Folders (config.json + weights + tokenizer files) written by scripts/convert_other_weight.py
# (its default output names) from laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (text, with
# projection) and openai/clip-vit-large-patch14 (image, needed only for --image).
CLIP_TEXT: str = "clip_text"
CLIP_IMAGE: str = "clip_image"

# File names of each version (used when `inference.py --model_c_version/--model_b_version` changes it).
STAGE_C_FILES = {"1B": "stage_c_lite", "3.6B": "stage_c"}
STAGE_B_FILES = {"700M": "stage_b_lite", "3B": "stage_b"}
MODEL_C_VERSION: str = "1B"  # "1B" (lite) or "3.6B"
MODEL_B_VERSION: str = "700M"  # "700M" (lite) or "3B"
DTYPE: str = "float32"  # "float32", "bfloat16" (recommended on GPU) or "float16"
DTYPES = ("float32", "bfloat16", "float16")

# The README section that explains how to get the files above (named in missing-file errors).
README_WEIGHTS_SECTION: str = "Weights: download and convert"

# The seed's example (stable_cascade_README.md "模型推理").
CAPTION: str = "A beauty girl in winter"
SEED: int = 1
BATCH_SIZE: int = 2
HEIGHT: int = 1024
WIDTH: int = 1024
OUTPUT_PATTERN: str = "result_{}.png"
TINY_SIZE: int = 256  # default image size of `inference.py --preset tiny` (a quick CPU run)

# Image sizes: Stage C works at ceil(H / 42.67), Stage B at ceil(H / 4) (inference/utils.py of
# Stability-AI/StableCascade, calculate_latent_sizes). Stage B patchifies by 2 and halves three
# times more, so multiples of 64 px need no interpolation inside it; sizes are rounded to that.
STAGE_C_COMPRESSION: float = 42.67
STAGE_A_COMPRESSION: float = 4.0
SIZE_MULTIPLE: int = 64
MIN_SIZE: int = 64
MAX_SIZE: int = 4096
# EfficientNet stride: an --init_image is resized to 32 x (Stage C latent size) before encoding.
EFFNET_STRIDE: int = 32


@dataclass(frozen=True)
class SamplingConfig:
    """One stage's sampler settings (GDF DDPM sampler = DDIM with eta 1).

    cfg_rho rescales the guided prediction toward the conditional one's std (the original
    GDF.sample default 0.7); per_sample_rho computes those stds per image instead of over the
    batch, so an image does not depend on the other images of its batch.
    """

    steps: int
    cfg: float
    shift: float
    cfg_rho: float = 0.7
    t_start: float = 1.0
    per_sample_rho: bool = True


# Defaults of the official text_to_image notebook: C cfg 4, shift 2, 20 steps; B cfg 1.1, shift 1, 10 steps.
STAGE_C_SAMPLING = SamplingConfig(steps=20, cfg=4.0, shift=2.0)
STAGE_B_SAMPLING = SamplingConfig(steps=10, cfg=1.1, shift=1.0)
# Image-to-image: fraction of the schedule that is re-run (the notebook's noise_level 0.8).
IMG2IMG_STRENGTH: float = 0.8


@dataclass(frozen=True)
class CascadeConfig:
    """Everything ModelC / ModelB need to find and build their parts."""

    weights_path: str = WEIGHTS_PATH
    effnet: str = EFFNET
    stage_a: str = STAGE_A
    stage_b: str = STAGE_B
    stage_c: str = STAGE_C
    previewer: str = PREVIEWER
    clip_text: str = CLIP_TEXT
    clip_image: Optional[str] = CLIP_IMAGE
    model_c_version: str = MODEL_C_VERSION
    model_b_version: str = MODEL_B_VERSION
    dtype: str = DTYPE
    readme_section: str = README_WEIGHTS_SECTION
    extra: dict = field(default_factory=dict)
