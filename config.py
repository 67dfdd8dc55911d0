"""Stable Cascade settings of this checkout: edit the values here (the seed: "edit WEIGHTS_PATH in
config.py"), or set the environment variable `STABLE_CASCADE_WEIGHTS`, if the weights are not in
`./stable_cascade_weights` (the folder the README's download step creates).

The package defaults, with what each value means, are in `ldm/cascade/settings.py`; this file
only chooses. The entry points (`inference.py`, `train_stage_c_trainer.py`) read it and pass the
values into `ldm`, which never imports it. No logic lives here.
"""
import dataclasses

from ldm.cascade import settings
from ldm.cascade.settings import (  # noqa: F401  (the names the entry points read)
    BATCH_SIZE, CAPTION, DTYPES, HEIGHT, IMG2IMG_STRENGTH, OUTPUT_PATTERN, SEED, STAGE_B_FILES, STAGE_B_SAMPLING,
    STAGE_C_FILES, STAGE_C_SAMPLING, TINY_SIZE, WIDTH, CascadeConfig, SamplingConfig,
)

WEIGHTS_PATH: str = settings.WEIGHTS_PATH  # e.g. "/data/stable_cascade_weights"

# Which files and versions to use; change a field here to change the default, e.g.
# dataclasses.replace(CascadeConfig(), ..., model_c_version="3.6B", stage_c=STAGE_C_FILES["3.6B"], dtype="bfloat16")
CASCADE: CascadeConfig = dataclasses.replace(CascadeConfig(), weights_path=WEIGHTS_PATH)
