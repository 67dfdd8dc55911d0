"""The safetensors file format: a validating memory-mapped reader and a streaming atomic writer.

Format (huggingface/safetensors README): 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
data; offsets are relative to the end of the header. The reader checks every header entry before
any tensor is read (types, dtype tag, offsets = shape x itemsize, no two tensors sharing bytes, no
range past the end of the file), so a defective file is one WeightsError naming the file and the
tensor. bf16 works without torch (see ldm.weights.dtypes).
"""
from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from ldm.utils import temp_file_next_to

from .dtypes import ST_DTYPES, WeightsError, bf16_to_fp32

__all__ = ["SafetensorsReader", "SafetensorsWriter", "MAX_HEADER_BYTES", "check_regular_file"]

MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit


def check_regular_file(path: str, what: str = "weights file") -> str:
    """`path` if it is a regular file; a FIFO, device or socket is refused before it is opened
    (reading one would block or never end)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise WeightsError(f"{what} not found: {path}") from None
    except OSError as e:
        raise WeightsError(f"cannot open {what} {path}: {e}") from e
    if not stat.S_ISREG(mode):
        raise WeightsError(f"{path}: not a regular file (a {what} must be a file or a folder)")
    return path


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(raw: bytes, path: str, data_size: int) -> tuple[dict, dict]:
    """(entries, metadata) of a header, every entry validated; raises WeightsError."""
    try:
        header = json.loads(raw)
    except RecursionError:
        raise WeightsError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise WeightsError(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WeightsError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries = {}
    for name, e in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise WeightsError(f"{where}: header entry is a JSON {type(e).__name__}, not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in e:
                raise WeightsError(f"{where}: header entry has no {key!r}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise WeightsError(f"{where} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise WeightsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise WeightsError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[dtype]).itemsize
        if end - begin != need:
            raise WeightsError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} x "
                               f"{dtype} needs {need}")
        if end > data_size:
            raise WeightsError(f"{path}: file is truncated (tensor {name!r} ends past EOF)")
        entries[name] = {"dtype": dtype, "shape": tuple(shape), "data_offsets": (begin, end)}
    spans = sorted((e["data_offsets"], n) for n, e in entries.items() if e["data_offsets"][1] > e["data_offsets"][0])
    for ((_, end_a), a), ((begin_b, _), b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise WeightsError(f"{path}: tensors {a!r} and {b!r} share bytes (aliased data_offsets)")
    return entries, meta


class SafetensorsReader:
    """Memory-mapped safetensors file; `get(name)` materialises one tensor at a time.

    bf16 tensors are returned as float32 (or as raw uint16 bits with `raw_bf16=True`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm = None
        check_regular_file(self.path)
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
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise WeightsError(f"{self.path}: not a safetensors file (bad header length {n})")
            self._entries, self.metadata = _parse_header(self._f.read(n), self.path, size - 8 - n)
            self._base = 8 + n
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
        return self._entries[name]["shape"]

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def get(self, name: str, raw_bf16: bool = False) -> np.ndarray:
        e = self._entries[name]
        begin, end = e["data_offsets"]
        dt = np.dtype(ST_DTYPES[e["dtype"]]).newbyteorder("<")
        if end > begin:
            view = np.frombuffer(self._mm, dtype=dt, count=(end - begin) // dt.itemsize, offset=self._base + begin)
            arr = view.reshape(e["shape"]).copy()  # a copy, so the map can be closed
            del view
        else:
            arr = np.empty(e["shape"], dt)
        if e["dtype"] == "BF16" and not raw_bf16:
            return bf16_to_fp32(arr)
        return arr

    def items(self, raw_bf16: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._entries:
            yield k, self.get(k, raw_bf16=raw_bf16)

    def drop_pages(self) -> None:
        """Unmap the file pages reads touched, so a pass over a multi-GB file does not keep the
        whole file resident (mapped pages count towards RSS; they stay in the page cache)."""
        if self._mm is not None and hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsWriter:
    """Streaming safetensors writer: the header is fixed from the (name, shape, tag) plan, then
    tensors are written one by one in plan order. The file appears atomically on close (a
    temporary file next to it, fsync, rename); an exception inside `with` leaves nothing."""

    def __init__(self, path, plan: Iterable[tuple[str, tuple[int, ...], str]], metadata: Mapping[str, str] | None = None):
        self.path = os.fspath(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order = []
        for name, shape, tag in plan:
            if name in header:
                raise WeightsError(f"duplicate tensor name {name!r}")
            if tag not in ST_DTYPES:
                raise WeightsError(f"tensor {name!r}: unsupported dtype tag {tag!r}")
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[tag]).itemsize
            header[name] = {"dtype": tag, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
            self._order.append((name, tuple(int(s) for s in shape), tag))
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
        want_name, shape, tag = self._order[self._i]
        if name != want_name or tuple(arr.shape) != shape:
            raise WeightsError(f"tensor {name!r} {tuple(arr.shape)} written out of plan (expected {want_name!r} {shape})")
        want = np.dtype(ST_DTYPES[tag]).newbyteorder("<")
        if arr.dtype != want:
            raise WeightsError(f"tensor {name!r} has dtype {arr.dtype}, plan says {tag}")
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
