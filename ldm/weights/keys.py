"""Key maps as data: conversion plans, regex rule tables, and the registry the model side fills.

A conversion is a *plan*: {target name: Op(sources, kind, shape, index)}, built from a source's
header (names and shapes only); `apply_op` materialises one target tensor at a time, so a
converter or a loader holds about one tensor in memory.

A model's key table (`KeyTable`) says how its tensors are named and laid out in each source
layout ("paddle" is always ours). The tables live with the networks (ldm/cascade/keys.py,
ldm/clip.py) and are registered here under the model name that the weight-file metadata carries
(see ldm.weights.metadata); this package knows no network.

Rule tables are lists of (regex on the source name, replacement or None to keep the name,
transform or None); the first matching rule wins; "transpose" is the only transform (torch
Linear [out, in] -> Paddle [in, out]), applied only where a rule lists it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from .dtypes import WeightsError

__all__ = [
    "Op",
    "apply_op",
    "identity_plan",
    "DROP_PATTERNS",
    "BN_RULES",
    "map_key",
    "rules_plan",
    "KeyTable",
    "rule_table",
    "register_key_table",
    "key_table",
    "registered_models",
]


@dataclass(frozen=True)
class Op:
    """How to make one target tensor: kind in
    copy      - sources[0] as it is
    T         - sources[0] with its axes reversed (a 2-D transpose)
    slice     - sources[0][index * n:(index + 1) * n] along axis 0, n = rows / 3
    slice_T   - the same, then transposed
    cat       - concatenate sources along axis 0
    T_cat     - transpose each source, then concatenate along axis 0
    """

    sources: tuple
    kind: str
    shape: tuple
    index: int = 0


def apply_op(op: Op, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """Materialise one target tensor; `get(name)` reads one source tensor."""
    if op.kind in ("cat", "T_cat"):
        parts = [get(s) for s in op.sources]
        if op.kind == "T_cat":
            parts = [p.T for p in parts]
        out = np.concatenate(parts, axis=0)
    elif op.kind in ("copy", "T", "slice", "slice_T"):
        src = get(op.sources[0])
        if op.kind in ("slice", "slice_T"):
            n = src.shape[0] // 3
            src = src[op.index * n:(op.index + 1) * n]
        out = src.T if op.kind in ("T", "slice_T") else src
    else:
        raise ValueError(f"unknown op kind {op.kind!r}")
    if not out.flags.c_contiguous:
        out = out.copy(order="C")  # (np.ascontiguousarray would turn a 0-d tensor into 1-d)
    if tuple(out.shape) != tuple(op.shape):
        raise WeightsError(f"{op.sources[0]}: produced shape {tuple(out.shape)}, the plan says {tuple(op.shape)}")
    return out


def identity_plan(shapes: Mapping[str, tuple]) -> dict[str, Op]:
    """Every tensor under its own name, as it is."""
    return {k: Op((k,), "copy", tuple(int(s) for s in v)) for k, v in shapes.items()}


# ---------------------------------------------------------------------------------------------
# Regex rule tables
# ---------------------------------------------------------------------------------------------
# torch-side tensors that are not weights: BatchNorm step counters, CLIP's position_ids buffers
DROP_PATTERNS = (r"\.num_batches_tracked$", r"(^|\.)embeddings\.position_ids$")
# torch BatchNorm running statistics -> Paddle names
BN_RULES = [
    (r"\.running_mean$", "._mean", None),
    (r"\.running_var$", "._variance", None),
]


def map_key(name: str, rules) -> tuple[str | None, str | None]:
    """Source name -> (target name or None when the tensor is dropped, transform)."""
    if any(re.search(p, name) for p in DROP_PATTERNS):
        return None, None
    for pattern, repl, transform in rules:
        if re.search(pattern, name):
            return (re.sub(pattern, repl, name) if repl is not None else name), transform
    return name, None


def rules_plan(shapes: Mapping[str, tuple], rules, where: str = "weights") -> dict[str, Op]:
    """Plan for a rule table: renames, drops and the listed transposes (2-D only)."""
    plan: dict[str, Op] = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        tgt, transform = map_key(name, rules)
        if tgt is None:
            continue
        if tgt in plan:
            raise WeightsError(f"{where}: {name!r} and {plan[tgt].sources[0]!r} both map to {tgt!r}")
        if transform == "transpose":
            if len(shape) != 2:
                raise WeightsError(f"{where}: {name}: expected a 2-D Linear weight to transpose, got shape {shape}")
            plan[tgt] = Op((name,), "T", shape[::-1])
        elif transform is None:
            plan[tgt] = Op((name,), "copy", shape)
        else:
            raise ValueError(f"unknown transform {transform!r}")
    return plan


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
PlanFn = Callable[[Mapping[str, tuple], str], "dict[str, Op]"]


@dataclass(frozen=True)
class KeyTable:
    """How the tensors of one model are named in each layout it can be read from.

    to_paddle(source shapes, layout) -> plan to our names; from_paddle(our shapes, layout) ->
    plan for exporting (None when not supported); detect_layout(names) -> layout or WeightsError.
    """

    model: str
    layouts: tuple
    to_paddle: PlanFn
    from_paddle: Optional[PlanFn] = None
    detect_layout: Optional[Callable[[Iterable[str]], str]] = None

    def _check(self, layout):
        if layout not in self.layouts:
            raise WeightsError(f"{self.model}: unknown layout {layout!r}; choose one of {self.layouts}")

    def plan(self, shapes: Mapping[str, tuple], layout: str) -> dict[str, Op]:
        self._check(layout)
        return self.to_paddle(shapes, layout)

    def export_plan(self, shapes: Mapping[str, tuple], layout: str) -> dict[str, Op]:
        self._check(layout)
        if self.from_paddle is None:
            raise WeightsError(f"{self.model}: export to other layouts is not supported")
        return self.from_paddle(shapes, layout)


def rule_table(model: str, rules_by_layout: Mapping[str, list], where: str | None = None) -> KeyTable:
    """A KeyTable from one rule list per layout."""
    tables = dict(rules_by_layout)
    return KeyTable(model, tuple(tables), lambda shapes, layout: rules_plan(shapes, tables[layout], where or model))


_REGISTRY: dict[str, KeyTable] = {}


def register_key_table(table: KeyTable) -> KeyTable:
    """Register (or replace) the key table of `table.model`; returns it."""
    _REGISTRY[table.model] = table
    return table


def key_table(model: str) -> KeyTable:
    try:
        return _REGISTRY[model]
    except KeyError:
        raise WeightsError(f"no key table registered for model {model!r} (registered: {sorted(_REGISTRY)}); "
                           "the module that defines the network registers it when imported") from None


def registered_models() -> list[str]:
    return sorted(_REGISTRY)
