"""The one strict assigner: weights -> a Paddle Layer's parameters and buffers.

Names, shapes and dtype kinds (float / int / bool) are all checked before anything is assigned,
and every missing, unexpected, mis-shaped or mis-typed tensor is listed in one WeightsError that
names the file; then tensors are materialised and assigned one at a time, each cast to its
parameter's own dtype (so a model built under `paddle.LazyGuard` in bf16 is filled straight from
the file, ~1x its memory).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

from ldm.utils import get_logger

from .dtypes import WeightsError, check_storage_dtype, count_nonfinite, paddle_dtype_name, tag_kind
from .keys import Op, identity_plan
from .source import opened, stream_plan

__all__ = ["check_state_dict", "assign_state_dict", "finish_loading"]

logger = get_logger(__name__)


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, tuple[int, ...]],
    where: str = "state dict",
    ignore_missing: Callable[[str], bool] | None = None,
    wrong_dtype=(),
) -> None:
    """Raise WeightsError listing every missing, unexpected, mis-shaped (and, when given,
    mis-typed) key."""
    missing = [k for k in expected if k not in got and not (ignore_missing and ignore_missing(k))]
    unexpected = [k for k in got if k not in expected]
    bad = [f"{k}: file {tuple(got[k])} vs model {tuple(expected[k])}" for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    wrong_dtype = list(wrong_dtype)
    if missing or unexpected or bad or wrong_dtype:
        lines = [f"{where} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad),
                             ("wrong dtype", wrong_dtype)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {x}" for x in items[:50]]
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise WeightsError("\n".join(lines))


def _kind_of(paddle_name: str) -> str:
    if "float" in paddle_name:
        return "float"
    return "bool" if paddle_name == "bool" else "int"


def assign_state_dict(layer, weights, where: str | None = None, plan: Mapping[str, Op] | None = None,
                      ignore_missing: Callable[[str], bool] | None = None) -> None:
    """Strictly copy `weights` into `layer` (see the module docstring).

    weights: a path (file, shards, folder: ldm.weights.WeightSource), a WeightSource, a mapping or
    an iterable of (name, array | paddle.Tensor). plan: {our name: Op} from a key table when the
    source is in another layout (default: every tensor under its own name). ignore_missing(name)
    -> True leaves that parameter as it is (e.g. a table the file legitimately lacks)."""
    import paddle

    with opened(weights) as src:
        where = where or src.description
        plan = identity_plan(src.shapes()) if plan is None else plan
        targets = layer.state_dict()
        expected = {k: tuple(v.shape) for k, v in targets.items()}
        wrong = []
        for k, op in plan.items():
            if k in targets:
                tag, want = src.dtype(op.sources[0]), paddle_dtype_name(targets[k].dtype)
                if tag_kind(tag) != _kind_of(want):
                    wrong.append(f"{k}: file {tag} vs model {want}")
        check_state_dict(expected, {k: op.shape for k, op in plan.items()}, where, ignore_missing, wrong)
        for name, arr in stream_plan(src, plan):
            bad = count_nonfinite(arr)
            if bad:  # loaded anyway (a diverged checkpoint can still be inspected), but said (issue 12 item 7)
                logger.warning("%s: tensor %r holds %d NaN/Inf value(s)", where, name, bad)
            t = targets[name]
            value = paddle.to_tensor(arr)
            if value.dtype != t.dtype:
                value = value.astype(t.dtype)
            t.set_value(value)
            del value, arr
    not_set = [k for k, v in targets.items() if not v._is_initialized()]
    if not_set:  # a LazyGuard model whose ignored tensors were never materialised
        raise WeightsError(f"{where}: parameters left unset: {not_set[:10]}")


def finish_loading(model, weights, where: str | None = None, dtype: str = "float32", plan=None,
                   ignore_missing=None):
    """Strictly assign `weights` to `model`, cast to `dtype`, freeze and switch to eval mode:
    what a frozen encoder / decoder needs for inference."""
    check_storage_dtype(dtype)
    assign_state_dict(model, weights, where=None if where is None else str(where), plan=plan,
                      ignore_missing=ignore_missing)
    if dtype != "float32":
        model.to(dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.stop_gradient = True
    return model
