"""Paddle-CPU arrangements of the Stable Cascade hot paths, behind ONE switch (off by default).

The plain layers of `ldm.cascade.common` and the plain `ldm.cascade.attention.attention` follow
the reference maths op by op (Stability-AI/StableCascade `modules/common.py`). On CPU, paddle
3.x runs a few of those ops several times slower than torch: a broadcast elementwise op with a
(B, 1, C) operand, a reduction over the spatial axes, and a softmax over a (B, H, Lq, Lk) score
tensor that does not fit in cache (measured at the `benchmarks/bench_stage_c.py` mid preset).
The kernels here compute the same values with ops paddle runs fast there:

- `Linear`: an `nn.Linear` whose own forward is one `addmm` on a 2-D view (the bias fused into
  the GEMM) instead of a matmul plus a separate bias pass.
- `sum_of_squares_hw`, `scale_shift_channels` (GlobalResponseNorm): the sums of squares over
  (H, W) as a matmul with a row of ones; the per-sample, per-channel scale and shift as one
  fused affine pass (an inference-form batch norm with mean 0 / variance 1) per sample.
- `attention`: softmax(q k^T / sqrt(D)) v one (sample, head) at a time, so that head's
  (Lq, Lk) scores stay in cache.

Every kernel is an implementation detail of a layer's own forward (or of the one attention
function); nothing here reads a parameter of another layer, so hooks, adapters and
parametrisations on the `Linear` / `GlobalResponseNorm` layers keep working either way.
tests/test_blocks.py checks each kernel against the plain path.

Measured (bench_stage_c.py mid preset, batch 2, 24x24, 1 thread, 2026-12-01): one forward takes
~7.5 s on the plain path and ~3.7 s with these kernels (the pre-refactor fused blocks: ~3.6-4 s).
With the kernels on but attention vectorised (SDPA or the matmul fallback) instead of per head
it is ~1.5 s slower; with GRN's scale as a broadcast multiply ~0.5 s slower. So the per-sample /
per-head loops stay, here and only here.

The switch: the environment variable `LDM_FAST_CPU_KERNELS=1` (read once, at import, here) or
`set_fast_cpu_kernels(True)`. It stays off unless asked for, because the per-(sample, head)
loops are slower than fused attention on an accelerator; a CPU run turns it on
(benchmarks/bench_stage_c.py does).
"""
from __future__ import annotations

import os

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

__all__ = ["ENV_VAR", "set_fast_cpu_kernels", "fast_cpu_kernels_enabled", "Linear", "sum_of_squares_hw",
           "scale_shift_channels", "attention"]

ENV_VAR = "LDM_FAST_CPU_KERNELS"
_enabled = os.environ.get(ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def set_fast_cpu_kernels(enabled: bool) -> bool:
    """Turn the CPU kernels on or off for every network in this process; returns the old value."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


def fast_cpu_kernels_enabled() -> bool:
    return _enabled


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, names and init) whose forward, with the switch on, is one
    `addmm` on the (N, in) view of a (..., in) input."""

    def forward(self, x):
        if not _enabled:
            return super().forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape([-1, x.shape[-1]])  # (N, in)
        y = paddle.matmul(x2, self.weight) if self.bias is None else paddle.addmm(self.bias, x2, self.weight)
        return y.reshape([*lead, self.weight.shape[1]])  # (..., out)


def sum_of_squares_hw(x):
    """(B, H, W, C) -> (B, 1, 1, C): per-channel sums of squares over the spatial axes, as one
    batched matmul with a row of ones."""
    b, hh, ww, c = x.shape
    xf = x.reshape([b, hh * ww, c])
    ones = paddle.ones([b, 1, hh * ww], dtype=x.dtype)
    return paddle.bmm(ones, xf * xf).reshape([b, 1, 1, c])


def scale_shift_channels(x, scale, shift):
    """x * scale + shift for x (B, H, W, C), scale (B, 1, 1, C), shift (1, 1, 1, C), one sample at
    a time as `F.batch_norm` with mean 0, variance 1 and epsilon 0 - which is exactly the
    per-channel affine map (x - 0) / sqrt(1 + 0) * scale + shift - in inference form: one fused
    pass over the sample's (HW, C) rows, 4-5x faster than paddle's broadcast multiply and add."""
    b, hh, ww, c = x.shape
    mean, var, sh = paddle.zeros([c], dtype=x.dtype), paddle.ones([c], dtype=x.dtype), shift.reshape([c])
    rows = [F.batch_norm(xi, mean, var, si, sh, training=False, epsilon=0.0, data_format="NHWC")
            for xi, si in zip(paddle.unbind(x.reshape([b, 1, hh * ww, c])), paddle.unbind(scale.reshape([b, c])))]
    return paddle.stack(rows).reshape([b, hh, ww, c])


def attention(q, k, v, dropout_p: float = 0.0, training: bool = False):
    """softmax(q k^T / sqrt(D)) v, (B, Lq, H, D) x (B, Lk, H, D) -> (B, Lq, H, D), one
    (sample, head) pair at a time with heads taken as column slices (no transposes)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    q = (q * (d**-0.5)).reshape([b, lq, h * d])  # (B, Lq, C)
    k, v = k.reshape([b, lk, h * d]), v.reshape([b, lk, h * d])  # (B, Lk, C)
    p = dropout_p if training else 0.0
    rows = []
    for qb, kb, vb in zip(paddle.unbind(q), paddle.unbind(k), paddle.unbind(v)):
        heads = []
        for i in range(h):
            cols = slice(i * d, (i + 1) * d)
            a = F.softmax(paddle.matmul(qb[:, cols], kb[:, cols], transpose_y=True), axis=-1)  # (Lq, Lk)
            if p > 0:
                a = F.dropout(a, p, training=True)
            heads.append(paddle.matmul(a, vb[:, cols]))  # (Lq, D)
        rows.append(paddle.concat(heads, axis=1))  # (Lq, C)
    return paddle.stack(rows).reshape([b, lq, h, d])
