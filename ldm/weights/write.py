"""The one writer: any source (arrays, Paddle tensors, another file through a key-table plan) ->
one safetensors file, streamed tensor by tensor and written atomically.

Files of this project carry the metadata schema of ldm.weights.metadata (`weights_metadata`).
"""
from __future__ import annotations

from collections.abc import Mapping

from .assign import check_state_dict
from .dtypes import FLOAT_TAGS, STORAGE_TAGS, WeightsError, check_storage_dtype, count_nonfinite, stored
from .files import SafetensorsWriter
from .keys import Op, identity_plan
from .source import opened, stream_plan

__all__ = ["save_safetensors"]


def save_safetensors(state, path, dtype: str | None = None, metadata: Mapping[str, str] | None = None, *,
                     plan: Mapping[str, Op] | None = None, expected: Mapping[str, tuple] | None = None,
                     where: str | None = None, finite: bool = False) -> None:
    """Atomically write `state` as safetensors, one tensor in memory at a time.

    state: a mapping or iterable of (name, numpy array | paddle.Tensor), a WeightSource or a path.
    dtype: "float32" / "float16" / "bfloat16" for every floating tensor, None to keep each one's
    own float type (integer and bool tensors are never cast).
    plan: {target name: Op} (a key table's plan, for converting or exporting; default: every
    tensor as it is). expected: {name: shape} the targets must equal (every mismatch listed in one
    WeightsError before anything is written); it also sets the order in the file (else plan order).
    finite: refuse a NaN / Inf value in any float tensor with a WeightsError naming it, leaving no
    file (conversion and merging set it: issue 12 item 7; training checkpoints do not).
    """
    if dtype is not None:
        check_storage_dtype(dtype, "storage dtype")
    with opened(state) as src:
        plan = identity_plan(src.shapes()) if plan is None else plan
        if expected is not None:
            check_state_dict(expected, {k: op.shape for k, op in plan.items()}, where or src.description)
        order = list(expected) if expected is not None else list(plan)
        tags = {}
        for k in order:
            tag = src.dtype(plan[k].sources[0])
            tags[k] = STORAGE_TAGS[dtype] if dtype is not None and tag in FLOAT_TAGS else tag
        with SafetensorsWriter(path, [(k, plan[k].shape, tags[k]) for k in order], metadata) as w:
            for name, arr in stream_plan(src, plan, order):
                bad = count_nonfinite(arr) if finite else 0
                if bad:
                    source = plan[name].sources[0]
                    named = repr(name) if source == name else f"{name!r} (from {source!r})"
                    raise WeightsError(f"{where or src.description}: tensor {named} holds {bad} NaN/Inf value(s); "
                                       f"not writing {path}")
                w.write(name, stored(arr, tags[name]))
