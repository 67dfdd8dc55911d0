"""Stage B: the latent decoder of Stable Cascade (Stage C latents + text -> 4-channel Stage A latents).

Follows Stability-AI/StableCascade `modules/stage_b.py` (constructor arguments, forward signature,
block layout, init) and matches diffusers `StableCascadeUNet` in its decoder configuration.
Parameter names and shapes equal PaddleMIX's Paddle port (the seed's `stage_b_lite.pdparams`).
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..configs import build_config, preset
from .common import LN_EPS, CascadeUNet, CascadeUNetConfig, LayerNorm2d

__all__ = ["StageB", "StageBConfig", "STAGE_B_PRESETS", "STAGE_B_MODELS", "StageB_3B", "StageB_700M", "StageB_tiny", "stage_b_config"]

PIXELS_DEFAULT_SIZE = 8  # the reference feeds zeros (B, 3, 8, 8) when no pixels are given


def _cond_mapper(c_in: int, c: int) -> nn.Sequential:
    # names: .0 / .2 are 1x1 convs, .3 the non-affine LayerNorm2d
    return nn.Sequential(nn.Conv2D(c_in, c * 4, 1), nn.GELU(), nn.Conv2D(c * 4, c, 1), LayerNorm2d(c))


@dataclass(frozen=True)
class StageBConfig(CascadeUNetConfig):
    """StageB constructor arguments (modules/stage_b.py names); numbers live in STAGE_B_PRESETS."""

    c_clip: int  # pooled text embedding width
    c_clip_seq: int  # tokens per pooled text embedding
    c_effnet: int  # Stage C / EfficientNet latent channels
    c_pixels: int
    kernel_size: int
    dropout: tuple  # per level
    self_attn: bool
    t_conds: tuple


class StageB(CascadeUNet):
    """Stage B network.

    forward(x, r, effnet, clip, pixels=None, **t_conds) -> noise prediction like x.
      x: (B, c_in, H, W) noised Stage A latent; r: (B,) noise ratio in [0, 1];
      effnet: (B, c_effnet, h, w) Stage C / EfficientNet latent (resized to the working grid);
      clip: (B, 1, c_clip) or (B, c_clip) pooled text embedding;
      pixels: (B, c_pixels, h', w'), zeros (B, 3, 8, 8) by default;
      t_conds: per-sample (B,) values for the names in `t_conds` (default 'sca'), zeros when absent.
    """

    def __init__(self, config: "StageBConfig | None" = None, **overrides):
        super().__init__()
        config = build_config(StageBConfig, config, overrides, default=STAGE_B_PRESETS["3B"])
        self.config = config
        (c_in, c_out, c_r, patch_size, c_cond, c_hidden, nhead, blocks, block_repeat, level_config, c_clip,
         c_clip_seq, c_effnet, c_pixels, kernel_size, dropout, self_attn,
         t_conds) = (getattr(config, f) for f in StageBConfig.field_names())
        if patch_size < 1 or c_r < 4:
            raise ValueError(f"bad patch_size={patch_size} or c_r={c_r}")
        self.c_r, self.t_conds, self.c_clip_seq = c_r, list(t_conds), c_clip_seq
        self.patch_size, self.c_pixels = patch_size, c_pixels

        # conditioning
        self.effnet_mapper = _cond_mapper(c_effnet, c_hidden[0])
        self.pixels_mapper = _cond_mapper(c_pixels, c_hidden[0])
        self.clip_mapper = nn.Linear(c_clip, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, epsilon=LN_EPS, weight_attr=False, bias_attr=False)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2D(c_in * patch_size**2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0]),
        )
        self._build_levels(
            c_hidden, nhead, blocks, block_repeat, level_config, c_cond, c_r, kernel_size, dropout, self_attn, t_conds,
            make_down=lambda i: nn.Sequential(
                LayerNorm2d(c_hidden[i - 1]), nn.Conv2D(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2)),
            make_up=lambda i: nn.Sequential(
                LayerNorm2d(c_hidden[i]), nn.Conv2DTranspose(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2)),
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0]),
            nn.Conv2D(c_hidden[0], c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        if not self._is_lazy():
            self.initialize_weights()

    def initialize_weights(self):
        """Reference init (modules/stage_b.py): see CascadeUNet._init_common; conditioning
        mappers N(0, 0.02); only TimestepBlock.mapper weights zeroed."""
        self._init_common(zero_all_timestep_linears=False)
        normal = nn.initializer.Normal(0.0, 0.02)
        for w in (self.clip_mapper.weight, self.effnet_mapper[0].weight, self.effnet_mapper[2].weight,
                  self.pixels_mapper[0].weight, self.pixels_mapper[2].weight):
            normal(w)

    def gen_c_embeddings(self, clip):
        """(B, 1, c_clip) -> (B, c_clip_seq, c_cond), normalised."""
        if clip.ndim == 2:
            clip = clip.unsqueeze(1)
        b, n = clip.shape[0], clip.shape[1]
        return self.clip_norm(self.clip_mapper(clip).reshape([b, n * self.c_clip_seq, -1]))

    def forward(self, x, r, effnet, clip, pixels=None, **t_conds):
        unknown = set(t_conds) - set(self.t_conds)
        if unknown:
            raise ValueError(f"unknown t_conds {sorted(unknown)}; this model takes {self.t_conds}")
        if pixels is None:
            pixels = paddle.zeros([x.shape[0], self.c_pixels, PIXELS_DEFAULT_SIZE, PIXELS_DEFAULT_SIZE], dtype=x.dtype)
        r_embed = self._r_embedding(r, t_conds).astype(x.dtype)  # (B, c_r * (1 + n_conds))
        clip = self.gen_c_embeddings(clip)  # (B, c_clip_seq, c_cond)
        h = self.embedding(x)  # (B, c_hidden[0], H / p, W / p)
        size = h.shape[-2:]
        effnet = F.interpolate(effnet.astype(h.dtype), size=size, mode="bilinear", align_corners=True)
        h = h + self.effnet_mapper(effnet)
        h = h + F.interpolate(self.pixels_mapper(pixels), size=size, mode="bilinear", align_corners=True)
        level_outputs = self._down_encode(h, r_embed, clip)
        h = self._up_decode(level_outputs, r_embed, clip)
        return self.clf(h)  # (B, c_out, H, W)


# ---------------------------------------------------------------------------------------------
# Presets and factories
# ---------------------------------------------------------------------------------------------
STAGE_B_PRESETS = {
    # stage_b.safetensors (modules/stage_b.py defaults; 1.56B parameters)
    "3B": StageBConfig(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1280, c_hidden=[320, 640, 1280, 1280],
               nhead=[-1, -1, 20, 20], blocks=[[2, 6, 28, 6], [6, 28, 6, 2]],
               block_repeat=[[1, 1, 1, 1], [3, 3, 2, 2]], level_config=["CT", "CT", "CTA", "CTA"], c_clip=1280,
               c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True,
               t_conds=["sca"]),
    # stage_b_lite.safetensors
    "700M": StageBConfig(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1280, c_hidden=[320, 576, 1152, 1152],
                 nhead=[-1, 9, 18, 18], blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
                 block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]], level_config=["CT", "CT", "CTA", "CTA"], c_clip=1280,
                 c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True,
                 t_conds=["sca"]),
    # tests and offline demos: CT and CTA levels, repeat mappers, patch size 2, effnet + pixels
    "tiny": StageBConfig(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=32, c_hidden=[16, 32], nhead=[-1, 2],
                 blocks=[[1, 2], [2, 1]], block_repeat=[[2, 1], [1, 2]], level_config=["CT", "CTA"], c_clip=32,
                 c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3, dropout=[0.0, 0.0], self_attn=True,
                 t_conds=["sca"]),
    # the shipped demo (assets/demo/cascade: 256 px, 64 x 64 Stage A latents; c_clip = the demo CLIP's
    # projection width); patch 2 (32, 16 and 8 px levels, attention at 8 x 8). The first level is wider
    # than the 4 * 2 * 2 patch values, so the noise prediction can pass the full-resolution noise through
    # (a patch-4 level of 48 channels < 64 could not: it never learnt to denoise)
    "demo": StageBConfig(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=64, c_hidden=[32, 64, 128], nhead=[-1, -1, 4],
                 blocks=[[1, 1, 2], [2, 1, 1]], block_repeat=[[1, 1, 1], [1, 1, 1]], level_config=["CT", "CT", "CTA"],
                 c_clip=64, c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3, dropout=[0.0, 0.0, 0.0],
                 self_attn=True, t_conds=["sca"]),
}


def stage_b_config(name: str, **overrides) -> StageBConfig:
    """The named preset, with `overrides` applied."""
    return preset(STAGE_B_PRESETS, name, "Stage B", **overrides)


def StageB_3B(**kw):
    return StageB(stage_b_config("3B", **kw))


def StageB_700M(**kw):
    return StageB(stage_b_config("700M", **kw))


def StageB_tiny(**kw):
    return StageB(stage_b_config("tiny", **kw))


STAGE_B_MODELS = {"3B": StageB_3B, "700M": StageB_700M, "tiny": StageB_tiny}
