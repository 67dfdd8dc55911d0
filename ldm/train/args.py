"""Training arguments shared by the diffusion trainers: PaddleNLP's `TrainingArguments` plus EMA,
image logging and a debug record of the captions each rank trains on, and the parsing rule for the
`FLAG_*` environment variables (read once, here, as defaults of their explicit flags)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

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
    # training-time evaluation (ldm.train.callbacks.EvaluationCallback), every --eval_steps steps
    eval_captions: Optional[str] = field(default=None, metadata={
        "help": "FID and CLIP score every --eval_steps steps on the first --eval_num_images of these captions "
                "(COCO .tsv/.csv with caption_en or caption, .jsonl, or one per line); logged as eval/fid_g<scale>, "
                "eval/clip_score_g<scale>. Sampling is shared over the data-parallel ranks, "
                "--per_device_eval_batch_size images per call, with the EMA weights when --use_ema."})
    eval_reference: Optional[str] = field(default=None, metadata={
        "help": "FID reference statistics .npz (pytorch-fid --save-stats, PaddleMIX coco_*.npz, scripts/fid_stats.py)."})
    eval_num_images: int = field(default=1000, metadata={"help": "Images per guidance scale (>= 2)."})
    eval_guidance_scales: Optional[List[float]] = field(default=None, metadata={
        "help": "Guidance scales to evaluate (default: the recipe's preview guidance, SD 7.5, Stage C 5)."})
    eval_inception: Optional[str] = field(default=None, metadata={
        "help": "FID Inception weights: inception_fid.safetensors (convert_other_weight.py --inception) or "
                "PaddleMIX's pp_inception-2015-12-05-6726825d.pdparams."})
    eval_clip_dir: Optional[str] = field(default=None, metadata={
        "help": "CLIP for the CLIP score: a folder with clip_text/ and clip_image/ (convert_other_weight.py "
                "--clip_text_dir/--clip_image_dir ... --output_dir)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.eval_captions:
            missing = [f"--{k}" for k in ("eval_reference", "eval_inception", "eval_clip_dir") if not getattr(self, k)]
            if not self.eval_steps or self.eval_steps < 1:
                missing.insert(0, "--eval_steps N")
            if missing:
                raise ValueError(f"--eval_captions needs {', '.join(missing)}")
            if self.eval_num_images < 2:
                raise ValueError(f"--eval_num_images must be >= 2 (FID needs a covariance), got {self.eval_num_images}")
            if self.do_eval:  # PaddleNLP sets it for any --evaluation_strategy other than "no"
                raise ValueError("--eval_captions evaluates through its own callback; leave --do_eval / "
                                 "--evaluation_strategy off (there is no evaluation dataset)")


def parse_with_env_defaults(classes, env_defaults: Dict[str, str], argv=None, defaults: Optional[dict] = None):
    """Parse `classes` (PdArgumentParser dataclasses); `defaults` (argument -> value, e.g. from the
    entry point's config.py) replace the dataclass defaults, and each environment variable of
    `env_defaults` (name -> argument) that is set becomes the default of its argument (0/1/true/false)."""
    parser = PdArgumentParser(classes)
    if any(f.name == "device" for c in classes for f in dataclasses.fields(c)):  # TrainingArguments says "gpu"
        parser.set_defaults(device=paddle.device.get_device().split(":")[0])  # what this process runs on
    parser.set_defaults(**(defaults or {}))
    parser.set_defaults(**{dest: env_bool(env) for env, dest in env_defaults.items() if env in os.environ})
    return parser.parse_args_into_dataclasses(args=argv)


def check_precision(training_args) -> None:
    """fp16 needs a GPU: paddle's GradScaler crashes on CPU, so say so before building anything."""
    if training_args.fp16 and not paddle.device.is_compiled_with_cuda():
        raise ValueError("--fp16 needs a GPU build of paddle (fp16 loss scaling fails on CPU); "
                         "on CPU train in fp32, on a GPU prefer --bf16")
