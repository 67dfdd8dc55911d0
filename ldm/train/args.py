"""Training arguments shared by the diffusion trainers: PaddleNLP's `TrainingArguments` plus EMA,
image logging and a debug record of the captions each rank trains on, and the parsing rule for the
`FLAG_*` environment variables (read once, here, as defaults of their explicit flags)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import paddle
from paddlenlp.trainer import PdArgumentParser, TrainingArguments

from ldm.utils import env_bool

__all__ = ["DiffusionTrainingArguments", "parse_with_env_defaults", "check_precision"]


@dataclass
class DiffusionTrainingArguments(TrainingArguments):
    image_logging_steps: int = field(default=1000, metadata={"help": "Log sample images every N steps (<=0: off)."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the trained weights (default from FLAG_USE_EMA)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimiser step."})
    record_log_dir: Optional[str] = field(
        default=None, metadata={"help": "Debug: append the captions each rank trains on to <dir>/rank<k>.txt."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")


def parse_with_env_defaults(classes, env_defaults: Dict[str, str], argv=None, defaults: Optional[dict] = None):
    """Parse `classes` (PdArgumentParser dataclasses); `defaults` (argument -> value, e.g. from the
    entry point's config.py) replace the dataclass defaults, and each environment variable of
    `env_defaults` (name -> argument) that is set becomes the default of its argument (0/1/true/false)."""
    parser = PdArgumentParser(classes)
    parser.set_defaults(**(defaults or {}))
    parser.set_defaults(**{dest: env_bool(env) for env, dest in env_defaults.items() if env in os.environ})
    return parser.parse_args_into_dataclasses(args=argv)


def check_precision(training_args) -> None:
    """fp16 needs a GPU: paddle's GradScaler crashes on CPU, so say so before building anything."""
    if training_args.fp16 and not paddle.device.is_compiled_with_cuda():
        raise ValueError("--fp16 needs a GPU build of paddle (fp16 loss scaling fails on CPU); "
                         "on CPU train in fp32, on a GPU prefer --bf16")
