"""Per-sample loss weights as functions of logSNR.

Follows Stability-AI/StableCascade ``gdf/loss_weights.py`` (``BaseLossWeight``,
``P2LossWeight``, ``AdaptiveLossWeight``). ``shift`` undoes a training shift before weighting:
logSNR += 2 * ln(shift) (so ``diffuse(shift=s, loss_shift=s)`` weights by the unshifted logSNR).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import paddle


class BaseLossWeight:
    def weight(self, log_snr: paddle.Tensor) -> paddle.Tensor:
        raise NotImplementedError

    def __call__(self, log_snr: paddle.Tensor, shift: float = 1.0, clamp_range: Optional[Sequence[float]] = None):
        lo, hi = (-1e9, 1e9) if clamp_range is None else clamp_range
        log_snr = log_snr.astype("float32")
        if shift != 1.0:
            if shift <= 0:
                raise ValueError(f"loss shift must be > 0, got {shift}")
            log_snr = log_snr + 2.0 * math.log(shift)
        return self.weight(log_snr).clip(lo, hi)


class ConstantLossWeight(BaseLossWeight):
    def __init__(self, v: float = 1.0):
        self.v = float(v)

    def weight(self, log_snr):
        return paddle.full_like(log_snr, self.v)


class P2LossWeight(BaseLossWeight):
    """P2 weighting (Choi et al. 2022): (k + exp(s * logSNR)) ** -gamma; defaults give 1 / (1 + SNR)."""

    def __init__(self, k: float = 1.0, gamma: float = 1.0, s: float = 1.0):
        self.k, self.gamma, self.s = float(k), float(gamma), float(s)

    def weight(self, log_snr):
        return (self.k + paddle.exp(log_snr * self.s)) ** -self.gamma


class AdaptiveLossWeight(BaseLossWeight):
    """Weight = 1 / (running mean loss of the logSNR bucket), clamped to ``weight_range``.

    Bucket edges: ``buckets - 1`` points evenly spaced over ``logsnr_range`` (torch.linspace
    semantics), giving ``buckets`` buckets; a value v falls in bucket i with
    edges[i-1] < v <= edges[i] (searchsorted, left side), values beyond the range in the two
    outer buckets. ``update_buckets(logSNR, loss, beta)`` sets each hit bucket to
    ``old * beta + loss * (1 - beta)``; when several samples of one batch hit the same bucket,
    each update starts from the old value and the last sample wins (the original's index
    assignment). The state is kept on the host in float32 and is per process (no all-reduce,
    as in the original); save it with ``state_dict()`` to resume.
    """

    def __init__(self, logsnr_range: Sequence[float] = (-10.0, 10.0), buckets: int = 300,
                 weight_range: Sequence[float] = (1e-7, 1e7)):
        if buckets < 2:
            raise ValueError(f"buckets must be >= 2, got {buckets}")
        self.bucket_ranges = np.linspace(logsnr_range[0], logsnr_range[1], buckets - 1).astype(np.float32)
        self.bucket_losses = np.ones(buckets, dtype=np.float32)
        self.weight_range = [float(weight_range[0]), float(weight_range[1])]

    def bucket_index(self, log_snr) -> np.ndarray:
        v = np.asarray(log_snr.numpy() if isinstance(log_snr, paddle.Tensor) else log_snr, dtype=np.float32)
        return np.searchsorted(self.bucket_ranges, v.reshape(-1), side="left")

    def weight(self, log_snr):
        idx = self.bucket_index(log_snr)
        w = np.clip(1.0 / self.bucket_losses[idx], *self.weight_range).astype(np.float32)
        return paddle.to_tensor(w.reshape(log_snr.shape))

    def update_buckets(self, log_snr, loss, beta: float = 0.99) -> None:
        idx = self.bucket_index(log_snr)
        loss = np.asarray(loss.detach().astype("float32").numpy() if isinstance(loss, paddle.Tensor) else loss,
                          dtype=np.float32).reshape(-1)
        if loss.shape[0] != idx.shape[0]:
            raise ValueError(f"update_buckets: {idx.shape[0]} logSNR values but {loss.shape[0]} losses")
        self.bucket_losses[idx] = self.bucket_losses[idx] * beta + loss * (1.0 - beta)

    def state_dict(self) -> dict:
        return {"bucket_ranges": self.bucket_ranges.tolist(), "bucket_losses": self.bucket_losses.tolist()}

    def set_state_dict(self, state: dict) -> None:
        ranges = np.asarray(state["bucket_ranges"], dtype=np.float32)
        losses = np.asarray(state["bucket_losses"], dtype=np.float32)
        if losses.shape[0] != ranges.shape[0] + 1:
            raise ValueError(f"AdaptiveLossWeight state: {losses.shape[0]} bucket losses need "
                             f"{losses.shape[0] - 1} bucket edges, got {ranges.shape[0]}")
        self.bucket_ranges, self.bucket_losses = ranges, losses
