"""The one dtype table: safetensors tags, numpy dtypes, Paddle dtypes and the storage dtypes users pass.

Tags are the safetensors ones (huggingface/safetensors `Dtype`). numpy has no bfloat16, so BF16
tensors are carried as uint16 bit patterns (`bf16_to_fp32` / `fp32_to_bf16`); Paddle's `numpy()` of
a bfloat16 tensor gives the same uint16 bits.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "WeightsError",
    "ST_DTYPES",
    "FLOAT_TAGS",
    "STORAGE_DTYPES",
    "STORAGE_TAGS",
    "check_storage_dtype",
    "tag_kind",
    "numpy_tag",
    "paddle_dtype_name",
    "paddle_tag",
    "bf16_to_fp32",
    "fp32_to_bf16",
    "stored",
]


class WeightsError(ValueError):
    """A weight file is unreadable, unsafe, or does not match the model."""


# safetensors tag -> numpy dtype (BF16 as its uint16 bit pattern)
ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
_NP_TO_TAG = {np.dtype(v).str: k for k, v in ST_DTYPES.items() if k != "BF16"}

# what --dtype flags and `dtype=` arguments accept: the floating storage / compute dtypes
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
STORAGE_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_PADDLE_TAGS = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def check_storage_dtype(dtype: str, what: str = "dtype") -> str:
    """`dtype` if it is one of STORAGE_DTYPES, else a ValueError naming the choices."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"{what} must be one of {STORAGE_DTYPES}, got {dtype!r}")
    return dtype


def tag_kind(tag: str) -> str:
    """"float", "int" or "bool" for a safetensors tag."""
    if tag in FLOAT_TAGS:
        return "float"
    return "bool" if tag == "BOOL" else "int"


def numpy_tag(dtype) -> str:
    """The safetensors tag of a numpy dtype (uint16 is U16-less safetensors' BF16 carrier)."""
    dt = np.dtype(dtype)
    if dt == np.uint16:
        return "BF16"
    try:
        return _NP_TO_TAG[dt.newbyteorder("<").str if dt.byteorder == ">" else dt.str]
    except KeyError:
        raise WeightsError(f"numpy dtype {dt} has no safetensors tag") from None


def paddle_dtype_name(dtype) -> str:
    """'float32', 'bfloat16', 'int64', ... for a paddle dtype (both its VarType and DataType forms)."""
    return str(dtype).split(".")[-1].lower().replace("fp32", "float32").replace("fp16", "float16").replace(
        "bf16", "bfloat16")


def paddle_tag(dtype) -> str:
    name = paddle_dtype_name(dtype)
    try:
        return _PADDLE_TAGS[name]
    except KeyError:
        raise WeightsError(f"paddle dtype {name} has no safetensors tag") from None


def bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


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


def stored(arr: np.ndarray, tag: str) -> np.ndarray:
    """`arr` (floats as float32 or wider when `tag` is BF16) in the numpy carrier of `tag`."""
    if tag == "BF16":
        return fp32_to_bf16(arr.astype(np.float32, copy=False))
    return arr.astype(ST_DTYPES[tag], copy=False)


def count_nonfinite(arr) -> int:
    """Number of NaN / Inf values of a floating array (0 for other dtypes): conversion and merging
    refuse them, the assigner warns (issue 12 item 7)."""
    arr = np.asarray(arr)
    if arr.dtype.kind != "f" or arr.size == 0 or np.isfinite(arr).all():
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))
