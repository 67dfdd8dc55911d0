"""The FID InceptionV3 (pool3, 2048-d) in Paddle, with its key table and loader.

The network FID is defined with: TensorFlow's 2015-12-05 Inception graph as ported to PyTorch by
pytorch-fid (mseitzer/pytorch-fid `src/pytorch_fid/inception.py`, `InceptionV3([3])` with
`use_fid_inception=True`), which torchvision's Inception3 with four patched block types:

- `FIDInceptionA` / `FIDInceptionC` / `FIDInceptionE_1`: the pooling branch averages without
  counting the zero padding (TensorFlow's average pool);
- `FIDInceptionE_2` (Mixed_7c): that branch is a 3x3 max pool instead;
- Mixed_6a / Mixed_7a are torchvision's InceptionB / InceptionD unchanged.

Input: (B, 3, H, W) floats in [0, 1], resized to 299 x 299 with bilinear interpolation
(align_corners=False, no antialiasing, as `F.interpolate` there) and scaled to [-1, 1]; output:
the global average of Mixed_7c, (B, 2048). Every conv is a torchvision `BasicConv2d` (conv without
bias, BatchNorm eps 1e-3, ReLU).

Parameter names are those of pytorch-fid's weight file `pt_inception-2015-12-05-6726825d.pth`
(torchvision Inception3 names, `Mixed_5b.branch1x1.conv.weight`), with Paddle's BatchNorm names
(`_mean`, `_variance`). The key table `inception_fid` reads three layouts:
    paddle     ours (scripts/convert_other_weight.py --inception writes it)
    torch      pytorch-fid's .pth state dict (BN running_mean/var renamed, num_batches_tracked and
               the 1008-way classifier `fc.*` dropped)
    paddlemix  PaddleMIX's `pp_inception-2015-12-05-6726825d.pdparams` (paddle.vision names:
               `inception_stem.conv_1a_3x3.0.weight`, `inception_block_list.{i}...`,
               `branch_pool_conv`, Sequential indices 0 = conv, 1 = BN; `fc.*` dropped)
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ldm.utils import get_logger
from ldm.weights import (KeyTable, Op, WeightSource, WeightsError, finish_loading, key_table, register_key_table,
                         save_safetensors, weights_metadata)

__all__ = ["FID_SIZE", "FEATURE_DIM", "InceptionV3", "fid_resize", "load_inception", "convert_inception_state",
           "MODEL_NAME", "INCEPTION_FILE"]

logger = get_logger(__name__)

FID_SIZE = 299  # Inception's input side
FEATURE_DIM = 2048  # pool3 features
BN_EPS = 1e-3  # torchvision BasicConv2d
MODEL_NAME = "inception_fid"  # the model name in our files' metadata and of the key table
INCEPTION_FILE = "inception_fid.safetensors"  # what the converter writes into --output_dir


def fid_resize(x: paddle.Tensor) -> paddle.Tensor:
    """(B, 3, H, W) -> (B, 3, 299, 299): bilinear, align_corners=False (the identity at 299)."""
    if tuple(x.shape[2:]) == (FID_SIZE, FID_SIZE):
        return x
    return F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)


class BasicConv2d(nn.Layer):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2D(c_in, c_out, kernel_size, stride=stride, padding=padding, bias_attr=False)
        self.bn = nn.BatchNorm2D(c_out, epsilon=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    """3x3 / stride 1 average that ignores the zero padding (TensorFlow's; count_include_pad=False)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, exclusive=True)


class InceptionA(nn.Layer):
    """FIDInceptionA: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | TF avg pool-1x1 -> 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return paddle.concat([b1, b5, b3, bp], axis=1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Layer):
    """Mixed_6a (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2 -> 480 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return paddle.concat([b3, bd, bp], axis=1)  # (B, 480 + c_in, (H - 3) // 2 + 1, ...)


class InceptionC(nn.Layer):
    """FIDInceptionC: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | TF avg pool-1x1 -> 768 channels."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return paddle.concat([b1, b7, bd, bp], axis=1)  # (B, 768, H, W)


class InceptionD(nn.Layer):
    """Mixed_7a (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2 -> 512 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return paddle.concat([b3, b7, bp], axis=1)  # (B, 512 + c_in, (H - 3) // 2 + 1, ...)


class InceptionE(nn.Layer):
    """FIDInceptionE_1 (pool "avg", TF average) / FIDInceptionE_2 (pool "max"): 1x1 | 1x1-(1x3, 3x1)
    | 1x1-3x3-(1x3, 3x1) | pool-1x1 -> 2048 channels."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = paddle.concat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=1)  # (B, 768, H, W)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = paddle.concat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=1)  # (B, 768, H, W)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return paddle.concat([b1, b3, bd, bp], axis=1)  # (B, 2048, H, W)


class InceptionV3(nn.Layer):
    """pool3 features of the FID Inception (see the module docstring): (B, 3, H, W) in [0, 1] ->
    (B, 2048). Shapes below are for the 299 x 299 input every image is resized to."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def initialize_weights(self) -> "InceptionV3":
        """Random weights for tests (He-normal convs, BatchNorm as identity); FID itself needs the
        released weights (see load_inception)."""
        init = nn.initializer.KaimingNormal(nonlinearity="relu")
        for layer in self.sublayers():
            if isinstance(layer, nn.Conv2D):
                init(layer.weight)
        return self

    def forward(self, x):
        x = 2.0 * fid_resize(x) - 1.0  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return x.mean(axis=[2, 3])  # (B, 2048): pool3


# ---------------------------------------------------------------------------------------------
# Key table: pytorch-fid (.pth), PaddleMIX (.pdparams), ours
# ---------------------------------------------------------------------------------------------
_MIXED = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c")  # PaddleMIX inception_block_list.{0..10}
_TORCH_BN = {"running_mean": "_mean", "running_var": "_variance", "weight": "weight", "bias": "bias"}
_PADDLEMIX_PARAM = {"0.weight": "conv.weight", "1.weight": "bn.weight", "1.bias": "bn.bias",
                    "1._mean": "bn._mean", "1._variance": "bn._variance"}
LAYOUTS = ("paddle", "torch", "paddlemix")


def _torch_name(name: str):
    """pytorch-fid name -> ours (None = not a weight of the feature network)."""
    if name.startswith("fc.") or name.endswith(".num_batches_tracked"):
        return None
    m = re.fullmatch(r"(.+)\.bn\.(running_mean|running_var|weight|bias)", name)
    return f"{m.group(1)}.bn.{_TORCH_BN[m.group(2)]}" if m else name


def _paddlemix_name(name: str):
    """PaddleMIX / paddle.vision name -> ours (None = the classifier)."""
    if name.startswith("fc."):
        return None
    m = re.fullmatch(r"inception_stem\.conv_(\w+?)\.(\d\.\w+)", name)
    if m:
        prefix = f"Conv2d_{m.group(1)}"
    else:
        m = re.fullmatch(r"inception_block_list\.(\d+)\.(\w+)\.(\d\.\w+)", name)
        if not m or int(m.group(1)) >= len(_MIXED):
            return name  # unknown: the strict assigner lists it as unexpected
        branch = "branch_pool" if m.group(2) == "branch_pool_conv" else m.group(2)
        prefix = f"{_MIXED[int(m.group(1))]}.{branch}"
    param = _PADDLEMIX_PARAM.get(m.groups()[-1])
    return f"{prefix}.{param}" if param else name


_RENAMES = {"paddle": lambda n: n, "torch": _torch_name, "paddlemix": _paddlemix_name}


def _plan(shapes: Mapping[str, tuple], layout: str) -> dict:
    plan = {}
    for name, shape in shapes.items():
        target = _RENAMES[layout](name)
        if target is None:
            continue
        if target in plan:
            raise WeightsError(f"inception: {name!r} and {plan[target].sources[0]!r} both map to {target!r}")
        plan[target] = Op((name,), "copy", tuple(int(s) for s in shape))
    return plan


_LAYOUT_MARKERS = (  # (layout, a key only that layout has), checked in order
    ("paddlemix", lambda n: n.startswith("inception_stem.")),
    ("torch", lambda n: n.endswith(".running_mean")),
    ("paddle", lambda n: n.endswith("._mean")),
)


def detect_layout(names) -> str:
    names = list(names)
    for layout, marker in _LAYOUT_MARKERS:
        if any(marker(n) for n in names):
            return layout
    raise WeightsError("not an Inception state dict (no BatchNorm statistics found)")


register_key_table(KeyTable(MODEL_NAME, LAYOUTS, to_paddle=_plan, detect_layout=detect_layout))


def _expected_shapes() -> dict:
    with paddle.LazyGuard():
        net = InceptionV3()
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def convert_inception_state(state, dst, layout: str = "torch", source: str = "") -> str:
    """Write `state` (a mapping name -> array, e.g. pytorch-fid's .pth read by the converter) as our
    `inception_fid` safetensors file at `dst`; every missing / unexpected / mis-shaped key is one
    WeightsError before anything is written. Returns dst."""
    dst = os.fspath(dst)
    plan = key_table(MODEL_NAME).plan({k: tuple(v.shape) for k, v in state.items()}, layout)
    save_safetensors(state, dst, dtype="float32", plan=plan, expected=_expected_shapes(), where=source or "state dict",
                     metadata=weights_metadata(MODEL_NAME, source=os.path.basename(source), source_layout=layout),
                     finite=True)
    logger.info("converted %s (%d tensors) -> %s", source or "state dict", len(plan), dst)
    return dst


def load_inception(path, dtype: str = "float32") -> InceptionV3:
    """The FID Inception from our `inception_fid.safetensors` (scripts/convert_other_weight.py
    --inception) or PaddleMIX's `pp_inception-2015-12-05-6726825d.pdparams` (read through the
    restricted unpickler). Strict: any missing / unexpected / mis-shaped key raises WeightsError.
    Eval mode, gradients off. pytorch-fid's .pth is a pickle: convert it first."""
    path = os.fspath(path)
    if path.endswith((".pth", ".pt")):
        raise WeightsError(f"{path}: a torch pickle is not read here; convert it once with "
                           "scripts/convert_other_weight.py --inception FILE.pth --output_dir DIR")
    with WeightSource(path) as src:
        if src.info.model not in (None, MODEL_NAME):
            raise WeightsError(f"{path}: holds a {src.info.model!r} model, expected {MODEL_NAME!r}")
        table = key_table(MODEL_NAME)
        layout = src.info.layout if src.info.model == MODEL_NAME else table.detect_layout(src.keys())
        plan = table.plan(src.shapes(), layout)
        with paddle.LazyGuard():
            model = InceptionV3()
        return finish_loading(model, src, path, dtype, plan=plan)
