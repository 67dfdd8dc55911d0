"""Weight file IO: streaming safetensors (bf16 included), a safe `.pdparams` reader, key checks.

Safetensors is the default format everywhere. The reader parses the header itself and memory-maps
the file, so tensors are read one at a time (peak memory ~ one tensor) and bf16 works without
torch. `.pdparams` files (pickles written by `paddle.save`) are read through a restricted
unpickler that only admits numpy arrays and plain containers.
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Callable

import numpy as np

from ldm.utils import temp_file_next_to

__all__ = [
    "WeightsError",
    "SafetensorsReader",
    "SafetensorsWriter",
    "read_safetensors",
    "save_safetensors",
    "load_pdparams",
    "load_state_dict",
    "iter_state_dict",
    "check_state_dict",
    "bf16_to_fp32",
    "fp32_to_bf16",
    "to_storage",
    "assign_state_dict",
]


class WeightsError(ValueError):
    """A weight file is unreadable, unsafe, or does not match the model."""


# ---------------------------------------------------------------------------------------------
# bf16 helpers (numpy has no bfloat16: we carry bf16 as uint16 bit patterns)
# ---------------------------------------------------------------------------------------------
def bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bit patterns, round-to-nearest-even (NaN stays NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v).str: k for k, v in _ST_DTYPES.items() if k != "BF16"}

STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def to_storage(x: np.ndarray, dtype: str | None) -> tuple[np.ndarray, str]:
    """Cast a float array to a storage dtype; returns (array, safetensors dtype tag).

    `dtype=None` keeps the array as it is. bf16 is returned as uint16 bit patterns.
    Integer arrays are never cast.
    """
    if dtype is None or not np.issubdtype(x.dtype, np.floating):
        return x, _NP_TO_ST[np.dtype(x.dtype).str]
    if dtype == "bfloat16":
        return fp32_to_bf16(x.astype(np.float32, copy=False)), "BF16"
    if dtype not in STORAGE_DTYPES:
        raise WeightsError(f"unsupported storage dtype {dtype!r}; choose one of {STORAGE_DTYPES}")
    arr = x.astype(dtype, copy=False)
    return arr, _NP_TO_ST[arr.dtype.str]


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
class SafetensorsReader:
    """Memory-mapped safetensors file; `get(name)` materialises one tensor at a time.

    bf16 tensors are returned as float32 (or as raw uint16 bits with `raw_bf16=True`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise WeightsError(f"cannot open weights file {self.path}: {e}") from e
        try:
            head = self._f.read(8)
            if len(head) != 8:
                raise WeightsError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(self._f.fileno()).st_size
            if n > size - 8 or n > 100 * 2**20:
                raise WeightsError(f"{self.path}: not a safetensors file (bad header length {n})")
            try:
                header = json.loads(self._f.read(n))
            except ValueError as e:
                raise WeightsError(f"{self.path}: corrupt safetensors header: {e}") from e
            self.metadata = header.pop("__metadata__", None) or {}
            self._entries = header
            self._base = 8 + n
            for name, e in header.items():
                begin, end = e["data_offsets"]
                if e["dtype"] not in _ST_DTYPES:
                    raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
                if self._base + end > size:
                    raise WeightsError(f"{self.path}: file is truncated (tensor {name!r} ends past EOF)")
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except Exception:
            self._f.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def get(self, name: str, raw_bf16: bool = False) -> np.ndarray:
        e = self._entries[name]
        begin, end = e["data_offsets"]
        dt = np.dtype(_ST_DTYPES[e["dtype"]]).newbyteorder("<")
        count = (end - begin) // dt.itemsize
        arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=self._base + begin) if count else np.empty(0, dt)
        arr = arr.reshape(e["shape"])
        if e["dtype"] == "BF16" and not raw_bf16:
            return bf16_to_fp32(arr)
        return np.array(arr)  # copy out of the map so the file can be closed

    def items(self, raw_bf16: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._entries:
            yield k, self.get(k, raw_bf16=raw_bf16)

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self._mm.close()
            self._mm = None
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_safetensors(path) -> dict[str, np.ndarray]:
    with SafetensorsReader(path) as r:
        return dict(r.items())


class SafetensorsWriter:
    """Streaming safetensors writer: the header is fixed from the (name, shape, dtype) plan,
    then tensors are written one by one in plan order. The file appears atomically on close."""

    def __init__(self, path, plan: Iterable[tuple[str, tuple[int, ...], str]], metadata: Mapping[str, str] | None = None):
        self.path = os.fspath(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order = []
        for name, shape, st_dtype in plan:
            if name in header:
                raise WeightsError(f"duplicate tensor name {name!r}")
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[st_dtype]).itemsize
            header[name] = {"dtype": st_dtype, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
            self._order.append((name, tuple(int(s) for s in shape), st_dtype))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        fd, self._tmp = temp_file_next_to(self.path)
        self._f = os.fdopen(fd, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._i = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        if self._i >= len(self._order):
            raise WeightsError(f"unexpected extra tensor {name!r}")
        want_name, shape, st_dtype = self._order[self._i]
        if name != want_name or tuple(arr.shape) != shape:
            raise WeightsError(f"tensor {name!r} {tuple(arr.shape)} written out of plan (expected {want_name!r} {shape})")
        want = np.dtype(_ST_DTYPES[st_dtype]).newbyteorder("<")
        if arr.dtype != want:
            raise WeightsError(f"tensor {name!r} has dtype {arr.dtype}, plan says {st_dtype}")
        self._f.write(np.ascontiguousarray(arr).tobytes())
        self._i += 1

    def close(self) -> None:
        if self._f.closed:
            return
        if self._i != len(self._order):
            self.abort()
            raise WeightsError(f"{self.path}: only {self._i} of {len(self._order)} tensors were written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def save_safetensors(state: Mapping[str, object], path, dtype: str | None = None, metadata=None) -> None:
    """Atomically save a {name: array or paddle.Tensor} mapping as safetensors.

    `dtype` ("float32"/"float16"/"bfloat16" or None to keep) applies to floating tensors.
    """
    arrays = {}
    for k, v in state.items():
        arrays[k] = to_storage(_to_numpy(v), dtype)
    plan = [(k, a.shape, tag) for k, (a, tag) in arrays.items()]
    with SafetensorsWriter(path, plan, metadata) as w:
        for k, (a, _) in arrays.items():
            w.write(k, a)


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "numpy"):  # paddle.Tensor
        import paddle

        arr = v.numpy()
        return bf16_to_fp32(arr) if v.dtype == paddle.bfloat16 else arr  # paddle gives bf16 as uint16 bits
    return np.asarray(v)


# ---------------------------------------------------------------------------------------------
# .pdparams through a restricted unpickler
# ---------------------------------------------------------------------------------------------
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
    path = os.fspath(path)
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


# ---------------------------------------------------------------------------------------------
# Generic entry points
# ---------------------------------------------------------------------------------------------
def iter_state_dict(path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, float32-or-native array) from a .safetensors or .pdparams file, streaming
    where the format allows it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"weights file not found: {path}")
    if path.endswith(".pdparams") or path.endswith(".pdparams.bin"):
        yield from load_pdparams(path).items()
        return
    with SafetensorsReader(path) as r:
        yield from r.items()


def load_state_dict(path) -> dict[str, np.ndarray]:
    return dict(iter_state_dict(path))


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, tuple[int, ...]],
    where: str = "state dict",
    ignore_missing: Callable[[str], bool] | None = None,
) -> None:
    """Raise WeightsError listing every missing, unexpected and mis-shaped key."""
    missing = [k for k in expected if k not in got and not (ignore_missing and ignore_missing(k))]
    unexpected = [k for k in got if k not in expected]
    bad = [f"{k}: file {tuple(got[k])} vs model {tuple(expected[k])}" for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    if missing or unexpected or bad:
        lines = [f"{where} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {x}" for x in items[:50]]
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise WeightsError("\n".join(lines))


def assign_state_dict(layer, items: Iterable[tuple[str, np.ndarray]], where: str = "weights") -> None:
    """Copy (name, array) pairs into a paddle Layer's parameters and buffers, casting each to the
    parameter's own dtype one tensor at a time. Every missing, unexpected or mis-shaped key is
    collected and reported in one WeightsError; nothing is assigned unless all keys match."""
    import paddle

    targets = layer.state_dict()
    expected = {k: tuple(v.shape) for k, v in targets.items()}
    items = list(items) if not isinstance(items, list) else items
    check_state_dict(expected, {k: tuple(v.shape) for k, v in items}, where)
    for k, arr in items:
        t = targets[k]
        if t.dtype == paddle.bfloat16:
            src = paddle.to_tensor(np.asarray(arr, dtype=np.float32)).astype(paddle.bfloat16)
        else:
            src = paddle.to_tensor(np.asarray(arr)).astype(t.dtype)
        t.set_value(src)
