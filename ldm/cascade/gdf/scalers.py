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
    """Variance preserving: a = sqrt(sigmoid(logSNR)), b = sqrt(sigmoid(-logSNR)).

    The original writes b = sqrt(1 - a^2); sigmoid(-logSNR) is the same number without the
    float32 cancellation near a = 1 (relative error ~1e-4 of b at the 0.9999 clamp otherwise).
    """

    def scalers(self, log_snr):
        return F.sigmoid(log_snr).sqrt(), F.sigmoid(-log_snr).sqrt()
