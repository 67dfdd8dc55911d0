"""Noise conditioning: logSNR -> the scalar ``r`` fed to the network.

Follows Stability-AI/StableCascade ``gdf/noise_conditions.py`` (``BaseNoiseCond``,
``CosineTNoiseCond``). ``shift`` here undoes a schedule shift: logSNR += 2 * ln(shift).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import paddle
import paddle.nn.functional as F


class BaseNoiseCond:
    def __init__(self, *args, shift: float = 1.0, clamp_range: Optional[Sequence[float]] = None, **kwargs):
        self.shift = float(shift)
        self.clamp_range = [-1e9, 1e9] if clamp_range is None else [float(v) for v in clamp_range]
        self.setup(*args, **kwargs)

    def setup(self, *args, **kwargs):
        pass

    def cond(self, log_snr: paddle.Tensor) -> paddle.Tensor:
        raise NotImplementedError

    def __call__(self, log_snr: paddle.Tensor) -> paddle.Tensor:
        log_snr = log_snr.astype("float32")
        if self.shift != 1.0:
            log_snr = log_snr + 2.0 * math.log(self.shift)
        return self.cond(log_snr).clip(self.clamp_range[0], self.clamp_range[1])


class CosineTNoiseCond(BaseNoiseCond):
    """Inverse of the cosine schedule: the time t whose (unclamped) alpha_bar is sigmoid(logSNR).

    t = acos(sqrt(sigmoid(logSNR) * cos^2(s/(1+s) * pi/2))) / (pi/2) * (1 + s) - s, with
    sigmoid(logSNR) clamped to ``clamp_range`` and the result clamped to the same range
    (the original's setup overrides the base clamp range with it; default [0, 1]).
    """

    def setup(self, s: float = 0.008, clamp_range: Sequence[float] = (0.0, 1.0)):
        self.s = float(s)
        self.clamp_range = [float(clamp_range[0]), float(clamp_range[1])]
        self.min_var = float(math.cos(self.s / (1 + self.s) * math.pi * 0.5) ** 2)

    def cond(self, log_snr):
        var = F.sigmoid(log_snr).clip(self.clamp_range[0], self.clamp_range[1])
        return paddle.acos((var * self.min_var).sqrt()) / (math.pi * 0.5) * (1 + self.s) - self.s
