"""Prediction targets. Follows Stability-AI/StableCascade ``gdf/targets.py``.

``target(x0, epsilon, logSNR, a, b)`` is the training target; ``x0(...)`` and ``epsilon(...)``
recover both quantities from a noised sample and a prediction.
"""
from __future__ import annotations


class EpsilonTarget:
    """The network predicts the noise: x0 = (noised - b * pred) / a."""

    def __call__(self, x0, epsilon, log_snr, a, b):
        return epsilon

    def x0(self, noised, pred, log_snr, a, b):
        return (noised - pred * b) / a

    def epsilon(self, noised, pred, log_snr, a, b):
        return pred


class X0Target:
    """The network predicts the clean sample."""

    def __call__(self, x0, epsilon, log_snr, a, b):
        return x0

    def x0(self, noised, pred, log_snr, a, b):
        return pred

    def epsilon(self, noised, pred, log_snr, a, b):
        return (noised - pred * a) / b


class VTarget:
    """v-prediction (Salimans & Ho 2022): v = a * epsilon - b * x0."""

    def __call__(self, x0, epsilon, log_snr, a, b):
        return a * epsilon - b * x0

    def x0(self, noised, pred, log_snr, a, b):
        n = a * a + b * b
        return a / n * noised - b / n * pred

    def epsilon(self, noised, pred, log_snr, a, b):
        n = a * a + b * b
        return b / n * noised + a / n * pred
