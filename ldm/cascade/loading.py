"""Weight sources, streaming conversion and lazy model building for Stage B / Stage C.

- `WeightSource` opens one safetensors file, several shards, a diffusers model folder
  (config.json + safetensors, sharded with its index json or not) or a seed `.pdparams`
  (restricted unpickler), and exposes names, shapes and one-tensor reads.
- `plan_for(source, stage, layout)` maps any supported layout to our names (ldm.weights.cascade_keys).
- `build_model` creates the network under `paddle.LazyGuard` in the target dtype and assigns
  tensor by tensor, so building the 3.6B Stage C needs ~1x its memory, not 2x.
- `convert_unet_weights` writes our layout as safetensors, streaming (peak ~ largest tensor).
"""
from __future__ import annotations

import contextlib
import glob
import json
import mmap
import os

import numpy as np
import paddle

from ..utils import get_logger
from ..weights.cascade_keys import (
    PADDLEMIX_LEFTOVER_RE, apply_op, detect_layout, detect_stage, plan_from_paddle, plan_to_paddle,
)
from ..weights.io import (
    SafetensorsReader, SafetensorsWriter, WeightsError, bf16_to_fp32, check_state_dict, load_pdparams, to_storage,
)

logger = get_logger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
FORMAT_TAG = "ldm-cascade-paddle"  # safetensors metadata "format" of files we write


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
class WeightSource:
    """Read-only view over the tensors of one checkpoint (possibly sharded)."""

    def __init__(self, paths):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise WeightsError("no weight paths given")
        self.config = None  # diffusers config.json when the input is a model folder
        self.metadata: dict = {}
        self.description = ", ".join(paths)
        self._readers = []
        self._where: dict[str, object] = {}
        self._arrays = None
        files = []
        for p in paths:
            if os.path.isdir(p):
                files += self._folder_files(p)
            elif os.path.exists(p):
                files.append(p)
            else:
                raise WeightsError(f"weights not found: {p}")
        if len(files) == 1 and (files[0].endswith(".pdparams") or files[0].endswith(".pdparams.bin")):
            self._arrays = load_pdparams(files[0])
            self._shapes = {k: tuple(v.shape) for k, v in self._arrays.items()}
            self.kind = "pdparams"
            return
        self.kind = "safetensors"
        self._shapes = {}
        try:
            for f in files:
                if not f.endswith(".safetensors"):
                    raise WeightsError(f"{f}: expected .safetensors (or a single .pdparams)")
                r = SafetensorsReader(f)
                self._readers.append(r)
                if r.metadata and not self.metadata:
                    self.metadata = dict(r.metadata)
                for k in r.keys():
                    if k in self._where:
                        raise WeightsError(f"tensor {k!r} appears in two shards ({self._where[k].path}, {f})")
                    self._where[k] = r
                    self._shapes[k] = r.shape(k)
        except Exception:
            self.close()
            raise

    def _folder_files(self, folder):
        cfg = os.path.join(folder, "config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                self.config = json.load(f)
        indexes = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
        if len(indexes) > 1:
            names = [os.path.basename(i) for i in indexes]
            raise WeightsError(f"{folder}: several index files {names}; pass the shard files explicitly")
        if indexes:
            with open(indexes[0]) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsError(f"{indexes[0]}: no weight_map")
            files = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
            missing = [s for s in files if not os.path.exists(s)]
            if missing:
                raise WeightsError(f"{indexes[0]} names shards that are missing: {missing}")
            return files
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if len(files) != 1:
            names = [os.path.basename(f) for f in files]
            raise WeightsError(f"{folder}: expected one .safetensors file or an index json, found {names}")
        return files

    def shapes(self) -> dict[str, tuple]:
        return dict(self._shapes)

    def get(self, name: str) -> np.ndarray:
        """float tensors come back as float32 (bf16 widened) or their stored float type."""
        if self._arrays is not None:
            arr = self._arrays[name]
            if arr.dtype == np.uint16:  # paddle.save keeps bf16 as uint16 bit patterns
                arr = bf16_to_fp32(arr)
            return arr
        reader = self._where[name]
        arr = reader.get(name)  # a copy out of the memory map
        _drop_mapped_pages(reader)
        return arr

    def release(self, name: str) -> None:
        """Forget an in-memory (.pdparams) tensor once it has been assigned."""
        if self._arrays is not None:
            self._arrays.pop(name, None)

    def close(self):
        for r in self._readers:
            r.close()
        self._readers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _drop_mapped_pages(reader) -> None:
    """Unmap the file pages a read touched, so a pass over a multi-GB file does not keep the
    whole file resident (mapped pages count towards RSS; they stay in the page cache)."""
    mm = getattr(reader, "_mm", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def resolve_layout(source: WeightSource, layout: str = "auto") -> str:
    """The key layout of `source`; an explicit `layout` is used when the keys do not tell (then the
    key check lists what does not fit) and is an error when they clearly say otherwise."""
    if source.metadata.get("format") == FORMAT_TAG or source.kind == "pdparams":
        found = "paddle"
    else:
        try:
            found = detect_layout(source.shapes())
        except WeightsError as e:
            if layout == "auto":
                raise WeightsError(f"{source.description}: {e}; pass --source_format") from None
            return layout
    if layout not in ("auto", found):
        raise WeightsError(f"{source.description}: looks like the {found!r} layout, but {layout!r} was requested")
    return found


def resolve_stage(source: WeightSource, stage: str | None = None) -> str:
    """Stage "b" or "c" of `source`: from our metadata, else from the keys; an explicit `stage` is
    used when the keys do not tell (e.g. a key is missing: the key check then lists it)."""
    found = source.metadata.get("stage")
    if found is None:
        try:
            found = detect_stage(source.shapes())
        except WeightsError as e:
            if stage is None:
                raise WeightsError(f"{source.description}: {e}; pass --stage b or --stage c") from None
            return stage
    if stage is not None and stage != found:
        raise WeightsError(f"{source.description}: holds Stage {found.upper()} weights, not Stage {stage.upper()}")
    return found


def plan_for(source: WeightSource, stage: str, layout: str):
    if source.kind == "pdparams":
        dropped = [k for k in source.shapes() if PADDLEMIX_LEFTOVER_RE.search(k)]
        if dropped:
            logger.info("%s: ignoring %d unsplit in_proj tensors left by PaddleMIX's converter",
                        source.description, len(dropped))
    return plan_to_paddle(source.shapes(), layout, stage)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
_DIFFUSERS_BLOCKS = {"SDCascadeResBlock": "C", "SDCascadeTimestepBlock": "T", "SDCascadeAttnBlock": "A"}


def config_from_diffusers(cfg: dict, stage: str) -> dict:
    """StableCascadeUNet config.json -> StageC/StageB keyword arguments."""
    try:
        level_config = ["".join(_DIFFUSERS_BLOCKS[b] for b in types) for types in cfg["block_types_per_layer"]]
    except KeyError as e:
        raise WeightsError(f"diffusers config: unsupported block type {e}") from e
    n = len(cfg["block_out_channels"])
    out = dict(
        c_in=cfg["in_channels"], c_out=cfg["out_channels"], c_r=cfg["timestep_ratio_embedding_dim"],
        patch_size=cfg["patch_size"], c_cond=cfg["conditioning_dim"], c_hidden=list(cfg["block_out_channels"]),
        nhead=[h if h > 0 else -1 for h in cfg["num_attention_heads"]],
        blocks=[list(cfg["down_num_layers_per_block"]), list(cfg["up_num_layers_per_block"])],
        block_repeat=[list(cfg["down_blocks_repeat_mappers"]), list(cfg["up_blocks_repeat_mappers"])],
        level_config=level_config, c_clip_seq=cfg["clip_seq"], kernel_size=cfg["kernel_size"],
        dropout=list(cfg["dropout"]) if isinstance(cfg["dropout"], (list, tuple)) else [cfg["dropout"]] * n,
        self_attn=cfg["self_attn"], t_conds=list(cfg["timestep_conditioning_type"]),
    )
    if stage == "c":
        out.update(c_clip_text=cfg["clip_text_in_channels"], c_clip_text_pooled=cfg["clip_text_pooled_in_channels"],
                   c_clip_img=cfg["clip_image_in_channels"],
                   switch_level=list(cfg.get("switch_level") or [False] * (n - 1)))
    else:
        if cfg.get("switch_level") is not None:
            raise WeightsError("diffusers decoder config with switch_level is not a Stage B layout")
        out.update(c_clip=cfg["clip_text_pooled_in_channels"], c_effnet=cfg["effnet_in_channels"],
                   c_pixels=cfg["pixel_mapper_in_channels"])
    return out


def _network(stage):
    if stage == "c":
        from .stage_c import STAGE_C_PRESETS, StageC

        return StageC, STAGE_C_PRESETS
    from .stage_b import STAGE_B_PRESETS, StageB

    return StageB, STAGE_B_PRESETS


@contextlib.contextmanager
def _default_dtype(dtype):
    old = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(old)


def expected_shapes(cls, cfg: dict) -> dict[str, tuple]:
    """Our parameter names and shapes for a config, without allocating parameters."""
    with paddle.LazyGuard():
        model = cls(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def resolve_config(source: WeightSource, stage: str, preset: str | None, plan):
    """Config (StageCConfig / StageBConfig) from (in order): an explicit preset, our metadata, a
    diffusers config.json, or the one preset whose manifest equals the converted shapes."""
    cls, presets = _network(stage)
    config_cls = type(next(iter(presets.values())))
    if preset not in (None, "auto"):
        if preset not in presets:
            raise WeightsError(f"unknown Stage {stage.upper()} preset {preset!r}; choose one of {sorted(presets)}")
        return presets[preset]
    if "config" in source.metadata:
        return config_cls.from_json(source.metadata["config"])
    if source.config is not None:
        return config_cls.from_dict(config_from_diffusers(source.config, stage))
    got = {k: op.shape for k, op in plan.items()}
    for name, cfg in presets.items():
        if expected_shapes(cls, cfg) == got:
            logger.info("%s: matches the %s preset", source.description, name)
            return cfg
    raise WeightsError(f"{source.description}: matches no Stage {stage.upper()} preset {sorted(presets)}; "
                       "pass --preset or a config")


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------
def _check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def stream_into(model, source: WeightSource, plan) -> None:
    """Assign every planned tensor to the model, one at a time, cast to each parameter's dtype.
    All names and shapes are checked first; nothing is assigned on a mismatch."""
    targets = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in targets.items()}
    check_state_dict(expected, {k: op.shape for k, op in plan.items()}, source.description)
    for name, op in plan.items():
        arr = apply_op(op, source.get)
        t = targets[name]
        src = paddle.to_tensor(arr)
        if src.dtype != t.dtype:
            src = src.astype(t.dtype)
        t.set_value(src)
        del src, arr
        for s in op.sources:
            source.release(s)
    not_set = [k for k, v in targets.items() if not v._is_initialized()]
    if not_set:  # cannot happen after check_state_dict; kept as a guard against silent partial loads
        raise WeightsError(f"{source.description}: parameters left unset: {not_set[:10]}")


def build_model(cls, cfg: dict, dtype: str = "float32", weights=None, stage: str | None = None, layout: str = "auto"):
    """Eager random init when `weights` is None; otherwise lazy build + streaming load."""
    _check_dtype(dtype)
    if weights is None:
        model = cls(cfg)
        if dtype != "float32":
            model.to(dtype=dtype)
        return model
    with WeightSource(weights) as source:
        stage = resolve_stage(source, stage)
        plan = plan_for(source, stage, resolve_layout(source, layout))
        with _default_dtype(dtype), paddle.LazyGuard():
            model = cls(cfg)
        stream_into(model, source, plan)
    model.eval()
    return model


def load_model(cls, presets: dict, stage: str, path, preset, dtype: str):
    _check_dtype(dtype)
    if path is None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
        return build_model(cls, presets[preset], dtype)
    with WeightSource(path) as source:
        stage = resolve_stage(source, stage)
        plan = plan_for(source, stage, resolve_layout(source))
        cfg = resolve_config(source, stage, preset, plan)
        with _default_dtype(dtype), paddle.LazyGuard():
            model = cls(cfg)
        stream_into(model, source, plan)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Conversion to our safetensors layout
# ---------------------------------------------------------------------------------------------
def convert_unet_weights(inputs, output, stage=None, preset=None, dtype="float32", source_format="auto") -> dict:
    """Convert Stage B/C weights (original, diffusers or paddle layout) to our safetensors,
    streaming tensor by tensor. Returns a summary dict."""
    _check_dtype(dtype)
    with WeightSource(inputs) as source:
        stage = resolve_stage(source, stage)
        layout = resolve_layout(source, source_format)
        plan = plan_for(source, stage, layout)
        cfg = resolve_config(source, stage, preset, plan)
        cls, _ = _network(stage)
        expected = expected_shapes(cls, cfg)
        check_state_dict(expected, {k: op.shape for k, op in plan.items()}, source.description)
        order = list(expected)  # our module order
        tags = {}
        for name in order:  # storage tag per tensor without reading data
            probe = np.zeros((0,), np.float32)
            tags[name] = to_storage(probe, dtype)[1]
        meta = {"format": FORMAT_TAG, "stage": stage, "config": cfg.to_json(), "source_layout": layout}
        n_params = 0
        with SafetensorsWriter(output, [(k, plan[k].shape, tags[k]) for k in order], meta) as w:
            for name in order:
                arr = apply_op(plan[name], source.get)
                n_params += arr.size
                w.write(name, to_storage(arr.astype(np.float32, copy=False), dtype)[0])
                del arr
                for s in plan[name].sources:
                    source.release(s)
    return {"output": os.fspath(output), "stage": stage, "source_layout": layout, "tensors": len(order),
            "parameters": int(n_params), "dtype": dtype}


def export_unet_weights(model, stage: str, layout: str, output, dtype=None) -> None:
    """Write a model's weights in the original or diffusers torch layout (for round trips)."""
    state = {k: v for k, v in model.state_dict().items()}
    plan = plan_from_paddle({k: tuple(v.shape) for k, v in state.items()}, layout, stage)

    def get(name):
        t = state[name]
        return t.astype("float32").numpy() if t.dtype != paddle.float32 else t.numpy()

    tag = to_storage(np.zeros((0,), np.float32), dtype)[1] if dtype else "F32"
    with SafetensorsWriter(output, [(k, op.shape, tag) for k, op in plan.items()]) as w:
        for k, op in plan.items():
            w.write(k, to_storage(apply_op(op, get), dtype or "float32")[0])
