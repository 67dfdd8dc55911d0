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

WEIGHTS_PATH: str = os.environ.get("STABLE_CASCADE_WEIGHTS", "./stable_cascade_weights")

# Component files inside WEIGHTS_PATH (names as in the seed's stable_cascade_weights.tar.gz).
EFFNET: str = "effnet_encoder"
STAGE_A: str = "stage_a"
STAGE_B: str = "stage_b_lite"  # "stage_b" for the 3B model
STAGE_C: str = "stage_c_lite"  # "stage_c" for the 3.6B model
PREVIEWER: str = "previewer"
# Hugging Face style folders (config + weights + tokenizer files), converted with
# scripts/convert_other_weight.py from laion/CLIP-ViT-bigG-14-laion2B-39B-b160k and
# openai/clip-vit-large-patch14.
CLIP_TEXT: str = "CLIP-ViT-bigG-14-laion2B-39B-b160k"
CLIP_IMAGE: str = "clip-vit-large-patch14"

MODEL_C_VERSION: str = "1B"  # "1B" (lite) or "3.6B"
MODEL_B_VERSION: str = "700M"  # "700M" (lite) or "3B"
DTYPE: str = "float32"  # "float32", "bfloat16" (recommended on GPU) or "float16"


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
    clip_image: str | None = CLIP_IMAGE
    model_c_version: str = MODEL_C_VERSION
    model_b_version: str = MODEL_B_VERSION
    dtype: str = DTYPE
    extra: dict = field(default_factory=dict)
