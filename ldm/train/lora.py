"""LoRA runs of the Stage C and Stage B recipes: the flags and the switch (adapters in `ldm.lora`).

`--lora_rank R` (0: off, full fine-tuning) adds rank-R adapters with `--lora_alpha` (scale
alpha / R) to the `--lora_targets` modules of the trained network; only the adapters train
(`TrainingTask.select_trainable`), so the optimiser state, the EMA and the checkpoints
(`<part>_trainable[_ema].safetensors`) hold only them and a run resumes exactly. Each save also
writes the adapters in the community format (`<part>_lora.safetensors`, and `<part>_lora_ema`
with --use_ema; see ldm.lora) for `inference.py --lora / --lora_b`, ComfyUI and kohya tools.
The official recipe: rank 4, alpha 1, attention (Stability-AI/StableCascade
`configs/training/finetune_c_3b_lora.yaml`, `modules/lora.py`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import paddle

from ldm.lora import TARGETS, LoRASpec, add_lora, save_lora
from ldm.utils import get_logger

logger = get_logger("ldm.train.lora")

__all__ = ["LoRAArguments", "enable_lora", "cast_frozen_base", "write_lora_files", "LORA_FILE"]

LORA_FILE = "{part}_lora{ema}.safetensors"


@dataclass
class LoRAArguments:
    lora_rank: int = field(default=0, metadata={
        "help": "LoRA rank (0: off, the whole network trains). The official recipe: 4."})
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha (the adapter output is scaled by alpha / rank)."})
    lora_targets: str = field(default="attention", metadata={
        "help": "Modules that get adapters: attention (q/k/v/out projections, the official recipe), linear "
                "(every Linear), all (Linears and convolutions)."})

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_targets not in TARGETS:
            raise ValueError(f"--lora_targets must be one of {TARGETS}, got {self.lora_targets!r}")
        if self.lora_rank and not self.lora_alpha > 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}")

    def lora_spec(self):
        return LoRASpec(self.lora_rank, self.lora_alpha, self.lora_targets) if self.lora_rank else None


def enable_lora(task, part: str, stage: str, spec: LoRASpec, seed: int = 0) -> int:
    """Adapters on trained part `part` of `task`; only they train from now on. Returns how many
    tensors train."""
    add_lora(getattr(task, part), spec, seed=seed)
    task.lora = (part, stage, spec)
    n = task.select_trainable(lambda name, p: ".lora_" in name)
    logger.info("LoRA: %d adapter tensors train, the base network is frozen", n)
    return n


def cast_frozen_base(task, dtype: str = "bfloat16") -> int:
    """Store the frozen base of a LoRA task's trained part in `dtype` (issue 11 section 2: "only the
    adapters train (base frozen, bf16 on GPU)"): every floating parameter that does not train is cast
    in place; the adapters stay float32 (their master weights, what the optimiser and EMA update).
    The recipe's assembly calls it for --lora_rank with --bf16 on a CUDA build; the forward then
    needs bf16 autocast (the Trainer's --bf16 step, `CascadeTask.evaluating` for previews).
    Returns how many parameters were cast."""
    if getattr(task, "lora", None) is None:
        raise ValueError("cast_frozen_base: the task has no LoRA adapters (--lora_rank 0 trains the whole network)")
    layer, target = getattr(task, task.lora[0]), getattr(paddle, dtype)
    n = 0
    for p in layer.parameters():
        if p.stop_gradient and paddle.is_floating_point(p) and p.dtype != target:
            layer._transform(p, None, dtype, None)  # in place: the Parameter objects stay the same
            n += 1
    task.base_dtype = dtype
    logger.info("LoRA: %d frozen base parameters stored in %s, the adapters in float32", n, dtype)
    return n


def write_lora_files(task, folder: str, shadow=None) -> None:
    """`<part>_lora.safetensors` (community format) of a LoRA task; with `shadow` (EMA weights keyed
    like `task.ema_parameters()`) `<part>_lora_ema.safetensors`."""
    lora = getattr(task, "lora", None)
    if lora is None:
        return
    part, stage, spec = lora
    values = None
    if shadow is not None:
        values = {k[len(part) + 1:]: v for k, v in shadow.items() if k.startswith(part + ".")}
    path = os.path.join(folder, LORA_FILE.format(part=part, ema="_ema" if shadow is not None else ""))
    save_lora(getattr(task, part), stage, path, spec, values=values, extra={"ema": shadow is not None})
