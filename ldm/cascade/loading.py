"""Building Stable Cascade networks from weight files: the model side of ldm.weights.

- Stage C / Stage B (`load_stage_c`, `build_stage_c`, `load_stage_b`, `build_stage_b`): our
  safetensors, the original Stability-AI files, diffusers folders (config.json + safetensors,
  sharded or not) or the seed's `.pdparams`; the key tables of ldm/cascade/keys.py map them to our
  names. The network is created under `paddle.LazyGuard` in the target dtype and assigned tensor
  by tensor, so building the 3.6B Stage C needs ~1x its memory, not 2x.
- Stage A, EfficientNet encoder, Previewer (`load_stage_a`, `load_effnet`, `load_previewer`): our
  Paddle-layout safetensors (sizes from the metadata config) or the seed's `.pdparams` (sizes from
  the shapes); a torch-layout file is refused (convert it with ldm.cascade.convert). Returned
  frozen, in eval mode.
- `save_network(net, path)`: our file, with the metadata schema of ldm.weights (model name and
  config), which every loader here reads back.
All loads are strict: a missing, unexpected, mis-shaped or mis-typed key raises WeightsError
listing them before anything is assigned.
"""
from __future__ import annotations

import contextlib
import os

import paddle

from ldm.utils import get_logger
from ldm.weights import (
    WeightSource, WeightsError, assign_state_dict, check_storage_dtype, finish_loading, key_table, save_safetensors,
    weights_metadata,
)

from .effnet import EfficientNetEncoder
from .keys import (
    PADDLEMIX_LEFTOVER_RE, detect_stage, effnet_config_from_shapes, previewer_config_from_shapes,
    stage_a_config_from_shapes,
)
from .previewer import Previewer
from .stage_a import CODEBOOK_KEY, SCALE_FACTOR_ORIGINAL, StageA
from .stage_b import STAGE_B_PRESETS, StageB, stage_b_config
from .stage_c import STAGE_C_PRESETS, StageC, stage_c_config

__all__ = ["MODEL_NAMES", "STAGE_NETWORKS", "resolve_layout", "resolve_stage", "plan_for", "config_from_diffusers", "resolve_config",
           "expected_shapes", "build_model", "load_model", "build_stage_c", "load_stage_c", "build_stage_b",
           "load_stage_b", "load_stage_a", "load_effnet", "load_previewer", "model_name", "save_network"]

logger = get_logger(__name__)

# network class -> model name of the metadata / key table
MODEL_NAMES = {StageC: "stage_c", StageB: "stage_b", StageA: "stage_a", EfficientNetEncoder: "effnet",
               Previewer: "previewer"}
STAGE_NETWORKS = {"c": (StageC, STAGE_C_PRESETS), "b": (StageB, STAGE_B_PRESETS)}


# ---------------------------------------------------------------------------------------------
# Stage B / Stage C: layout, stage and config of a source
# ---------------------------------------------------------------------------------------------
def resolve_layout(source: WeightSource, stage: str, layout: str = "auto") -> str:
    """The key layout of `source`; an explicit `layout` is used when the keys do not tell (then the
    key check lists what does not fit) and is an error when they clearly say otherwise."""
    if source.info.layout == "paddle":
        found = "paddle"
    else:
        try:
            found = key_table(f"stage_{stage}").detect_layout(source.keys())
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
    model = source.info.model
    found = {"stage_b": "b", "stage_c": "c"}.get(model)
    if model is not None and found is None:
        raise WeightsError(f"{source.description}: holds a {model!r} model, not Stage B or Stage C")
    if found is None:
        try:
            found = detect_stage(source.keys())
        except WeightsError as e:
            if stage is None:
                raise WeightsError(f"{source.description}: {e}; pass --stage b or --stage c") from None
            return stage
    if stage is not None and stage != found:
        raise WeightsError(f"{source.description}: holds Stage {found.upper()} weights, not Stage {stage.upper()}")
    return found


def plan_for(source: WeightSource, stage: str, layout: str):
    if source.kind == "pdparams":
        dropped = [k for k in source.keys() if PADDLEMIX_LEFTOVER_RE.search(k)]
        if dropped:
            logger.info("%s: ignoring %d unsplit in_proj tensors left by PaddleMIX's converter",
                        source.description, len(dropped))
    return key_table(f"stage_{stage}").plan(source.shapes(), layout)


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


@contextlib.contextmanager
def _default_dtype(dtype):
    old = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(old)


def expected_shapes(cls, cfg) -> dict[str, tuple]:
    """Our parameter names and shapes for a config, without allocating parameters."""
    with paddle.LazyGuard():
        model = cls(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def resolve_config(source: WeightSource, stage: str, preset: str | None, plan):
    """Config (StageCConfig / StageBConfig) from (in order): an explicit preset, our metadata, a
    diffusers config.json, or the one preset whose manifest equals the converted shapes."""
    cls, presets = STAGE_NETWORKS[stage]
    config_cls = type(next(iter(presets.values())))
    if preset not in (None, "auto"):
        if preset not in presets:
            raise WeightsError(f"unknown Stage {stage.upper()} preset {preset!r}; choose one of {sorted(presets)}")
        return presets[preset]
    if source.info.config is not None:
        try:
            return config_cls.from_dict(source.info.config)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{source.description}: metadata config: {e}") from e
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
# Stage B / Stage C: building and loading
# ---------------------------------------------------------------------------------------------
def _lazy_load(cls, cfg, source: WeightSource, plan, dtype: str):
    with _default_dtype(dtype), paddle.LazyGuard():
        model = cls(cfg)
    assign_state_dict(model, source, plan=plan)
    model.eval()
    return model


def build_model(cls, cfg, dtype: str = "float32", weights=None, stage: str | None = None, layout: str = "auto"):
    """Eager random init when `weights` is None; otherwise lazy build + streaming load."""
    check_storage_dtype(dtype)
    if weights is None:
        model = cls(cfg)
        if dtype != "float32":
            model.to(dtype=dtype)
        return model
    with WeightSource(weights) as source:
        stage = resolve_stage(source, stage)
        plan = plan_for(source, stage, resolve_layout(source, stage, layout))
        return _lazy_load(cls, cfg, source, plan, dtype)


def load_model(cls, presets: dict, stage: str, path, preset, dtype: str):
    check_storage_dtype(dtype)
    if path is None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
        return build_model(cls, presets[preset], dtype)
    with WeightSource(path) as source:
        stage = resolve_stage(source, stage)
        plan = plan_for(source, stage, resolve_layout(source, stage))
        return _lazy_load(cls, resolve_config(source, stage, preset, plan), source, plan, dtype)


def build_stage_c(preset="1B", dtype: str = "float32", weights=None, config=None) -> StageC:
    """Build Stage C from a preset name (or an explicit `config`: a StageCConfig or a dict) in `dtype`.

    With `weights` (a path) the model is created under `paddle.LazyGuard` (no parameter memory)
    and each parameter is materialised once, straight in `dtype`, from the streaming reader;
    missing/unexpected/mis-shaped keys raise WeightsError before anything is assigned.
    """
    cfg = config if config is not None else stage_c_config(preset)
    return build_model(StageC, cfg, dtype=dtype, weights=weights, stage="c")


def load_stage_c(path=None, preset: str | None = "1B", dtype: str = "float32") -> StageC:
    """Stage C from `path` (.safetensors in our layout, the original or diffusers layout, or a
    seed `.pdparams` through the restricted unpickler) or randomly initialised when path is None.
    `preset=None` takes the config stored in our safetensors metadata."""
    return load_model(StageC, STAGE_C_PRESETS, "c", path, preset, dtype)


def build_stage_b(preset="700M", dtype: str = "float32", weights=None, config=None) -> StageB:
    """Build Stage B from a preset name (or an explicit `config`) in `dtype`; with `weights`
    the model is created lazily and loaded tensor by tensor (see build_stage_c)."""
    cfg = config if config is not None else stage_b_config(preset)
    return build_model(StageB, cfg, dtype=dtype, weights=weights, stage="b")


def load_stage_b(path=None, preset: str | None = "700M", dtype: str = "float32") -> StageB:
    """Stage B from `path` (any supported layout, see load_stage_c) or random when None."""
    return load_model(StageB, STAGE_B_PRESETS, "b", path, preset, dtype)


# ---------------------------------------------------------------------------------------------
# Stage A, EfficientNet encoder, Previewer (Paddle layout only)
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _paddle_source(path, model: str):
    """(source, plan to our names) of a Paddle-layout file of `model`."""
    with WeightSource(path) as src:
        if src.info.layout != "paddle":
            raise WeightsError(
                f"{src.description}: this safetensors file is not in Paddle layout (metadata format="
                f"{src.info.format!r}); convert it first with scripts/convert_other_weight.py")
        if src.info.model not in (None, model):
            raise WeightsError(f"{src.description}: holds a {src.info.model!r} model, expected {model!r}")
        yield src, key_table(model).plan(src.shapes(), "paddle")


def _sizes(infer, plan, where):
    try:
        return infer({k: op.shape for k, op in plan.items()})
    except ValueError as e:
        raise WeightsError(f"{where}: {e}") from e


def load_stage_a(path, dtype: str = "float32", scale_factor: float | None = None) -> StageA:
    """Build a `StageA` from our converted `.safetensors` (sizes and scale from its metadata) or a
    `.pdparams` in PaddleMIX names (sizes from the shapes, scale 0.43 unless given). Strict: any
    missing / unexpected / mis-shaped key raises WeightsError; the one exception is a `.pdparams`
    without the codebook (decode-only, `codebook_loaded=False`, logged). Returns the model in eval
    mode with gradients off, cast to `dtype`."""
    with _paddle_source(path, "stage_a") as (src, plan):
        cfg = dict(src.info.config) if src.info.config else _sizes(stage_a_config_from_shapes, plan, path)
        if scale_factor is not None:
            cfg["scale_factor"] = scale_factor
        cfg.setdefault("scale_factor", SCALE_FACTOR_ORIGINAL)
        model = StageA(cfg)
        ignore = None
        if src.kind == "pdparams" and CODEBOOK_KEY not in plan:
            # PaddleMIX's StageA holds torchtools' (torch) VectorQuantize, which is not a Paddle sublayer,
            # so a state dict saved from it has no codebook. Decoding never needs it; quantising does.
            logger.warning("%s has no %s: Stage A can decode, but encode(quantize=True) is disabled", path,
                           CODEBOOK_KEY)
            model.codebook_loaded = False

            def ignore(name):
                return name == CODEBOOK_KEY
        return finish_loading(model, src, path, dtype, plan=plan, ignore_missing=ignore)


def load_effnet(path, dtype: str = "float32") -> EfficientNetEncoder:
    """Load our converted `.safetensors` or the seed's `effnet_encoder.pdparams` (strict key check).
    Returns the frozen encoder in eval mode."""
    with _paddle_source(path, "effnet") as (src, plan):
        model = EfficientNetEncoder(src.info.config or _sizes(effnet_config_from_shapes, plan, path) or None)
        if src.kind == "pdparams":
            plan = _undo_reversed_se_weights(plan, model, path)
        return finish_loading(model, src, path, dtype, plan=plan)


def _undo_reversed_se_weights(plan, model, path):
    """PaddleMIX's effnet converter reversed every axis of keys containing "fc", which turns the
    squeeze-excitation 1x1 conv weights (out, in, 1, 1) into (1, 1, in, out). Reverse them back."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out, fixed = {}, 0
    for k, op in plan.items():
        shape = tuple(op.shape)
        if ".fc" in k and op.kind == "copy" and len(shape) == 4 and k in want and shape != want[k] \
                and shape[::-1] == want[k]:
            op, fixed = type(op)(op.sources, "T", shape[::-1]), fixed + 1
        out[k] = op
    if fixed:
        logger.info("%s: %d squeeze-excitation weights stored with reversed axes (PaddleMIX converter) "
                    "were transposed back", path, fixed)
    return out


def load_previewer(path, dtype: str = "float32") -> Previewer:
    """Load our converted `.safetensors` or the seed's `previewer.pdparams` (sizes from the metadata
    or the shapes, strict key check). Returns the model in eval mode with gradients off."""
    with _paddle_source(path, "previewer") as (src, plan):
        model = Previewer(src.info.config or _sizes(previewer_config_from_shapes, plan, path))
        return finish_loading(model, src, path, dtype, plan=plan)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def model_name(net) -> str:
    for cls, name in MODEL_NAMES.items():
        if isinstance(net, cls):
            return name
    raise ValueError(f"{type(net).__name__} is not a Stable Cascade network ({sorted(MODEL_NAMES.values())})")


def save_network(net, path, dtype: str | None = None) -> None:
    """Save a Stage C / B / A, EfficientNet encoder or Previewer in our layout with its model name
    and config in the metadata, so the loaders above rebuild it from the file alone."""
    save_safetensors(net.state_dict(), os.fspath(path), dtype=dtype,
                     metadata=weights_metadata(model_name(net), net.config))
