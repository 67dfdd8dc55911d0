"""logSNR schedules for the GDF (generic diffusion framework).

Follows Stability-AI/StableCascade ``gdf/schedulers.py`` (``BaseSchedule``, ``CosineSchedule``):
a schedule maps a time ``t`` in [0, 1] (1 = pure noise) to a logSNR, applies the resolution
shift ``logSNR += 2 * ln(1 / shift)`` (Simple Diffusion, Hoogeboom et al. 2023) and clamps the
result to the logSNR range of the unshifted schedule (``limits``).

All arithmetic is float32, whatever the dtype of the network that consumes the result.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import paddle

TLike = Union[int, float, Sequence[float], np.ndarray, paddle.Tensor]

# Default sampling range of the training time (StableCascade draws 1 - U[0,1) then shifts it
# by 0.001 and clamps, so t never reaches 0 during training).
TRAIN_T_MIN = 0.001


def to_t_tensor(t) -> paddle.Tensor:
    """t (float, sequence, ndarray or Tensor) -> 1-D float32 paddle Tensor."""
    if isinstance(t, paddle.Tensor):
        t = t.astype("float32")
        return t.reshape([1]) if t.ndim == 0 else t
    arr = np.asarray(t, dtype=np.float32)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"t must be a scalar or 1-D, got shape {arr.shape}")
    return paddle.to_tensor(arr)


def shift_offset(shift: float) -> float:
    """The logSNR offset of a resolution shift: 2 * ln(1 / shift)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return 2.0 * math.log(1.0 / shift)


class BaseSchedule:
    """t -> logSNR. Subclasses implement ``setup(**kw)`` and ``schedule(t)``.

    ``__call__(t, shift=1)`` takes either a batch size (int: draw random training times) or the
    times themselves (clamped to [0, 1]); ``limits`` = [logSNR(1), logSNR(0)] of the unshifted
    schedule (computed once when ``force_limits``) clamps the shifted output, as the original does.
    """

    def __init__(self, *args, force_limits: bool = True, shift: float = 1.0, **kwargs):
        self.setup(*args, **kwargs)
        self.limits: Optional[list] = None
        self.shift = float(shift)
        if force_limits:
            self.reset_limits()

    def setup(self, *args, **kwargs):
        raise NotImplementedError

    def schedule(self, t: paddle.Tensor) -> paddle.Tensor:
        raise NotImplementedError

    def sample_t(self, batch_size: int) -> paddle.Tensor:
        """Random training times in [TRAIN_T_MIN, 1] (uses paddle's global generator)."""
        u = paddle.rand([batch_size], dtype="float32")
        return ((1.0 - u) + TRAIN_T_MIN).clip(TRAIN_T_MIN, 1.0)

    def reset_limits(self, shift: float = 1.0, disable: bool = False):
        self.limits = None
        if not disable:
            self.limits = self(paddle.to_tensor([1.0, 0.0], dtype="float32"), shift=shift).tolist()
        return self.limits

    def __call__(self, t: TLike, shift: float = 1.0) -> paddle.Tensor:
        if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            if t < 1:
                raise ValueError(f"batch size must be >= 1, got {t}")
            t = self.sample_t(int(t))
        else:
            t = to_t_tensor(t).clip(0.0, 1.0)
        log_snr = self.schedule(t)
        total_shift = float(shift) * self.shift
        if total_shift != 1.0:
            log_snr = log_snr + shift_offset(total_shift)
        if self.limits is not None:
            log_snr = log_snr.clip(self.limits[0], self.limits[1])
        return log_snr


class CosineSchedule(BaseSchedule):
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021) in logSNR form.

    alpha_bar(t) = cos^2((t + s) / (1 + s) * pi/2) / cos^2(s / (1 + s) * pi/2), clamped to
    ``clamp_range`` (or, with ``norm_instead``, mapped linearly into it), and
    logSNR = ln(alpha_bar / (1 - alpha_bar)).
    """

    def setup(self, s: float = 0.008, clamp_range: Sequence[float] = (0.0001, 0.9999), norm_instead: bool = False):
        if not (0.0 <= clamp_range[0] < clamp_range[1] <= 1.0):
            raise ValueError(f"clamp_range must satisfy 0 <= lo < hi <= 1, got {clamp_range}")
        self.s = float(s)
        self.clamp_range = [float(clamp_range[0]), float(clamp_range[1])]
        self.norm_instead = bool(norm_instead)
        self.min_var = math.cos(self.s / (1 + self.s) * math.pi * 0.5) ** 2

    def alpha_bar(self, t: paddle.Tensor) -> paddle.Tensor:
        """Clamped alpha_bar(t) = sigmoid(logSNR(t)) before any shift."""
        s = self.s
        var = paddle.cos((t + s) / (1 + s) * (math.pi * 0.5)).clip(0.0, 1.0) ** 2 / self.min_var
        if self.norm_instead:
            return var * (self.clamp_range[1] - self.clamp_range[0]) + self.clamp_range[0]
        return var.clip(self.clamp_range[0], self.clamp_range[1])

    def schedule(self, t: paddle.Tensor) -> paddle.Tensor:
        var = self.alpha_bar(t)
        return paddle.log(var / (1.0 - var))
