"""Input scalers: logSNR -> (a, b) with noised = a * x0 + b * epsilon.

Follows Stability-AI/StableCascade ``gdf/scalers.py`` (``VPScaler``). The limit stretching of
the original (``setup_limits``) is not ported: no Stable Cascade recipe uses it.
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F


class BaseScaler:
    def scalers(self, log_snr: paddle.Tensor):
        raise NotImplementedError

    def __call__(self, log_snr: paddle.Tensor):
        return self.scalers(log_snr.astype("float32"))


class VPScaler(BaseScaler):
    """Variance preserving: a = sqrt(sigmoid(logSNR)), b = sqrt(1 - sigmoid(logSNR))."""

    def scalers(self, log_snr):
        a2 = F.sigmoid(log_snr)
        return a2.sqrt(), (1.0 - a2).sqrt()
