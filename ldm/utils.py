"""Small shared helpers: logging, seeding, distributed rank information, bool env flags."""
from __future__ import annotations

import logging
import os
import random

import numpy as np

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def get_logger(name: str = "ldm") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def parse_bool(value, name: str = "value") -> bool:
    """Parse 0/1/true/false/yes/no (any case). Raises ValueError naming `name` otherwise."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}: cannot read {value!r} as a boolean (use 0/1/true/false)")


def env_bool(name: str, default: bool = False) -> bool:
    """Read a boolean environment variable once (used only in argument parsing, as a default)."""
    raw = os.environ.get(name)
    return default if raw is None else parse_bool(raw, name)


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from paddle.distributed, falling back to the launcher's env vars."""
    try:
        import paddle.distributed as dist

        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - paddle missing or not initialised
        pass
    rank = int(os.environ.get("PADDLE_TRAINER_ID", os.environ.get("RANK", 0)))
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", os.environ.get("WORLD_SIZE", 1)))
    return rank, world


def set_seed(seed: int) -> None:
    import paddle

    random.seed(seed)
    np.random.seed(seed % 2**32)
    paddle.seed(seed)
