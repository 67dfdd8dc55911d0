"""Stage C: the text-conditional prior of Stable Cascade (16 x 24 x 24 latents at 1024 px).

Follows Stability-AI/StableCascade `modules/stage_c.py` (constructor arguments, forward signature,
block layout, init) and matches diffusers `StableCascadeUNet` in its prior configuration.
Parameter names and shapes equal PaddleMIX's Paddle port (the seed's `stage_c_lite.pdparams`).
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..configs import build_config, preset
from .common import LN_EPS, CascadeUNet, CascadeUNetConfig, LayerNorm2d

__all__ = ["StageC", "StageCConfig", "UpDownBlock2d", "STAGE_C_PRESETS", "STAGE_C_MODELS", "StageC_3_6B", "StageC_1B", "StageC_tiny",
           "stage_c_config"]


class UpDownBlock2d(nn.Layer):
    """1x1 conv plus (if enabled) a bilinear x2 / x0.5 resize; the conv is `blocks.0` when going
    down and `blocks.1` when going up (checkpoint names)."""

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        resize = _Resize(2.0 if mode == "up" else 0.5) if enabled else nn.Identity()
        mapping = nn.Conv2D(c_in, c_out, kernel_size=1)
        self.blocks = nn.LayerList([resize, mapping] if mode == "up" else [mapping, resize])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _Resize(nn.Layer):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=True)


@dataclass(frozen=True)
class StageCConfig(CascadeUNetConfig):
    """StageC constructor arguments (modules/stage_c.py names); numbers live in STAGE_C_PRESETS."""

    c_clip_text: int
    c_clip_text_pooled: int
    c_clip_img: int
    c_clip_seq: int  # tokens per pooled text / image embedding
    kernel_size: int
    dropout: tuple  # per level
    self_attn: bool
    t_conds: tuple
    switch_level: tuple


class StageC(CascadeUNet):
    """Stage C network.

    forward(x, r, clip_text, clip_text_pooled, clip_img, **t_conds) -> noise prediction like x.
      x: (B, c_in, H, W) noised latent; r: (B,) noise ratio in [0, 1];
      clip_text: (B, L, c_clip_text); clip_text_pooled: (B, 1, c_clip_text_pooled) or (B, c);
      clip_img: (B, 1, c_clip_img) or (B, c) (zeros when there is no image);
      t_conds: per-sample (B,) values for the names in `t_conds` (default 'sca', 'crp'),
      zeros when absent.
    """

    def __init__(self, config: "StageCConfig | None" = None, **overrides):
        super().__init__()
        config = build_config(StageCConfig, config, overrides, default=STAGE_C_PRESETS["3.6B"])
        self.config = config
        (c_in, c_out, c_r, patch_size, c_cond, c_hidden, nhead, blocks, block_repeat, level_config, c_clip_text,
         c_clip_text_pooled, c_clip_img, c_clip_seq, kernel_size, dropout, self_attn, t_conds,
         switch_level) = (getattr(config, f) for f in StageCConfig.field_names())
        n = len(c_hidden)
        if switch_level is None or len(switch_level) < n - 1:
            raise ValueError(f"switch_level needs {n - 1} entries for {n} levels, got {switch_level}")
        if patch_size < 1 or c_r < 4:
            raise ValueError(f"bad patch_size={patch_size} or c_r={c_r}")
        self.c_r, self.t_conds, self.c_clip_seq, self.patch_size = c_r, list(t_conds), c_clip_seq, patch_size

        # conditioning
        self.clip_txt_mapper = nn.Linear(c_clip_text, c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(c_clip_text_pooled, c_cond * c_clip_seq)
        self.clip_img_mapper = nn.Linear(c_clip_img, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, epsilon=LN_EPS, weight_attr=False, bias_attr=False)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2D(c_in * patch_size**2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0]),
        )
        self._build_levels(
            c_hidden, nhead, blocks, block_repeat, level_config, c_cond, c_r, kernel_size, dropout, self_attn, t_conds,
            make_down=lambda i: nn.Sequential(
                LayerNorm2d(c_hidden[i - 1]), UpDownBlock2d(c_hidden[i - 1], c_hidden[i], "down", switch_level[i - 1])),
            make_up=lambda i: nn.Sequential(
                LayerNorm2d(c_hidden[i]), UpDownBlock2d(c_hidden[i], c_hidden[i - 1], "up", switch_level[i - 1])),
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0]),
            nn.Conv2D(c_hidden[0], c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        if not self._is_lazy():
            self.initialize_weights()

    def initialize_weights(self):
        """Reference init (modules/stage_c.py): see CascadeUNet._init_common; conditioning
        mappers N(0, 0.02); every TimestepBlock linear weight zero."""
        self._init_common(zero_all_timestep_linears=True)
        normal = nn.initializer.Normal(0.0, 0.02)
        for layer in (self.clip_txt_mapper, self.clip_txt_pooled_mapper, self.clip_img_mapper):
            normal(layer.weight)

    def gen_c_embeddings(self, clip_txt, clip_txt_pooled, clip_img):
        """(B, L, c_txt), (B, 1, c_pool), (B, 1, c_img) -> (B, L + 2 * c_clip_seq, c_cond), normalised."""
        if clip_txt_pooled.ndim == 2:
            clip_txt_pooled = clip_txt_pooled.unsqueeze(1)
        if clip_img.ndim == 2:
            clip_img = clip_img.unsqueeze(1)
        b = clip_txt.shape[0]
        txt = self.clip_txt_mapper(clip_txt)  # (B, L, c_cond)
        n_pool, n_img = clip_txt_pooled.shape[1] * self.c_clip_seq, clip_img.shape[1] * self.c_clip_seq
        pool = self.clip_txt_pooled_mapper(clip_txt_pooled).reshape([b, n_pool, -1])  # (B, 4, c_cond)
        img = self.clip_img_mapper(clip_img).reshape([b, n_img, -1])  # (B, 4, c_cond)
        return self.clip_norm(paddle.concat([txt, pool, img], axis=1))

    def forward(self, x, r, clip_text, clip_text_pooled, clip_img, **t_conds):
        unknown = set(t_conds) - set(self.t_conds)
        if unknown:
            raise ValueError(f"unknown t_conds {sorted(unknown)}; this model takes {self.t_conds}")
        r_embed = self._r_embedding(r, t_conds).astype(x.dtype)  # (B, c_r * (1 + n_conds))
        clip = self.gen_c_embeddings(clip_text, clip_text_pooled, clip_img)  # (B, L', c_cond)
        h = self.embedding(x)  # (B, c_hidden[0], H / p, W / p)
        level_outputs = self._down_encode(h, r_embed, clip)
        h = self._up_decode(level_outputs, r_embed, clip)
        return self.clf(h)  # (B, c_out, H, W)


# ---------------------------------------------------------------------------------------------
# Presets and factories
# ---------------------------------------------------------------------------------------------
STAGE_C_PRESETS = {
    # stage_c.safetensors (modules/stage_c.py defaults)
    "3.6B": StageCConfig(c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=2048, c_hidden=[2048, 2048], nhead=[32, 32],
                 blocks=[[8, 24], [24, 8]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
                 c_clip_text=1280, c_clip_text_pooled=1280, c_clip_img=768, c_clip_seq=4, kernel_size=3,
                 dropout=[0.1, 0.1], self_attn=True, t_conds=["sca", "crp"], switch_level=[False]),
    # stage_c_lite.safetensors
    "1B": StageCConfig(c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24],
               blocks=[[4, 12], [12, 4]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
               c_clip_text=1280, c_clip_text_pooled=1280, c_clip_img=768, c_clip_seq=4, kernel_size=3,
               dropout=[0.1, 0.1], self_attn=True, t_conds=["sca", "crp"], switch_level=[False]),
    # tests and offline demos: two levels (CT and CTA), repeat mappers, self-attention, t_conds
    "tiny": StageCConfig(c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=32, c_hidden=[32, 64], nhead=[2, 4],
                 blocks=[[1, 2], [2, 1]], block_repeat=[[2, 1], [1, 2]], level_config=["CT", "CTA"],
                 c_clip_text=32, c_clip_text_pooled=32, c_clip_img=32, c_clip_seq=4, kernel_size=3,
                 dropout=[0.0, 0.0], self_attn=True, t_conds=["sca", "crp"], switch_level=[False]),
    # the shipped demo (assets/demo/cascade: 6 x 6 latents of 256 px images; c_clip_* = the demo CLIP's
    # widths, no image encoder: clip_img is always zeros)
    "demo": StageCConfig(c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=64, c_hidden=[64, 64], nhead=[4, 4],
                 blocks=[[2, 2], [2, 2]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
                 c_clip_text=64, c_clip_text_pooled=64, c_clip_img=16, c_clip_seq=4, kernel_size=3,
                 dropout=[0.0, 0.0], self_attn=True, t_conds=["sca", "crp"], switch_level=[False]),
}


def stage_c_config(name: str, **overrides) -> StageCConfig:
    """The named preset, with `overrides` applied."""
    return preset(STAGE_C_PRESETS, name, "Stage C", **overrides)


def StageC_3_6B(**kw):
    return StageC(stage_c_config("3.6B", **kw))


def StageC_1B(**kw):
    return StageC(stage_c_config("1B", **kw))


def StageC_tiny(**kw):
    return StageC(stage_c_config("tiny", **kw))


STAGE_C_MODELS = {"3.6B": StageC_3_6B, "1B": StageC_1B, "tiny": StageC_tiny}
