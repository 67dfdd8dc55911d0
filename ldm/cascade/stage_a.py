"""Stage A: the f4 VQGAN of Stable Cascade (Paella VQ-VAE), in Paddle.

Follows Stability-AI/StableCascade `modules/stage_a.py` (`StageA`, `ResBlock`) and diffusers
`pipelines/wuerstchen/modeling_paella_vq_model.py` (`PaellaVQModel`, same network, different
codebook name). Parameter names are those of the original `stage_a.safetensors` and of the
PaddleMIX port (`stage_a.pdparams`): `in_block`, `down_blocks`, `vquantizer.codebook.weight`,
`up_blocks`, `out_block`. diffusers calls the codebook `vquantizer.embedding.weight`; the converter
in `ldm/cascade/keys.py` renames it.

Latent scale (0.43 vs 0.3764) - which number belongs to which weights:
- The original code constructs `StageA(..., scale_factor=0.43)` (0.3764 only survives there as a
  comment) and loads `stage_a.safetensors` into it; Stage B of Stable Cascade was trained on
  `StageA.encode(x)[0] = latent / 0.43` and its samples are decoded with `decode(x) = net(x * 0.43)`.
  ComfyUI uses the same 0.43 for stage_a.safetensors (`latent_formats.SC_B`, 1 / 0.43).
  The PaddleMIX port (and hence the seed's `stage_a.pdparams`) also defaults to 0.43.
- diffusers' `PaellaVQModel` defaults to `scale_factor=0.3764`. Its Stable Cascade conversion
  script does not convert `stage_a.safetensors` at all: it reuses the Wuerstchen v2 VQGAN
  (`PaellaVQModel.from_pretrained("warp-ai/wuerstchen", subfolder="vqgan")`), and the decoder
  pipeline multiplies the Stage B output by `vqgan.config.scale_factor` before `decode`.
  So 0.3764 belongs to the diffusers `vqgan/` folder (read from its config.json).
Hence `scale_factor` is a constructor argument: 0.43 (default) for the original / PaddleMIX
weights; the value from `vqgan/config.json` (0.3764 when absent) for a converted diffusers folder.
The converter stores it in the safetensors metadata and `ldm.cascade.loading.load_stage_a` reads it back.
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn

from ldm.configs import NetworkConfig, build_config, preset

__all__ = [
    "SCALE_FACTOR_ORIGINAL",
    "SCALE_FACTOR_DIFFUSERS",
    "StageAConfig",
    "STAGE_A_PRESETS",
    "ResBlock",
    "VectorQuantizer",
    "StageA",
    "StageA_full",
    "StageA_tiny",
    "StageA_models",
]

SCALE_FACTOR_ORIGINAL = 0.43  # original stage_a.safetensors and the PaddleMIX stage_a.pdparams
SCALE_FACTOR_DIFFUSERS = 0.3764  # PaellaVQModel default (diffusers vqgan/ folder)
LN_EPS = 1e-6
CODEBOOK_KEY = "vquantizer.codebook.weight"


@dataclass(frozen=True)
class StageAConfig(NetworkConfig):
    """StageA constructor arguments (modules/stage_a.py names); numbers live in STAGE_A_PRESETS."""

    levels: int
    bottleneck_blocks: int
    c_hidden: int
    c_latent: int
    codebook_size: int
    scale_factor: float  # latent = encoder output / scale_factor (see the module docstring)


STAGE_A_PRESETS = {
    # stage_a.safetensors (~18M parameters)
    "full": StageAConfig(levels=2, bottleneck_blocks=12, c_hidden=384, c_latent=4, codebook_size=8192,
                         scale_factor=SCALE_FACTOR_ORIGINAL),
    # tests and the tiny preset (~60k parameters)
    "tiny": StageAConfig(levels=2, bottleneck_blocks=2, c_hidden=32, c_latent=4, codebook_size=64,
                         scale_factor=SCALE_FACTOR_ORIGINAL),
    # the shipped demo (assets/demo/cascade, ldm/demo/cascade.py; ~40k parameters); its file stores the
    # scale factor measured after training (latent std 1)
    "demo": StageAConfig(levels=2, bottleneck_blocks=1, c_hidden=32, c_latent=4, codebook_size=16, scale_factor=1.0),
}


class ResBlock(nn.Layer):
    """Paella mixing block: non-affine LayerNorm over channels, replicate-padded depthwise 3x3,
    channel MLP (Linear c -> c_hidden, GELU, Linear -> c), six learned modulation scalars `gammas`.
    (Stage B/C's ResBlock is different: GRN, no gammas.)"""

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, epsilon=LN_EPS, weight_attr=False, bias_attr=False)
        self.depthwise = nn.Sequential(nn.Pad2D(1, mode="replicate"), nn.Conv2D(c, c, 3, groups=c))
        self.norm2 = nn.LayerNorm(c, epsilon=LN_EPS, weight_attr=False, bias_attr=False)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = self.create_parameter([6], default_initializer=nn.initializer.Constant(0.0))

    @staticmethod
    def _norm(x, norm):
        return norm(x.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])

    def forward(self, x):  # (B, C, H, W)
        g = self.gammas
        h = self._norm(x, self.norm1) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]  # (B, C, H, W)
        h = self._norm(x, self.norm2) * (1 + g[3]) + g[4]
        h = self.channelwise(h.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])  # (B, C, H, W)
        return x + h * g[5]


class VectorQuantizer(nn.Layer):
    """Nearest-neighbour codebook lookup (squared L2), as torchtools `VectorQuantize` used by the
    original. `codebook.weight` is [codebook_size, c_latent]."""

    def __init__(self, c_latent: int, codebook_size: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook = nn.Embedding(codebook_size, c_latent)

    def forward(self, x, axis: int = 1):
        """x: (B, C, H, W) with channels on `axis` -> (quantized like x, indices (B, H, W), vq_loss,
        commit_loss). The straight-through estimator passes gradients to x."""
        if axis != -1:
            x = paddle.moveaxis(x, axis, -1)  # (B, H, W, C)
        flat = x.reshape([-1, x.shape[-1]])  # (N, C)
        cb = self.codebook(paddle.arange(self.codebook_size))  # (K, C), through the layer (hooks see it)
        cbd = cb.detach()
        dist = (flat * flat).sum(-1, keepdim=True) - 2 * flat.matmul(cbd, transpose_y=True) \
            + (cbd * cbd).sum(-1)[None]  # (N, K)
        indices = dist.argmin(-1)  # (N,)
        q = paddle.index_select(cb, indices, axis=0)  # (N, C)
        vq_loss = ((q - flat.detach()) ** 2).mean()
        commit_loss = ((flat - q.detach()) ** 2).mean()
        q = flat + (q - flat).detach()
        q = q.reshape(x.shape)
        if axis != -1:
            q = paddle.moveaxis(q, -1, axis)
        return q, indices.reshape(x.shape[:-1]), vq_loss, commit_loss


class StageA(nn.Layer):
    """f4 VQGAN: image in [0, 1] (B, 3, H, W) <-> latent (B, c_latent, H/4, W/4).

    `encode(x, quantize=False)` returns (latent / scale_factor, unquantized / scale_factor or None,
    code indices or None, vq loss or None); `decode(latent)` multiplies by `scale_factor` first.
    """

    def __init__(self, config: StageAConfig | None = None, **overrides):
        super().__init__()
        config = build_config(StageAConfig, config, overrides, default=STAGE_A_PRESETS["full"])
        levels, bottleneck_blocks, c_hidden = config.levels, config.bottleneck_blocks, config.c_hidden
        c_latent, codebook_size, scale_factor = config.c_latent, config.codebook_size, config.scale_factor
        if levels < 1 or bottleneck_blocks < 1:
            raise ValueError(f"levels and bottleneck_blocks must be >= 1, got {levels}, {bottleneck_blocks}")
        if c_hidden % (2 ** (levels - 1)) != 0:
            raise ValueError(f"c_hidden={c_hidden} must be divisible by 2**(levels-1)={2 ** (levels - 1)}")
        if not scale_factor or scale_factor <= 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
        self.config = config.replace(scale_factor=float(scale_factor))
        self.c_latent = c_latent
        self.codebook_size = codebook_size
        self.codebook_loaded = True
        self.scale_factor = float(scale_factor)
        c_levels = [c_hidden // (2 ** i) for i in reversed(range(levels))]

        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2D(3 * 4, c_levels[0], 1))
        down = []
        for i in range(levels):
            if i > 0:
                down.append(nn.Conv2D(c_levels[i - 1], c_levels[i], 4, stride=2, padding=1))
            down.append(ResBlock(c_levels[i], c_levels[i] * 4))
        down.append(nn.Sequential(nn.Conv2D(c_levels[-1], c_latent, 1, bias_attr=False), nn.BatchNorm2D(c_latent)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(c_latent, codebook_size)

        up = [nn.Sequential(nn.Conv2D(c_latent, c_levels[-1], 1))]
        for i in range(levels):
            c = c_levels[levels - 1 - i]
            for _ in range(bottleneck_blocks if i == 0 else 1):
                up.append(ResBlock(c, c * 4))
            if i < levels - 1:
                up.append(nn.Conv2DTranspose(c, c_levels[levels - 2 - i], 4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2D(c_levels[0], 3 * 4, 1), nn.PixelShuffle(2))
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier-uniform Linear/Conv weights, zero biases (as the original ResBlock init)."""
        xavier, zeros = nn.initializer.XavierUniform(), nn.initializer.Constant(0.0)
        for m in self.sublayers():
            if isinstance(m, (nn.Linear, nn.Conv2D)):
                xavier(m.weight)
                if m.bias is not None:
                    zeros(m.bias)
        # torchtools VectorQuantize init
        nn.initializer.Uniform(-1.0 / self.codebook_size, 1.0 / self.codebook_size)(self.vquantizer.codebook.weight)

    def encode(self, x, quantize: bool = False):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"StageA.encode expects (B, 3, H, W), got {list(x.shape)}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"StageA.encode needs H and W divisible by 4, got {list(x.shape)}")
        h = self.in_block(x)  # (B, c0, H/2, W/2)
        h = self.down_blocks(h)  # (B, c_latent, H/4, W/4)
        if quantize:
            if not self.codebook_loaded:
                raise RuntimeError("this Stage A was loaded without a codebook: encode(quantize=True) is unavailable")
            q, idx, vq_loss, commit_loss = self.vquantizer(h, axis=1)
            return q / self.scale_factor, h / self.scale_factor, idx, vq_loss + commit_loss * 0.25
        return h / self.scale_factor, None, None, None

    def decode(self, x):
        h = self.up_blocks(x * self.scale_factor)  # (B, c0, H/2, W/2)
        return self.out_block(h)  # (B, 3, H, W)

    def forward(self, x, quantize: bool = False):
        q, _, _, vq_loss = self.encode(x, quantize)
        return self.decode(q), vq_loss


def StageA_full(**kw):
    return StageA(preset(STAGE_A_PRESETS, "full", "Stage A", **kw))


def StageA_tiny(**kw):
    """~60k parameters; for tests and the pipeline's tiny preset."""
    return StageA(preset(STAGE_A_PRESETS, "tiny", "Stage A", **kw))


StageA_models = {"full": StageA_full, "tiny": StageA_tiny}
