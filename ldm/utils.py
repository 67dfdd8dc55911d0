"""Small shared helpers: logging, seeding, distributed rank information, bool env flags."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile

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


def temp_file_next_to(path: str) -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder (same filesystem, so os.replace onto
    `path` is atomic), with the permissions a plain open() would give (mkstemp makes it 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Open a temporary file next to `path` and move it onto `path` only when the block completes
    (fsync'd), so readers never see a partial file."""
    fd, tmp = temp_file_next_to(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(path: str, image, meta=None) -> str:
    """Write a uint8 HxWx3 image as PNG, atomically, with `meta` as PNG text chunks (prompt, seed...)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (meta or {}).items():
        info.add_text(str(k), str(v))
    with atomic_open(path) as f:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format="PNG", pnginfo=info)
    return path
