"""Parameter groups with their own learning-rate scale and no weight decay on biases and norms.

Paddle optimisers take a per-group `learning_rate` that MULTIPLIES the scheduled base rate (it
becomes `param.optimize_attr['learning_rate']`), so a group with its own absolute rate gets the
scale `rate / base_rate` and follows the same schedule (warmup, decay) as the base group.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

__all__ = ["NO_DECAY_KEYS", "build_param_groups"]

NO_DECAY_KEYS = ("bias", "norm")


def build_param_groups(
    named_groups: Dict[str, Sequence[Tuple[str, object]]],
    learning_rates: Dict[str, float],
    base_learning_rate: float,
    weight_decay: float,
    no_decay_keys: Sequence[str] = NO_DECAY_KEYS,
) -> List[dict]:
    """{group: [(name, param)]} -> paddle parameter-group dicts (trainable parameters only).

    learning_rates[group] is the absolute rate of that group (missing -> base rate). Parameters
    whose name contains one of `no_decay_keys` (case-insensitive) get weight_decay 0.
    """
    if base_learning_rate <= 0:
        raise ValueError(f"base learning rate must be > 0, got {base_learning_rate}")
    out = []
    for group, params in named_groups.items():
        lr = learning_rates.get(group, base_learning_rate)
        if lr is None or lr < 0:
            raise ValueError(f"learning rate of group {group!r} must be >= 0, got {lr}")
        scale = lr / base_learning_rate
        decay, no_decay = [], []
        for name, p in params:
            if p.stop_gradient:
                continue
            (no_decay if any(k in name.lower() for k in no_decay_keys) else decay).append(p)
        for plist, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if plist:
                out.append({"params": plist, "learning_rate": scale, "weight_decay": wd})
    if not out:
        raise ValueError("no trainable parameters in any group")
    return out
