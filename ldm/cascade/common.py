"""Building blocks shared by Stage C and Stage B (and usable by Stage A / the previewer).

Follows Stability-AI/StableCascade `modules/common.py` block for block (ResBlock, AttnBlock,
FeedForwardBlock, TimestepBlock, GlobalResponseNorm from ConvNeXt-V2, non-affine LayerNorm2d,
Attention2D over torch `nn.MultiheadAttention`) and the shared U-Net skeleton of
`modules/stage_c.py` / `modules/stage_b.py` (levels, repeat mappers, skip handling). Every
forward calls its sub-layers, the same code in training and in eval (dropout aside), so a hook,
an adapter or a parametrisation on any Linear / Conv2D / LayerNorm sees every call.

Parameter names and shapes equal the Paddle state dicts of PaddleMIX's port (the seed's
`stage_c_lite.pdparams` / `stage_b_lite.pdparams`): Linear weights are [in, out]; the attention
keeps paddle `nn.MultiHeadAttention` names (`attention.attn.{q,k,v,out}_proj.*`).

Numerics differ from PaddleMIX on purpose: GlobalResponseNorm takes the vector L2 norm over the
spatial axes (as torch.norm does in the reference), not paddle.norm's matrix 2-norm.

CPU speed: attention goes through `ldm.cascade.attention.attention`; the Linear layers are
`ldm.cascade.cpu_kernels.Linear` and GRN asks the same module, whose one switch
(`set_fast_cpu_kernels`, env `LDM_FAST_CPU_KERNELS`) selects paddle-CPU arrangements of the same
maths inside those layers' own forwards.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..configs import NetworkConfig
from . import cpu_kernels
from .attention import attention
from .cpu_kernels import Linear

__all__ = [
    "LN_EPS",
    "GRN_EPS",
    "LayerNorm2d",
    "GlobalResponseNorm",
    "Dropout",
    "ResBlock",
    "FeedForwardBlock",
    "TimestepBlock",
    "Attention",
    "Attention2D",
    "AttnBlock",
    "timestep_embedding",
    "CascadeUNet",
]

LN_EPS = 1e-6  # every LayerNorm in Stage B/C
GRN_EPS = 1e-6  # GlobalResponseNorm: Gx / (mean_c(Gx) + eps)
MAX_POSITIONS = 10000  # r embedding: sinusoid of r * 10000


class LayerNorm2d(nn.LayerNorm):
    """`nn.LayerNorm` over the channel axis of an NCHW tensor; non-affine (no parameters), as
    every LayerNorm2d of Stage B/C (`elementwise_affine=False, eps=1e-6` in the reference)."""

    def __init__(self, c: int, eps: float = LN_EPS):
        super().__init__(c, epsilon=eps, weight_attr=False, bias_attr=False)

    def forward(self, x):  # (B, C, H, W)
        return super().forward(x.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])


class GlobalResponseNorm(nn.Layer):
    """ConvNeXt-V2 GRN on channels-last input (B, H, W, C).

    Gx = ||x||_2 over (H, W) per channel; Nx = Gx / (mean_C(Gx) + 1e-6);
    y = gamma * (x * Nx) + beta + x, computed as x * (gamma * Nx + 1) + beta.
    gamma/beta are (1, 1, 1, C), zero at init.
    """

    def __init__(self, dim: int):
        super().__init__()
        zeros = nn.initializer.Constant(0.0)
        self.gamma = self.create_parameter([1, 1, 1, dim], default_initializer=zeros)
        self.beta = self.create_parameter([1, 1, 1, dim], default_initializer=zeros)

    def forward(self, x):  # (B, H, W, C)
        fast = cpu_kernels.fast_cpu_kernels_enabled()
        ss = cpu_kernels.sum_of_squares_hw(x) if fast else (x * x).sum(axis=[1, 2], keepdim=True)  # (B, 1, 1, C)
        # sqrt's gradient is inf at 0 (a channel that is all zeros, e.g. GELU underflow after
        # fine-tuning) -> NaN everywhere; torch.norm's backward gives 0 there, so mask it the same way
        live = ss > 0
        gx = paddle.where(live, ss, paddle.ones_like(ss)).sqrt() * live.astype(ss.dtype)
        scale = self.gamma * (gx / (gx.mean(axis=-1, keepdim=True) + GRN_EPS)) + 1.0  # (B, 1, 1, C)
        return cpu_kernels.scale_shift_channels(x, scale, self.beta) if fast else x * scale + self.beta


class Dropout(nn.Dropout):
    """`nn.Dropout` that returns its input unchanged in eval mode, as torch's does (paddle's
    eval-mode dropout op copies the tensor: a full pass per block at the bench sizes)."""

    def forward(self, x):
        return super().forward(x) if self.training else x


def _channel_mlp(c_in: int, c: int, dropout: float) -> nn.Sequential:
    # indices 0..4 are part of the checkpoint names: channelwise.0 / .2 (GRN) / .4
    return nn.Sequential(Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), Dropout(dropout), Linear(c * 4, c))


class ResBlock(nn.Layer):
    """x + channelwise(concat(norm(depthwise(x)), x_skip)); channelwise = Linear/GELU/GRN/Dropout/Linear
    over channels-last pixels."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2D(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = _channel_mlp(c + c_skip, c, dropout)

    def forward(self, x, x_skip=None):  # x (B, C, H, W), x_skip (B, C_skip, H, W)
        h = self.norm(self.depthwise(x))
        if x_skip is not None:
            h = paddle.concat([h, x_skip], axis=1)  # (B, C + C_skip, H, W)
        h = self.channelwise(h.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])  # (B, C, H, W)
        return h + x


class FeedForwardBlock(nn.Layer):
    """x + channelwise(norm(x)), channelwise as in ResBlock ('F' in level_config)."""

    def __init__(self, c: int, dropout: float = 0.0):
        super().__init__()
        self.norm = LayerNorm2d(c)
        self.channelwise = _channel_mlp(c, c, dropout)

    def forward(self, x):  # (B, C, H, W)
        return x + self.channelwise(self.norm(x).transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])


class TimestepBlock(nn.Layer):
    """x * (1 + a) + b with (a, b) = sum of per-condition linear maps of the r embeddings."""

    def __init__(self, c: int, c_timestep: int, conds=("sca",)):
        super().__init__()
        self.conds = list(conds)
        self.mapper = Linear(c_timestep, c * 2)
        for name in self.conds:
            setattr(self, f"mapper_{name}", Linear(c_timestep, c * 2))

    def forward(self, x, t):  # x (B, C, H, W), t (B, c_r * (1 + len(conds)))
        ts = paddle.split(t, len(self.conds) + 1, axis=1)  # each (B, c_r)
        ab = self.mapper(ts[0])  # (B, 2C)
        for i, name in enumerate(self.conds):
            ab = ab + getattr(self, f"mapper_{name}")(ts[i + 1])
        a, b = paddle.chunk(ab[:, :, None, None], 2, axis=1)  # (B, C, 1, 1) each
        return x * (1 + a) + b


class Attention(nn.Layer):
    """Multi-head attention with paddle `nn.MultiHeadAttention` parameter names
    (q_proj, k_proj, v_proj, out_proj; Linear weights [in, out]).

    Equivalent to torch `nn.MultiheadAttention(c, nhead, bias=True, batch_first=True)`;
    the attention itself is `ldm.cascade.attention.attention`.
    """

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        if nhead <= 0 or c % nhead:
            raise ValueError(f"attention width {c} is not divisible by nhead={nhead}")
        self.c, self.nhead, self.dropout = c, nhead, dropout
        self.q_proj = Linear(c, c)
        self.k_proj = Linear(c, c)
        self.v_proj = Linear(c, c)
        self.out_proj = Linear(c, c)

    def forward(self, query, key, value):  # query (B, Lq, C), key / value (B, Lk, C)
        b, lq, c = query.shape
        lk = key.shape[1]
        h, d = self.nhead, c // self.nhead
        q = self.q_proj(query).reshape([b, lq, h, d])  # (B, Lq, H, D)
        k = self.k_proj(key).reshape([b, lk, h, d])  # (B, Lk, H, D)
        v = self.v_proj(value).reshape([b, lk, h, d])
        o = attention(q, k, v, dropout_p=self.dropout, training=self.training)  # (B, Lq, H, D)
        return self.out_proj(o.reshape([b, lq, c]))  # (B, Lq, C)


class Attention2D(nn.Layer):
    """Attention of image tokens over (optionally themselves and) conditioning tokens."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.attn = Attention(c, nhead, dropout)

    def forward(self, x, kv, self_attn: bool = False):  # x (B, C, H, W), kv (B, L, C)
        b, c, hh, ww = x.shape
        tokens = x.reshape([b, c, hh * ww]).transpose([0, 2, 1])  # (B, HW, C)
        if self_attn:
            kv = paddle.concat([tokens, kv], axis=1)  # (B, HW + L, C)
        out = self.attn(tokens, kv, kv)  # (B, HW, C)
        return out.transpose([0, 2, 1]).reshape([b, c, hh, ww])


class AttnBlock(nn.Layer):
    """x + attention(norm(x), kv_mapper(cond)); kv_mapper = SiLU -> Linear."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.Silu(), Linear(c_cond, c))

    def forward(self, x, kv):  # x (B, C, H, W), kv (B, L, c_cond)
        kv = self.kv_mapper(kv)  # (B, L, C)
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn)


def timestep_embedding(r: paddle.Tensor, c_r: int, max_positions: int = MAX_POSITIONS) -> paddle.Tensor:
    """Sinusoidal embedding of the noise ratio r in [0, 1]: (B,) -> (B, c_r), float32."""
    r = r.astype("float32") * max_positions
    half = c_r // 2
    scale = math.log(max_positions) / (half - 1)
    freqs = paddle.exp(paddle.arange(half, dtype="float32") * -scale)  # (half,)
    emb = r[:, None] * freqs[None, :]  # (B, half)
    emb = paddle.concat([emb.sin(), emb.cos()], axis=1)  # (B, 2 * half)
    if c_r % 2 == 1:
        emb = paddle.concat([emb, paddle.zeros_like(emb[:, :1])], axis=1)  # zero pad to c_r
    return emb


# ---------------------------------------------------------------------------------------------
# The U-Net skeleton shared by Stage C and Stage B
# ---------------------------------------------------------------------------------------------
def preset_config(presets: dict, preset: str, what: str, **overrides) -> dict:
    """A deep copy of `presets[preset]` with `overrides` applied; unknown names are errors."""
    if preset not in presets:
        raise ValueError(f"unknown {what} preset {preset!r}; choose one of {sorted(presets)}")
    cfg = copy.deepcopy(presets[preset])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown {what} arguments {sorted(unknown)}")
    cfg.update(overrides)
    return cfg


def _as_list(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


@dataclass(frozen=True)
class CascadeUNetConfig(NetworkConfig):
    """The leading constructor arguments Stage C and Stage B share (their configs extend it)."""

    c_in: int
    c_out: int
    c_r: int  # width of each sinusoidal r / t_cond embedding
    patch_size: int
    c_cond: int  # width of the conditioning tokens
    c_hidden: tuple  # per level
    nhead: tuple  # per level (-1: no attention at that level)
    blocks: tuple  # (down per level, up per level)
    block_repeat: tuple  # (down per level, up per level)
    level_config: tuple  # per level, letters C (ResBlock), T (TimestepBlock), A (AttnBlock), F (FeedForward)


class CascadeUNet(nn.Layer):
    """Levels of C/T/A/F blocks with repeat mappers, as in the reference StageC/StageB.

    Subclasses create the conditioning layers and call `_build_levels` with a factory for the
    down/up scalers (Stage C: 1x1 conv with optional bilinear resize; Stage B: strided conv).
    """

    def _build_levels(self, c_hidden, nhead, blocks, block_repeat, level_config, c_cond, c_r, kernel_size, dropout,
                      self_attn, t_conds, make_down, make_up):
        n = len(c_hidden)
        for name, v in (("nhead", nhead), ("level_config", level_config)):
            if len(v) != n:
                raise ValueError(f"{name} has {len(v)} entries, c_hidden has {n}")
        if len(blocks) != 2 or len(blocks[0]) != n or len(blocks[1]) != n:
            raise ValueError(f"blocks must be [down[{n}], up[{n}]], got {blocks}")
        if block_repeat is not None and (len(block_repeat) != 2 or any(len(r) != n for r in block_repeat)):
            raise ValueError(f"block_repeat must be [down[{n}], up[{n}]] or None, got {block_repeat}")
        for cfg in level_config:
            bad = set(cfg) - set("CTAF")
            if bad:
                raise ValueError(f"level_config {cfg!r} has unknown block types {sorted(bad)} (use C, T, A, F)")
        dropout = _as_list(dropout, n)
        self_attn = _as_list(self_attn, n)
        self._blocks_down_total = sum(blocks[0])

        def get_block(kind, c, nh, c_skip=0, drop=0.0, sa=True):
            if kind == "C":
                return ResBlock(c, c_skip, kernel_size=kernel_size, dropout=drop)
            if kind == "A":
                return AttnBlock(c, c_cond, nh, self_attn=sa, dropout=drop)
            if kind == "F":
                return FeedForwardBlock(c, dropout=drop)
            return TimestepBlock(c, c_r, conds=t_conds)

        self.down_blocks, self.down_downscalers = nn.LayerList(), nn.LayerList()
        self.down_repeat_mappers = nn.LayerList()
        for i in range(n):
            self.down_downscalers.append(make_down(i) if i > 0 else nn.Identity())
            level = nn.LayerList()
            for _ in range(blocks[0][i]):
                for kind in level_config[i]:
                    level.append(get_block(kind, c_hidden[i], nhead[i], drop=dropout[i], sa=self_attn[i]))
            self.down_blocks.append(level)
            if block_repeat is not None:
                mappers = [nn.Conv2D(c_hidden[i], c_hidden[i], 1) for _ in range(block_repeat[0][i] - 1)]
                self.down_repeat_mappers.append(nn.LayerList(mappers))

        self.up_blocks, self.up_upscalers, self.up_repeat_mappers = nn.LayerList(), nn.LayerList(), nn.LayerList()
        for i in reversed(range(n)):
            self.up_upscalers.append(make_up(i) if i > 0 else nn.Identity())
            level = nn.LayerList()
            for j in range(blocks[1][::-1][i]):
                for k, kind in enumerate(level_config[i]):
                    c_skip = c_hidden[i] if i < n - 1 and j == k == 0 else 0
                    level.append(get_block(kind, c_hidden[i], nhead[i], c_skip, dropout[i], self_attn[i]))
            self.up_blocks.append(level)
            if block_repeat is not None:
                mappers = [nn.Conv2D(c_hidden[i], c_hidden[i], 1) for _ in range(block_repeat[1][::-1][i] - 1)]
                self.up_repeat_mappers.append(nn.LayerList(mappers))
        if block_repeat is None:  # keep zip() in encode/decode working
            self.down_repeat_mappers = nn.LayerList([nn.LayerList() for _ in range(n)])
            self.up_repeat_mappers = nn.LayerList([nn.LayerList() for _ in range(n)])

    # -- forward pieces ------------------------------------------------------------------------
    def _r_embedding(self, r, t_conds: dict):
        """(B,) noise ratio plus t_conds (default zeros) -> (B, c_r * (1 + len(self.t_conds)))."""
        embs = [timestep_embedding(r, self.c_r)]
        for name in self.t_conds:
            t = t_conds.get(name)
            embs.append(timestep_embedding(paddle.zeros_like(r) if t is None else t, self.c_r))
        return paddle.concat(embs, axis=1)

    gradient_checkpointing = False  # see enable_gradient_checkpointing

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing (`--recompute`): in training mode every block runs under
        `paddle.distributed.fleet.utils.recompute`, so only the block inputs are kept between
        forward and backward (the switch ppdiffusers' UNets offer under the same name)."""
        self.gradient_checkpointing = bool(enabled)

    def _run_block(self, block, x, r_embed, clip, skip=None):
        if self.gradient_checkpointing and self.training:
            from paddle.distributed.fleet import utils as fleet_utils

            return fleet_utils.recompute(self._call_block, block, x, r_embed, clip, skip, use_reentrant=False)
        return self._call_block(block, x, r_embed, clip, skip)

    @staticmethod
    def _call_block(block, x, r_embed, clip, skip=None):
        if isinstance(block, ResBlock):
            return block(x, skip)
        if isinstance(block, AttnBlock):
            return block(x, clip)
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        return block(x)

    def _down_encode(self, x, r_embed, clip):
        level_outputs = []
        for down_block, downscaler, repmap in zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers):
            x = downscaler(x)
            for i in range(len(repmap) + 1):
                for block in down_block:
                    x = self._run_block(block, x, r_embed, clip)
                if i < len(repmap):
                    x = repmap[i](x)
            level_outputs.insert(0, x)
        return level_outputs

    def _up_decode(self, level_outputs, r_embed, clip):
        x = level_outputs[0]
        levels = zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)
        for i, (up_block, upscaler, repmap) in enumerate(levels):
            for j in range(len(repmap) + 1):
                for k, block in enumerate(up_block):
                    skip = None
                    if isinstance(block, ResBlock) and k == 0 and i > 0:
                        skip = level_outputs[i]
                        if x.shape[-2:] != skip.shape[-2:]:
                            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
                    x = self._run_block(block, x, r_embed, clip, skip)
                if j < len(repmap):
                    x = repmap[j](x)
            x = upscaler(x)
        return x

    # -- initialisation (training from scratch; loading weights overwrites all of it) --------
    def _init_common(self, zero_all_timestep_linears: bool):
        """Reference init: xavier-uniform Linear/Conv weights, zero biases, torch-MHA q/k/v init,
        down-weighted ResBlock/FF output layers, zeroed TimestepBlock mappers, zero output conv."""
        xavier, zeros = nn.initializer.XavierUniform(), nn.initializer.Constant(0.0)
        for layer in self.sublayers(include_self=True):
            if isinstance(layer, (nn.Linear, nn.Conv2D, nn.Conv2DTranspose)):
                xavier(layer.weight)
                if layer.bias is not None:
                    zeros(layer.bias)
            if isinstance(layer, Attention):  # torch MHA: xavier over the stacked [3c, c] in_proj
                c = layer.c
                qkv = nn.initializer.XavierUniform(fan_in=c, fan_out=3 * c)
                for p in (layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight):
                    qkv(p)
        scale = math.sqrt(1 / self._blocks_down_total)
        for level in list(self.down_blocks) + list(self.up_blocks):
            for block in level:
                if isinstance(block, (ResBlock, FeedForwardBlock)):
                    w = block.channelwise[4].weight
                    w.set_value(w * scale)
                elif isinstance(block, TimestepBlock):
                    zeros(block.mapper.weight)
                    if zero_all_timestep_linears:
                        for name in block.conds:
                            zeros(getattr(block, f"mapper_{name}").weight)
        nn.initializer.XavierUniform(gain=0.02)(self.embedding[1].weight)
        zeros(self.clf[1].weight)

    def _is_lazy(self) -> bool:
        return any(not p._is_initialized() for p in self.parameters())
