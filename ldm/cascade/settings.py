"""Stable Cascade run settings: where the weight files are, which model versions, sampler settings
and image-size rules. These are the package defaults; the top-level `config.py` is where a user
changes them (the seed: "edit WEIGHTS_PATH in config.py"), and the entry points pass its values in.
`ldm` itself never imports `config.py`.

A component file name without an extension means `<name>.safetensors` (preferred) or
`<name>.pdparams` (read with the restricted loader, no pickle code runs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ldm.weights import STORAGE_DTYPES

__all__ = ["WEIGHTS_PATH", "STAGE_C_FILES", "STAGE_B_FILES", "SamplingConfig", "CascadeConfig", "STAGE_C_SAMPLING",
           "STAGE_B_SAMPLING", "IMG2IMG_STRENGTH", "DTYPES", "DEMO_WEIGHTS_PATH", "DEMO", "DEMO_REBUILD"]

WEIGHTS_PATH: str = os.environ.get("STABLE_CASCADE_WEIGHTS", "./stable_cascade_weights")

# Model version -> weight file name in WEIGHTS_PATH (names of the seed's stable_cascade_weights.tar.gz).
# These tables are the one list of the released versions (inference/training `choices`).
STAGE_C_FILES = {"1B": "stage_c_lite", "3.6B": "stage_c"}
STAGE_B_FILES = {"700M": "stage_b_lite", "3B": "stage_b"}
DTYPES = STORAGE_DTYPES  # the one dtype table (ldm.weights); float16 is refused with a reason (pipeline.check_dtype)

# The README section that explains how to get the weight files (named in missing-file errors).
README_WEIGHTS_SECTION: str = "Weights: download and convert"

# The seed's example (stable_cascade_README.md).
CAPTION: str = "A beauty girl in winter"
SEED: int = 1
BATCH_SIZE: int = 2
HEIGHT: int = 1024
WIDTH: int = 1024
OUTPUT_PATTERN: str = "result_{}.png"
TINY_SIZE: int = 256  # default image size of the offline presets, `tiny` (a quick CPU run) and `demo` (its size)

# Image sizes: Stage C works at ceil(H / 42.67), Stage B at ceil(H / 4) (Stability-AI/StableCascade
# inference/utils.py calculate_latent_sizes). Stage B patchifies by 2 and halves three times more,
# so multiples of 64 px need no interpolation inside it; sizes are rounded to that.
STAGE_C_COMPRESSION: float = 42.67
STAGE_A_COMPRESSION: float = 4.0
SIZE_MULTIPLE: int = 64
MIN_SIZE: int = 64
MAX_SIZE: int = 4096
EFFNET_STRIDE: int = 32  # an --init_image is resized to 32 x (Stage C latent size) before encoding

@dataclass(frozen=True)
class SamplingConfig:
    """One stage's sampler settings.

    sampler: a name in ``ldm.cascade.gdf.SAMPLERS``: "ddpm" (DDIM with eta 1, the original
    default) or "ddim" (eta 0).
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
    sampler: str = "ddpm"


# Defaults of the official text_to_image notebook: C cfg 4, shift 2, 20 steps; B cfg 1.1, shift 1, 10 steps.
STAGE_C_SAMPLING = SamplingConfig(steps=20, cfg=4.0, shift=2.0)
STAGE_B_SAMPLING = SamplingConfig(steps=10, cfg=1.1, shift=1.0)
# Image-to-image: fraction of the schedule that is re-run (the notebook's noise_level 0.8).
IMG2IMG_STRENGTH: float = 0.8


@dataclass(frozen=True)
class CascadeConfig:
    """Everything ModelC / ModelB need to find and build their parts."""

    weights_path: str = WEIGHTS_PATH
    effnet: str = "effnet_encoder"
    stage_a: str = "stage_a"
    stage_b: str = STAGE_B_FILES["700M"]
    stage_c: str = STAGE_C_FILES["1B"]
    previewer: str = "previewer"
    # Folders (config.json + weights + tokenizer files) written by scripts/convert_other_weight.py from
    # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (text, with projection) and openai/clip-vit-large-patch14
    # (image, needed only for image conditioning).
    clip_text: str = "clip_text"
    clip_image: Optional[str] = "clip_image"
    model_c_version: str = "1B"  # a key of STAGE_C_FILES (or a preset name: "demo")
    model_b_version: str = "700M"  # a key of STAGE_B_FILES (or a preset name: "demo")
    dtype: str = "float32"  # "float32" or "bfloat16" (recommended on GPU)
    # where both samplers start (SamplingConfig.t_start for inference.py's text-to-image): 1 = pure
    # noise, as the original; the demo's tiny networks start at 0.8 (from t = 1, where alpha ~ 0,
    # their epsilon errors blow up in the x0 estimate: Stage B's samples of data latents came out at
    # std ~12 instead of 1; score at 0.9 / 0.8 / 0.7: shape colour 53% / 67% / 72%, background
    # 100% / 100% / 95%)
    t_start: float = 1.0
    readme_section: str = README_WEIGHTS_SECTION
    extra: dict = field(default_factory=dict)


# The shipped demo (issue 14): the "demo" presets of every network, trained by this project on the
# procedural shapes data set (ldm.demo.shapes) and shipped in assets/demo/cascade. The folder is
# found next to the package (the repository checkout), never relative to the working directory.
DEMO_WEIGHTS_PATH: str = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                      "assets", "demo", "cascade")
DEMO_REBUILD: str = "sh scripts/train_demo.sh"  # rebuilds assets/demo from scratch (CPU)
DEMO = CascadeConfig(weights_path=DEMO_WEIGHTS_PATH, stage_b="stage_b", stage_c="stage_c", clip_image=None,
                     model_c_version="demo", model_b_version="demo", t_start=0.8)
