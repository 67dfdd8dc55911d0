"""The one attention function of the Stable Cascade networks.

`attention(q, k, v)` = softmax(q k^T / sqrt(D)) v per head, with q (B, Lq, H, D) and k, v
(B, Lk, H, D) -> (B, Lq, H, D): the [B, L, H, D] layout of paddle's
`F.scaled_dot_product_attention`, and the inner product of torch `nn.MultiheadAttention`, which
the reference `Attention2D` uses (Stability-AI/StableCascade `modules/common.py`). Dropout on
the attention weights when `training` and `dropout_p > 0`, as both of those do.

Which implementation runs, by capability (never by device type):
1. with the CPU kernels switched on (`ldm.cascade.cpu_kernels`), their per-head kernel;
2. else paddle's `F.scaled_dot_product_attention`, wherever it exists and runs: the first time it
   raises for an input dtype/place, that pair is remembered (and logged) and
3. the vectorised fallback `matmul_attention` (batched matmul + softmax) runs for it instead.
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F

from ldm.utils import get_logger

from . import cpu_kernels

__all__ = ["attention", "sdpa_attention", "matmul_attention"]

logger = get_logger(__name__)
_sdpa_failed: set = set()  # (dtype, place) pairs for which F.scaled_dot_product_attention raised


def sdpa_attention(q, k, v, dropout_p: float = 0.0, training: bool = False):
    """paddle's fused / math scaled-dot-product attention, (B, L, H, D) in and out."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, training=training)


def matmul_attention(q, k, v, dropout_p: float = 0.0, training: bool = False):
    """The vectorised fallback: batched matmul + softmax over all (sample, head) pairs at once."""
    d = q.shape[-1]
    q, k, v = (t.transpose([0, 2, 1, 3]) for t in (q, k, v))  # (B, H, L, D)
    weights = F.softmax(paddle.matmul(q * (d**-0.5), k, transpose_y=True), axis=-1)  # (B, H, Lq, Lk)
    if training and dropout_p > 0:
        weights = F.dropout(weights, dropout_p, training=True)
    return paddle.matmul(weights, v).transpose([0, 2, 1, 3])  # (B, Lq, H, D)


def attention(q, k, v, dropout_p: float = 0.0, training: bool = False):
    """softmax(q k^T / sqrt(D)) v, (B, Lq, H, D) x (B, Lk, H, D) -> (B, Lq, H, D); see the module
    docstring for which implementation runs."""
    if not training:
        dropout_p = 0.0  # (paddle's eval-mode dropout would copy the score tensor)
    if cpu_kernels.fast_cpu_kernels_enabled():
        return cpu_kernels.attention(q, k, v, dropout_p, training)
    key = (str(q.dtype), str(q.place))
    if key not in _sdpa_failed and hasattr(F, "scaled_dot_product_attention"):
        try:
            return sdpa_attention(q, k, v, dropout_p, training)
        except Exception as e:  # noqa: BLE001 - any failure of the op: the fallback decides
            out = matmul_attention(q, k, v, dropout_p, training)  # raises itself if the inputs are bad
            _sdpa_failed.add(key)
            logger.warning("scaled_dot_product_attention failed for %s on %s (%s: %s); using the matmul "
                           "attention from now on", key[0], key[1], type(e).__name__, e)
            return out
    return matmul_attention(q, k, v, dropout_p, training)
