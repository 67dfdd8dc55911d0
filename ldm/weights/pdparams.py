"""`.pdparams` files (pickles written by `paddle.save`) read through a restricted unpickler.

Only numpy arrays and plain containers are admitted (plus, for Trainer checkpoints, Paddle's
random-generator state objects when asked for); any other global, which is how a pickle runs code,
is refused with a WeightsError naming it. `paddle.save` keeps bfloat16 tensors as uint16 bit
patterns; the reader above this (ldm.weights.source) decodes them.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from .dtypes import WeightsError
from .files import check_regular_file

__all__ = ["TRAINER_STATE_GLOBALS", "load_pickle_restricted", "load_pdparams"]

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("_codecs", "encode"),  # protocol-2 pickles encode bytes this way
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, path, extra_allowed=()):
        super().__init__(f)
        self._path = path
        self._extra = set(extra_allowed)

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS or (module, name) in self._extra:
            return super().find_class(module, name)
        raise WeightsError(
            f"{self._path}: refusing to unpickle {module}.{name}: only numpy arrays and plain "
            "containers are allowed in a .pdparams file (convert it to safetensors, or load it "
            "with paddle.load yourself if you trust its origin)"
        )


# Trainer checkpoints (optimizer / scheduler / RNG state written by paddle.save) may also hold
# Paddle's random-generator state objects.
TRAINER_STATE_GLOBALS = (("paddle.base.libpaddle", "GeneratorState"),)


def load_pickle_restricted(path, extra_allowed=()):
    """Unpickle a `paddle.save` file that may hold any plain containers, numpy arrays and the
    classes in `extra_allowed`; anything else (code) is refused with a WeightsError."""
    path = check_regular_file(os.fspath(path))
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path, extra_allowed).load()
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"{path}: not a readable paddle.save (.pdparams) file: {e}") from e


def load_pdparams(path) -> dict[str, np.ndarray]:
    """Read a `paddle.save` state dict without executing arbitrary pickle code."""
    path = os.fspath(path)
    obj = load_pickle_restricted(path)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    obj.pop("StructuredToParameterName@@", None)
    out = {}
    for k, v in obj.items():
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], np.ndarray):
            v = v[1]  # some paddle versions store (name, array)
        if not isinstance(v, np.ndarray):
            raise WeightsError(f"{path}: entry {k!r} is a {type(v).__name__}, not an array")
        out[k] = v
    return out
