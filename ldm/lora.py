"""LoRA for Stage C and Stage B: adapter layers, the community file format, applying and merging.

One home for LoRA, used by training (`ldm.train.lora`), `inference.py --lora/--lora_b` and
`scripts/merge_lora.py`.

Adapters (`add_lora`): an `nn.Linear` (or, with targets "all", a groups-1 `nn.Conv2D`) is replaced
on its parent by `LoRALinear` / `LoRAConv2D`, which keep the base `weight` / `bias` under the same
names (so the network's state dict is unchanged) and add `lora_down` [r, in(, kh, kw)] (zeros) and
`lora_up` [out, r(, 1, 1)] (normal, std 1): y = base(x) + (alpha / r) * up(down(x)); a fresh
adapter changes nothing. The official recipe (Stability-AI/StableCascade `modules/lora.py`,
`configs/training/finetune_c_3b_lora.yaml`): rank 4, alpha 1, the attention modules (names matching
`.attn`: in_proj and out_proj), lora_down zeros, lora_up normal. Targets: "attention" (q/k/v/out
projections), "linear" (every Linear), "all" (Linears and groups-1 convolutions).

Community format (kohya-ss/sd-scripts `stable-cascade` branch, OneTrainer; read by ComfyUI
`comfy/lora.py`): one tensor triple per module,
    <prefix><module>.lora_down.weight [r, in(, kh, kw)], <prefix><module>.lora_up.weight
    [out, r(, 1, 1)], <prefix><module>.alpha (scalar)
in torch orientation, where <module> is the ORIGINAL-layout module path (Stability-AI checkpoint
names, which are ours except for attention) with the attention split as
`attention.attn.to_q / to_k / to_v / out_proj` (ComfyUI's Stable Cascade layout) and `.` -> `_`;
<prefix> is `lora_prior_unet_` for Stage C (`lora_unet_` is accepted too, as ComfyUI does) and
`lora_unet_` for Stage B. Applied as W' = W + strength * (alpha / r) * up @ down; a file without
`.alpha` means alpha = r. The official positional format (keys `<i>.lora_down` / `<i>.lora_up`,
the order of `modules/lora.py`'s module walk) cannot be mapped to modules reliably and is refused.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ldm.utils import get_logger
from ldm.weights import WeightsError, WeightSource, save_safetensors

logger = get_logger("ldm.lora")

__all__ = ["TARGETS", "PREFIXES", "LoRALinear", "LoRAConv2D", "LoRASpec", "add_lora", "lora_modules",
           "community_name", "lora_state", "save_lora", "read_lora", "lora_delta", "apply_lora", "merge_lora",
           "parse_lora_arg", "with_lora", "LORA_METADATA_KEY"]

TARGETS = ("attention", "linear", "all")
PREFIXES = {"c": "lora_prior_unet_", "b": "lora_unet_"}  # written
ACCEPTED_PREFIXES = {"c": ("lora_prior_unet_", "lora_unet_"), "b": ("lora_unet_",)}  # read
LORA_METADATA_KEY = "ldm_lora"  # our network config (JSON) in the file metadata
_ATTN_RE = re.compile(r"\.attention\.attn\.(q|k|v|out)_proj$")
_OFFICIAL_RE = re.compile(r"^\d+\.lora_(down|up)$")
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


# ---------------------------------------------------------------------------------------------
# Adapter layers
# ---------------------------------------------------------------------------------------------
class _LoRABase(nn.Layer):
    def __init__(self, base: nn.Layer, rank: int, alpha: float, down_shape, up: np.ndarray):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        object.__setattr__(self, "_base", base)  # called, not registered: its parameters are ours below
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.lora_down = self.create_parameter(list(down_shape), dtype="float32",
                                               default_initializer=nn.initializer.Constant(0.0))
        self.lora_up = self.create_parameter(list(up.shape), dtype="float32",
                                             default_initializer=nn.initializer.Assign(up.astype(np.float32)))

    def delta(self) -> np.ndarray:
        """scale * up @ down in the torch orientation of the base weight ([out, in(, kh, kw)])."""
        return lora_delta(self.lora_down.numpy(), self.lora_up.numpy(), self.alpha)


class LoRALinear(_LoRABase):
    """nn.Linear (paddle weight [in, out]) + a rank-r adapter; see the module docstring."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, up: np.ndarray):
        c_in, c_out = base.weight.shape
        super().__init__(base, rank, alpha, [rank, c_in], up.reshape(c_out, rank))

    def forward(self, x):
        y = self._base(x)
        h = paddle.matmul(x, self.lora_down.astype(x.dtype), transpose_y=True)  # (..., r)
        return y + paddle.matmul(h, self.lora_up.astype(x.dtype), transpose_y=True) * self.scale


class LoRAConv2D(_LoRABase):
    """nn.Conv2D (groups 1) + a rank-r adapter: down = a conv of the base's kernel, stride and
    padding to r channels, up = a 1x1 conv (kohya's conv LoRA)."""

    def __init__(self, base: nn.Conv2D, rank: int, alpha: float, up: np.ndarray):
        c_out, c_in, kh, kw = base.weight.shape
        super().__init__(base, rank, alpha, [rank, c_in, kh, kw], up.reshape(c_out, rank, 1, 1))

    def forward(self, x):
        b = self._base
        h = F.conv2d(x, self.lora_down.astype(x.dtype), stride=b._stride, padding=b._padding, dilation=b._dilation)
        return b(x) + F.conv2d(h, self.lora_up.astype(x.dtype)) * self.scale


def _convertible(m: nn.Layer) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2D) and m._groups == 1
                                        and getattr(m, "_padding_mode", "zeros") == "zeros")


def _is_target(path: str, m: nn.Layer, targets: str) -> bool:
    if targets == "attention":
        return isinstance(m, nn.Linear) and _ATTN_RE.search("." + path) is not None
    if targets == "linear":
        return isinstance(m, nn.Linear)
    return _convertible(m)


def lora_modules(net: nn.Layer) -> Dict[str, nn.Layer]:
    """{module path: adapter layer} of the adapters in `net`."""
    return {n: m for n, m in net.named_sublayers() if isinstance(m, _LoRABase)}


@dataclass(frozen=True)
class LoRASpec:
    """The network config of an adapter set (stored in the file metadata)."""

    rank: int = 4
    alpha: float = 1.0
    targets: str = "attention"

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.targets not in TARGETS:
            raise ValueError(f"LoRA targets must be one of {TARGETS}, got {self.targets!r}")
        if not float(self.alpha) > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")


def add_lora(net: nn.Layer, spec: LoRASpec, seed: int = 0) -> List[str]:
    """Replace the target layers of `net` by adapters (in place); returns their module paths.
    lora_up is drawn from numpy's generator (seed, module index), so every process builds the
    same adapters."""
    found = [(n, m) for n, m in net.named_sublayers() if _is_target(n, m, spec.targets)]
    if not found:
        raise ValueError(f"no {spec.targets} modules to adapt in {type(net).__name__}")
    for i, (path, m) in enumerate(found):
        parent_path, _, attr = path.rpartition(".")
        parent = net if not parent_path else dict(net.named_sublayers())[parent_path]
        out = m.weight.shape[1] if isinstance(m, nn.Linear) else m.weight.shape[0]
        up = np.random.default_rng([int(seed), i]).standard_normal((out, spec.rank)).astype(np.float32)
        cls = LoRALinear if isinstance(m, nn.Linear) else LoRAConv2D
        setattr(parent, attr, cls(m, spec.rank, spec.alpha, up))
    logger.info("LoRA rank %d alpha %g on %d %s modules", spec.rank, spec.alpha, len(found), spec.targets)
    return [p for p, _ in found]


# ---------------------------------------------------------------------------------------------
# The community format
# ---------------------------------------------------------------------------------------------
def community_name(path: str) -> str:
    """Our module path -> the community module name without prefix:
    `down_blocks.0.1.attention.attn.q_proj` -> `down_blocks_0_1_attention_attn_to_q`."""
    path = _ATTN_RE.sub(lambda m: ".attention.attn." + ("out_proj" if m.group(1) == "out" else f"to_{m.group(1)}"),
                        "." + path)[1:]
    return path.replace(".", "_")


def _check_stage(stage: str) -> str:
    if stage not in PREFIXES:
        raise ValueError(f"stage must be 'c' or 'b', got {stage!r}")
    return stage


def lora_state(net: nn.Layer, stage: str, values: Optional[Mapping[str, object]] = None) -> Dict[str, np.ndarray]:
    """The community-format tensors of the adapters in `net` (`values`, {"<path>.lora_down": array},
    replace the current ones, e.g. EMA weights)."""
    prefix = PREFIXES[_check_stage(stage)]
    values = values or {}
    out = {}
    for path, m in lora_modules(net).items():
        key = prefix + community_name(path)
        for field in ("lora_down", "lora_up"):
            v = values.get(f"{path}.{field}", getattr(m, field))
            out[f"{key}.{field}.weight"] = (v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v)).astype(np.float32)
        out[f"{key}.alpha"] = np.asarray(m.alpha, np.float32)
    return out


def save_lora(net: nn.Layer, stage: str, path: str, spec: LoRASpec, values=None, extra: Optional[dict] = None) -> str:
    """Write the adapters of `net` as a community-format .safetensors (atomic), with the network
    config in the metadata (kohya's `ss_network_*` keys and ours)."""
    state = lora_state(net, stage, values)
    if not state:
        raise ValueError("the network has no LoRA adapters")
    config = {"rank": int(spec.rank), "alpha": float(spec.alpha), "targets": spec.targets, "stage": stage,
              "modules": len(state) // 3, **(extra or {})}
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank),
                "ss_network_alpha": str(float(spec.alpha)), LORA_METADATA_KEY: json.dumps(config, sort_keys=True)}
    save_safetensors(state, path, dtype="float32", metadata=metadata)
    return path


@dataclass
class LoRAModule:
    key: str  # the file's module name with prefix
    down: np.ndarray  # [r, in(, kh, kw)]
    up: np.ndarray  # [out, r(, 1, 1)]
    alpha: float


def read_lora(path: str, stage: str) -> Dict[str, LoRAModule]:
    """{community module name (no prefix): LoRAModule} of a community-format file; every key that
    is not such a triple, or has another prefix, is an error naming it."""
    accepted = ACCEPTED_PREFIXES[_check_stage(stage)]
    with WeightSource(path) as src:
        names = list(src.keys())
        if names and all(_OFFICIAL_RE.match(n) for n in names):
            raise WeightsError(
                f"{path}: this is the official Stable Cascade LoRA format (positional keys such as {names[0]!r}, "
                f"modules/lora.py), whose tensors are numbered in a module walk order and cannot be mapped to "
                f"modules reliably; convert it with a tool that writes the community format "
                f"(keys {PREFIXES[stage]}<module>.lora_down.weight / .lora_up.weight / .alpha)")
        groups: Dict[str, dict] = {}
        bad = []
        for n in names:
            prefix = next((p for p in accepted if n.startswith(p)), None)
            suffix = next((s for s in _SUFFIXES if n.endswith(s)), None)
            if prefix is None or suffix is None:
                bad.append(n)
                continue
            groups.setdefault(n[len(prefix):-len(suffix)], {"key": n[:-len(suffix)]})[suffix] = src.get(n)
    if bad:
        raise WeightsError(f"{path}: keys that are not Stage {stage.upper()} LoRA tensors (prefix "
                           f"{' or '.join(accepted)}, suffix .lora_down.weight / .lora_up.weight / .alpha): "
                           + ", ".join(bad[:10]) + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
    out = {}
    for name, g in groups.items():
        if ".lora_down.weight" not in g or ".lora_up.weight" not in g:
            raise WeightsError(f"{path}: {g['key']} lacks its lora_down or lora_up weight")
        down, up = np.asarray(g[".lora_down.weight"], np.float32), np.asarray(g[".lora_up.weight"], np.float32)
        r = down.shape[0]
        alpha = float(np.asarray(g[".alpha"]).reshape(-1)[0]) if ".alpha" in g else float(r)
        if up.ndim < 2 or up.shape[1] != r:
            raise WeightsError(f"{path}: {g['key']}: lora_up {list(up.shape)} does not fit lora_down {list(down.shape)}")
        out[name] = LoRAModule(g["key"], down, up, alpha)
    return out


def lora_delta(down: np.ndarray, up: np.ndarray, alpha: float, strength: float = 1.0) -> np.ndarray:
    """strength * (alpha / r) * up @ down, shaped like the torch weight [out, in(, kh, kw)]."""
    r = down.shape[0]
    d = up.reshape(up.shape[0], r).astype(np.float64) @ down.reshape(r, -1).astype(np.float64)
    return (d * (float(strength) * float(alpha) / r)).astype(np.float32).reshape((up.shape[0],) + tuple(down.shape[1:]))


def parse_lora_arg(value: str) -> Tuple[str, float]:
    """FILE[:SCALE] -> (file, scale); a Windows drive colon is kept."""
    head, sep, tail = value.rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", tail):
        return head, float(tail)
    return value, 1.0


def _module_table(module_shapes: Mapping[str, Tuple[tuple, str]]) -> Dict[str, str]:
    return {community_name(p): p for p in module_shapes}


def _torch_shape(shape: tuple, kind: str) -> tuple:
    return (shape[1], shape[0]) if kind == "linear" else tuple(shape)


def _plan(modules: Dict[str, LoRAModule], module_shapes: Mapping[str, Tuple[tuple, str]], where: str
          ) -> List[Tuple[str, LoRAModule]]:
    """(our module path, module) for each file module; unknown names / shapes that do not fit: one
    error naming every one."""
    table = _module_table(module_shapes)
    plan, errors = [], []
    for name, mod in modules.items():
        path = table.get(name)
        if path is None:
            errors.append(f"{mod.key}: matches no module of the network")
            continue
        shape, kind = module_shapes[path]
        want = _torch_shape(shape, kind)
        got = (mod.up.shape[0], mod.down.shape[1]) + tuple(mod.down.shape[2:])
        if got != want or (kind == "linear" and (mod.down.ndim != 2 or mod.up.ndim != 2)):
            errors.append(f"{mod.key}: lora_up {list(mod.up.shape)} @ lora_down {list(mod.down.shape)} does not fit "
                          f"{path}.weight (torch shape {list(want)})")
            continue
        plan.append((path, mod))
    if errors:
        raise WeightsError(f"{where}: " + "; ".join(errors))
    return plan


def _net_module_shapes(net: nn.Layer) -> Dict[str, Tuple[tuple, str]]:
    return {n: (tuple(m.weight.shape), "linear" if isinstance(m, nn.Linear) or (isinstance(m, LoRALinear)) else "conv")
            for n, m in net.named_sublayers() if _convertible(m) or isinstance(m, _LoRABase)}


@paddle.no_grad()
def apply_lora(net: nn.Layer, path: str, stage: str, strength: float = 1.0) -> List[str]:
    """Add a community-format LoRA file to the weights of `net` in memory (the file on disk and the
    base file stay as they are): W += strength * (alpha / r) * up @ down. Every key is checked
    before any weight changes. Returns the module paths changed."""
    plan = _plan(read_lora(path, stage), _net_module_shapes(net), path)
    layers = dict(net.named_sublayers())
    for p, mod in plan:
        w = layers[p].weight
        d = lora_delta(mod.down, mod.up, mod.alpha, strength)
        if isinstance(layers[p], (nn.Linear, LoRALinear)):
            d = d.T  # paddle Linear weight [in, out]
        w.set_value((w.astype("float32") + paddle.to_tensor(d)).astype(w.dtype))
    logger.info("applied LoRA %s (strength %g) to %d modules", path, strength, len(plan))
    return [p for p, _ in plan]


def with_lora(build, loras: Sequence[Tuple[str, float]], stage: str):
    """A network builder (`ldm.cascade.components.Components` style) that applies the LoRA files
    (path, strength) to what `build()` returns."""
    def run():
        net = build()
        for path, strength in loras:
            apply_lora(net, path, stage, strength)
        return net
    return run


def merge_lora(base: str, loras: Sequence[Tuple[str, float]], output: str, dtype: Optional[str] = None) -> dict:
    """Write `base` with the LoRA files merged (W' = W + scale * (alpha / r) * up @ down), in the
    base file's layout (ours, the original, diffusers) and names, streaming tensor by tensor.
    dtype: of the floats written (default: each tensor's own in the base file)."""
    from ldm.cascade.keys import detect_layout, detect_stage, is_linear_weight, plan_to_paddle

    with WeightSource(base) as src:
        shapes = {k: tuple(v) for k, v in src.shapes().items()}
        stage, layout = detect_stage(list(shapes)), detect_layout(list(shapes))
        ops = plan_to_paddle(shapes, layout, stage)  # our name -> Op(sources in the base file)
        module_shapes = {}
        for ours, op in ops.items():
            if ours.endswith(".weight") and len(op.shape) in (2, 4):
                module_shapes[ours[:-len(".weight")]] = (tuple(op.shape), "linear" if len(op.shape) == 2 else "conv")
        deltas: Dict[str, np.ndarray] = {}
        changed = 0
        for path, strength in loras:
            for p, mod in _plan(read_lora(path, stage), module_shapes, path):
                op = ops[p + ".weight"]
                d = lora_delta(mod.down, mod.up, mod.alpha, strength)  # torch [out, in(...)]
                src_name = op.sources[0]
                if op.kind == "slice_T":  # original in_proj_weight [3c, c]: rows of q / k / v
                    full = deltas.setdefault(src_name, np.zeros(shapes[src_name], np.float32))
                    n = shapes[src_name][0] // 3
                    full[op.index * n:(op.index + 1) * n] += d
                else:
                    if op.kind == "copy" and is_linear_weight(p + ".weight"):
                        d = d.T  # our layout: Linear [in, out]
                    if op.kind not in ("copy", "T"):
                        raise WeightsError(f"{base}: cannot merge into {src_name} ({op.kind})")
                    full = deltas.setdefault(src_name, np.zeros(shapes[src_name], np.float32))
                    full += d
                changed += 1
        tags = {k: src.dtype(k) for k in shapes}

        def stream():
            for k, v in src.items():
                if k in deltas:
                    v = (v.astype(np.float32) + deltas[k]).astype(v.dtype)
                yield k, v

        from ldm.weights import STORAGE_TAGS

        per_tag = {t: n for n, t in STORAGE_TAGS.items()}
        if dtype is None:  # keep the base's float type (bf16 is widened on read)
            floats = {tags[k] for k in shapes if tags[k] in per_tag}
            dtype = per_tag[floats.pop()] if len(floats) == 1 else None
        save_safetensors(stream(), output, dtype=dtype, metadata=dict(src.metadata or {}), finite=True)
    return {"output": output, "stage": stage, "layout": layout, "modules": changed, "tensors_changed": len(deltas),
            "dtype": dtype}

