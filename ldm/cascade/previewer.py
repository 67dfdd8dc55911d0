"""Previewer: Stage C latent (16 channels) -> RGB at 8x the resolution (24x24 -> 192x192).

Follows Stability-AI/StableCascade `modules/previewer.py`: one `blocks` Sequential of
conv/GELU/BatchNorm triples with three 2x2 stride-2 transposed convolutions. Parameter names
(`blocks.<i>.*`, BatchNorm statistics as `_mean` / `_variance`) match PaddleMIX's
`previewer.pdparams`; the published `previewer.safetensors` uses the same indices with torch's
`running_mean` / `running_var` names.
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle.nn as nn

from ldm.configs import NetworkConfig, build_config, preset

__all__ = ["Previewer", "PreviewerConfig", "PREVIEWER_PRESETS", "Previewer_full", "Previewer_tiny", "Previewer_models"]


@dataclass(frozen=True)
class PreviewerConfig(NetworkConfig):
    """Previewer constructor arguments (modules/previewer.py names)."""

    c_in: int
    c_hidden: int
    c_out: int


PREVIEWER_PRESETS = {
    "full": PreviewerConfig(c_in=16, c_hidden=512, c_out=3),  # previewer.safetensors (~4M parameters)
    "tiny": PreviewerConfig(c_in=16, c_hidden=32, c_out=3),  # tests and the tiny preset
    "demo": PreviewerConfig(c_in=16, c_hidden=64, c_out=3),  # the shipped demo (assets/demo/cascade)
}


class Previewer(nn.Layer):
    """(B, c_in, h, w) -> (B, c_out, 8h, 8w). Indices of `blocks` (kept for the weight names):
    0 conv1x1, 3 conv3x3, 6 convT, 9 conv3x3, 12 convT, 15 conv3x3, 18 convT, 21 conv3x3, 24 conv1x1;
    each conv but the last is followed by GELU (i+1) and BatchNorm (i+2)."""

    def __init__(self, config: PreviewerConfig | None = None, **overrides):
        super().__init__()
        self.config = config = build_config(PreviewerConfig, config, overrides, default=PREVIEWER_PRESETS["full"])
        c_in, c_hidden, c_out = config.c_in, config.c_hidden, config.c_out
        if c_hidden % 4 != 0:
            raise ValueError(f"c_hidden must be divisible by 4, got {c_hidden}")
        h, h2, h4 = c_hidden, c_hidden // 2, c_hidden // 4
        convs = [
            nn.Conv2D(c_in, h, 1),
            nn.Conv2D(h, h, 3, padding=1),
            nn.Conv2DTranspose(h, h2, 2, stride=2),  # 2x
            nn.Conv2D(h2, h2, 3, padding=1),
            nn.Conv2DTranspose(h2, h4, 2, stride=2),  # 4x
            nn.Conv2D(h4, h4, 3, padding=1),
            nn.Conv2DTranspose(h4, h4, 2, stride=2),  # 8x
            nn.Conv2D(h4, h4, 3, padding=1),
        ]
        layers = []
        for conv in convs:
            layers += [conv, nn.GELU(), nn.BatchNorm2D(conv._out_channels)]
        layers.append(nn.Conv2D(h4, c_out, 1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.config.c_in:
            raise ValueError(f"Previewer expects (B, {self.config.c_in}, h, w), got {list(x.shape)}")
        return self.blocks(x)  # (B, c_out, 8h, 8w)


def Previewer_full(**kw):
    return Previewer(preset(PREVIEWER_PRESETS, "full", "Previewer", **kw))


def Previewer_tiny(**kw):
    return Previewer(preset(PREVIEWER_PRESETS, "tiny", "Previewer", **kw))


Previewer_models = {"full": Previewer_full, "tiny": Previewer_tiny}
