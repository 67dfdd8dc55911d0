"""The one reader: `WeightSource` over weight files of every kind the project reads.

Accepted (alone or as a list of shards): a `.safetensors` file; a `*.index.json` (transformers /
diffusers sharding: the shards named in its `weight_map`); a folder (its config.json is kept as
`.config`, then its `*.safetensors.index.json`, its one `*.safetensors`, its `*.pdparams.index.json`
or its one `*.pdparams`, in that order); a `.pdparams` (through the restricted unpickler). Names,
shapes and dtype tags come from the headers without reading data; `get(name)` reads one tensor
(bf16 widened to float32), so streaming loaders and converters hold about one tensor.

`StateSource` gives the same interface over an in-memory mapping (numpy arrays or Paddle tensors),
so the assigner and the writer take either.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from .dtypes import WeightsError, bf16_to_fp32, numpy_tag, paddle_tag
from .files import SafetensorsReader, check_regular_file
from .keys import Op, apply_op
from .metadata import WeightsInfo, read_info
from .pdparams import load_pdparams

__all__ = ["WeightSource", "StateSource", "opened", "stream_plan", "load_state_dict", "iter_state_dict",
           "PDPARAMS_SUFFIXES"]

PDPARAMS_SUFFIXES = (".pdparams", ".pdparams.bin")


def read_json(path: str, what: str = "json file") -> dict:
    """A JSON object file (config.json, vocab.json, *.index.json); a missing or special file, an
    empty one, invalid JSON or a non-object is one WeightsError naming the file (issue 12 item 9)."""
    try:
        with open(check_regular_file(path, what), encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:
        raise WeightsError(f"{what} {path}: not valid JSON ({'empty file' if _is_empty(path) else e})") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{what} {path}: not a JSON object (a JSON {type(data).__name__})")
    return data


def _is_empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False



def _index_shards(index: str) -> list[str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index}: no weight_map")
    folder = os.path.dirname(index)
    files = [os.path.join(folder, s) for s in sorted(set(map(str, weight_map.values())))]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise WeightsError(f"{index} names shards that are missing: {missing}")
    return files


class _Source:
    """What the assigner and the writer read: names, shapes and dtype tags up front, then one
    tensor at a time (`get`), each released (`release`) once used."""

    description = "weights"
    kind = "memory"
    config = None  # config.json of a model folder

    def __init__(self):
        self._shapes: dict[str, tuple] = {}
        self._tags: dict[str, str] = {}
        self.metadata: dict = {}
        self.info = WeightsInfo()

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name) -> bool:
        return name in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    def shapes(self) -> dict[str, tuple]:
        return dict(self._shapes)

    def shape(self, name: str) -> tuple:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        """The safetensors tag of a tensor ("F32", "BF16", "I64", ...)."""
        return self._tags[name]

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def release(self, name: str) -> None:
        pass

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._shapes:
            yield k, self.get(k)

    def state_dict(self) -> dict[str, np.ndarray]:
        return dict(self.items())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WeightSource(_Source):
    """Read-only view over the tensors of one checkpoint (possibly sharded); see the module
    docstring. Use as a context manager (it keeps files memory-mapped)."""

    def __init__(self, paths):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise WeightsError("no weight paths given")
        super().__init__()
        self.description = ", ".join(paths)
        self.files: list[str] = []
        for p in paths:
            self.files += self._expand(p)
        self._readers: list[SafetensorsReader] = []
        self._where: dict[str, object] = {}  # name -> (reader or the dict holding the array, file)
        self.kind = "pdparams" if all(f.endswith(PDPARAMS_SUFFIXES) for f in self.files) else "safetensors"
        layouts = {}
        try:
            for f in self.files:
                if f.endswith(PDPARAMS_SUFFIXES):
                    arrays = load_pdparams(f)
                    layouts[f] = "paddle"
                    for k, v in arrays.items():
                        self._add(k, f, arrays, tuple(v.shape), numpy_tag(v.dtype))
                elif f.endswith(".safetensors"):
                    r = SafetensorsReader(f)
                    self._readers.append(r)
                    if r.metadata and not self.metadata:
                        self.metadata = dict(r.metadata)
                    layouts[f] = read_info(r.metadata, f).layout
                    for k in r.keys():
                        self._add(k, f, r, r.shape(k), r.dtype(k))
                else:
                    raise WeightsError(f"{f}: not a .safetensors or .pdparams file (refusing to unpickle it)")
            known = {v for v in layouts.values() if v is not None}
            if len(known) > 1:
                raise WeightsError(f"{self.description}: files disagree on the layout ({layouts})")
            info = read_info(self.metadata, self.files[0])
            self.info = WeightsInfo(layout=known.pop() if known else None, model=info.model, config=info.config,
                                    format=info.format)
        except Exception:
            self.close()
            raise

    def _expand(self, p: str) -> list[str]:
        if os.path.isdir(p):
            return self._folder_files(p)
        check_regular_file(p)
        if p.endswith(".index.json"):
            return _index_shards(p)
        return [p]

    def _folder_files(self, folder: str) -> list[str]:
        cfg = os.path.join(folder, "config.json")
        if os.path.exists(cfg):
            self.config = read_json(cfg)
        for pattern in ("*.safetensors.index.json", "*.safetensors", "*.pdparams.index.json", "*.pdparams"):
            found = sorted(glob.glob(os.path.join(folder, pattern)))
            if not found:
                continue
            if len(found) > 1:
                names = [os.path.basename(f) for f in found]
                raise WeightsError(f"{folder}: several {pattern} files {names}; pass the weight files explicitly")
            return _index_shards(found[0]) if found[0].endswith(".index.json") else found
        raise WeightsError(f"{folder}: no weights (expected a .safetensors file, an index json or a .pdparams)")

    def _add(self, name, f, holder, shape, tag):
        if name in self._where:
            raise WeightsError(f"tensor {name!r} appears in two shards ({self._where[name][1]}, {f})")
        self._where[name] = (holder, f)
        self._shapes[name] = tuple(int(s) for s in shape)
        self._tags[name] = tag

    def get(self, name: str) -> np.ndarray:
        """One tensor: float tensors in their stored float type, bf16 widened to float32."""
        holder, _ = self._where[name]
        if isinstance(holder, SafetensorsReader):
            arr = holder.get(name)  # a copy out of the memory map
            holder.drop_pages()
            return arr
        arr = holder[name]
        return bf16_to_fp32(arr) if arr.dtype == np.uint16 else arr  # paddle.save keeps bf16 as uint16 bits

    def release(self, name: str) -> None:
        """Forget an in-memory (.pdparams) tensor once it has been used."""
        holder, _ = self._where.get(name, (None, None))
        if isinstance(holder, dict):
            holder.pop(name, None)

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers = []


class StateSource(_Source):
    """The WeightSource interface over an in-memory {name: numpy array | paddle.Tensor} mapping
    (or an iterable of pairs). bf16 Paddle tensors are read as float32."""

    def __init__(self, state, description: str = "state dict"):
        super().__init__()
        self._state = dict(state.items() if isinstance(state, Mapping) else state)
        self.description = description
        for k, v in self._state.items():
            tensor = _is_paddle_tensor(v)
            self._shapes[k] = tuple(int(s) for s in (v.shape if tensor else np.shape(v)))
            self._tags[k] = paddle_tag(v.dtype) if tensor else numpy_tag(np.asarray(v).dtype)

    def get(self, name: str) -> np.ndarray:
        v = self._state[name]
        if _is_paddle_tensor(v):
            arr = v.numpy()
            return bf16_to_fp32(arr) if paddle_tag(v.dtype) == "BF16" else arr
        arr = np.asarray(v)
        return bf16_to_fp32(arr) if arr.dtype == np.uint16 else arr


def _is_paddle_tensor(v) -> bool:
    return hasattr(v, "numpy") and hasattr(v, "place") and not isinstance(v, np.ndarray)


@contextlib.contextmanager
def opened(weights, description: str | None = None):
    """A source for `weights` (a path or list of paths, a WeightSource / StateSource, a mapping or
    an iterable of (name, array) pairs); closes it afterwards only if it opened it."""
    if isinstance(weights, _Source):
        yield weights
    elif isinstance(weights, (str, os.PathLike)) or (
            isinstance(weights, (list, tuple)) and weights and all(isinstance(w, (str, os.PathLike)) for w in weights)):
        with WeightSource(weights) as src:
            yield src
    else:
        yield StateSource(weights, description or "state dict")


def stream_plan(src, plan: Mapping[str, Op], order: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(target, array) for each planned target in `order`, one at a time; a source tensor is
    released once no later target needs it."""
    order = list(plan) if order is None else list(order)
    uses: dict[str, int] = {}
    for k in order:
        for s in plan[k].sources:
            uses[s] = uses.get(s, 0) + 1
    for k in order:
        op = plan[k]
        yield k, apply_op(op, src.get)
        for s in op.sources:
            uses[s] -= 1
            if not uses[s]:
                src.release(s)


def iter_state_dict(path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every tensor of a weight file or folder (see WeightSource), streaming."""
    with WeightSource(path) as src:
        yield from src.items()


def load_state_dict(path) -> dict[str, np.ndarray]:
    with WeightSource(path) as src:
        return src.state_dict()
