"""EfficientNet encoder of Stable Cascade: EfficientNetV2-S features + a 1x1 mapper to 16 channels.

Follows Stability-AI/StableCascade `modules/effnet.py` (`EfficientNetEncoder`: torchvision
`efficientnet_v2_s().features` as `backbone`, then `mapper` = Conv2d(1280, 16, 1, bias=False) +
BatchNorm2d(16, affine=False)) and torchvision `models/efficientnet.py` (EfficientNetV2-S stages,
MBConv / FusedMBConv blocks, BatchNorm eps 1e-3, SiLU, squeeze-excitation with SiLU/sigmoid).
Parameter names equal torchvision's under `backbone.` with Paddle BatchNorm statistics names
(`_mean`, `_variance`), which is also the layout of PaddleMIX's `effnet_encoder.pdparams`.

The encoder is frozen in Stable Cascade: every BatchNorm uses its running statistics
(`use_global_stats=True`), so train() vs eval() does not change the output, and stochastic depth
(a training-only regulariser) is not implemented. Input: RGB in [0, 1] normalised with the
ImageNet mean/std (`imagenet_normalize`); output stride 32 (768 px -> 24x24).
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn

from ldm.configs import NetworkConfig, build_config, preset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "V2_S_STAGES",
    "imagenet_normalize",
    "efficientnet_v2_s_features",
    "EfficientNetEncoder",
    "EfficientNetEncoder_full",
    "EfficientNetEncoder_models",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-3  # torchvision efficientnet_v2_* norm_layer
# (block, expand_ratio, kernel, stride, in_channels, out_channels, num_layers): torchvision V2-S
V2_S_STAGES = (
    ("fused", 1, 3, 1, 24, 24, 2),
    ("fused", 4, 3, 2, 24, 48, 4),
    ("fused", 4, 3, 2, 48, 64, 4),
    ("mb", 4, 3, 2, 64, 128, 6),
    ("mb", 6, 3, 1, 128, 160, 9),
    ("mb", 6, 3, 2, 160, 256, 15),
)
V2_S_LAST_CHANNELS = 1280


def imagenet_normalize(x):
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean = paddle.to_tensor(IMAGENET_MEAN, dtype=x.dtype).reshape([1, 3, 1, 1])
    std = paddle.to_tensor(IMAGENET_STD, dtype=x.dtype).reshape([1, 3, 1, 1])
    return (x - mean) / std


def _bn(c, eps=BN_EPS, affine=True):
    if affine:
        return nn.BatchNorm2D(c, epsilon=eps, use_global_stats=True)
    return nn.BatchNorm2D(c, epsilon=eps, weight_attr=False, bias_attr=False, use_global_stats=True)


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm (+ SiLU): torchvision `Conv2dNormActivation` (keys .0 / .1)."""

    def __init__(self, c_in, c_out, kernel, stride=1, groups=1, act=True):
        layers = [nn.Conv2D(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups,
                            bias_attr=False), _bn(c_out)]
        if act:
            layers.append(nn.Silu())
        super().__init__(*layers)


class SqueezeExcitation(nn.Layer):
    """avgpool -> fc1 (1x1 conv) -> SiLU -> fc2 (1x1 conv) -> sigmoid -> scale the input."""

    def __init__(self, c, c_squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2D(1)
        self.fc1 = nn.Conv2D(c, c_squeeze, 1)
        self.fc2 = nn.Conv2D(c_squeeze, c, 1)
        self.activation = nn.Silu()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):  # (B, C, H, W)
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))  # (B, C, 1, 1)
        return x * s


class MBConv(nn.Layer):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> SE -> 1x1 project (no activation)."""

    def __init__(self, expand_ratio, kernel, stride, c_in, c_out):
        super().__init__()
        c_mid = c_in * expand_ratio
        layers = []
        if c_mid != c_in:
            layers.append(ConvBNAct(c_in, c_mid, 1))
        layers.append(ConvBNAct(c_mid, c_mid, kernel, stride=stride, groups=c_mid))
        layers.append(SqueezeExcitation(c_mid, max(1, c_in // 4)))
        layers.append(ConvBNAct(c_mid, c_out, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res_connect else y


class FusedMBConv(nn.Layer):
    """Fused inverted residual: kxk expand conv -> 1x1 project, or one kxk conv when not expanding."""

    def __init__(self, expand_ratio, kernel, stride, c_in, c_out):
        super().__init__()
        c_mid = c_in * expand_ratio
        if c_mid != c_in:
            layers = [ConvBNAct(c_in, c_mid, kernel, stride=stride), ConvBNAct(c_mid, c_out, 1, act=False)]
        else:
            layers = [ConvBNAct(c_in, c_out, kernel, stride=stride)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res_connect else y


def efficientnet_v2_s_features(stages=V2_S_STAGES, last_channels=V2_S_LAST_CHANNELS) -> nn.Sequential:
    """torchvision `efficientnet_v2_s().features`: stem (index 0), six stages (1-6), head (7)."""
    layers = [ConvBNAct(3, stages[0][4], 3, stride=2)]
    for kind, ratio, kernel, stride, c_in, c_out, n in stages:
        cls = FusedMBConv if kind == "fused" else MBConv
        layers.append(nn.Sequential(*[cls(ratio, kernel, stride if i == 0 else 1, c_in if i == 0 else c_out, c_out)
                                      for i in range(n)]))
    layers.append(ConvBNAct(stages[-1][5], last_channels, 1))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class EfficientNetConfig(NetworkConfig):
    """EfficientNetEncoder constructor arguments (modules/effnet.py): the latent width and the
    backbone's stages (rows as V2_S_STAGES) and head width, torchvision efficientnet_v2_s by
    default. Fields at that default are left out of ``to_dict``, so the metadata of a V2-S file
    stays ``{"c_latent": 16}`` as the project has always written it."""

    c_latent: int
    stages: tuple = V2_S_STAGES
    last_channels: int = V2_S_LAST_CHANNELS

    def to_dict(self) -> dict:
        d = super().to_dict()
        for name, default in (("stages", V2_S_STAGES), ("last_channels", V2_S_LAST_CHANNELS)):
            if getattr(self, name) == default:
                del d[name]
        return d


EFFNET_PRESETS = {
    "full": EfficientNetConfig(c_latent=16),  # effnet_encoder.safetensors
    # the shipped demo (assets/demo/cascade, ldm/demo/cascade.py): the same blocks, five stride-2
    # steps (output stride 32), one block per stage (~60k parameters)
    "demo": EfficientNetConfig(c_latent=16, stages=(
        ("fused", 1, 3, 1, 16, 16, 1),
        ("fused", 2, 3, 2, 16, 24, 1),
        ("fused", 2, 3, 2, 24, 32, 1),
        ("mb", 2, 3, 2, 32, 48, 1),
        ("mb", 2, 3, 1, 48, 48, 1),
        ("mb", 2, 3, 2, 48, 64, 1),
    ), last_channels=128),
}


class EfficientNetEncoder(nn.Layer):
    """(B, 3, H, W) ImageNet-normalised -> (B, c_latent, H/32, W/32) (with the V2-S stages)."""

    def __init__(self, config: EfficientNetConfig | None = None, **overrides):
        super().__init__()
        self.config = config = build_config(EfficientNetConfig, config, overrides, default=EFFNET_PRESETS["full"])
        c_latent = config.c_latent
        if c_latent < 1:
            raise ValueError(f"c_latent must be >= 1, got {c_latent}")
        if not config.stages or any(len(row) != 7 or row[0] not in ("fused", "mb") for row in config.stages):
            raise ValueError(f"stages must be rows (block 'fused'|'mb', expand, kernel, stride, c_in, c_out, "
                             f"layers), got {config.stages}")
        self.backbone = efficientnet_v2_s_features(config.stages, config.last_channels)
        self.mapper = nn.Sequential(nn.Conv2D(config.last_channels, c_latent, 1, bias_attr=False),
                                    _bn(c_latent, eps=1e-5, affine=False))
        self.eval()

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"EfficientNetEncoder expects (B, 3, H, W), got {list(x.shape)}")
        return self.mapper(self.backbone(x))  # (B, 1280, H/32, W/32) -> (B, c_latent, H/32, W/32)


def EfficientNetEncoder_full(**kw):
    return EfficientNetEncoder(preset(EFFNET_PRESETS, "full", "EfficientNet", **kw))


EfficientNetEncoder_models = {"full": EfficientNetEncoder_full}
