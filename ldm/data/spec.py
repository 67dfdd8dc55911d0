"""The data interface: one description of a data set, one registry of kinds, one collator.

Both trainers build their data the same way::

    spec = DatasetSpec("folder", "./data/my_folder", resolution=768, normalize="zero_one", center_crop=True,
                       seed=args.seed, options={"skip_missing_captions": True})
    dataset = build_dataset(spec)            # rank / world_size default to ldm.utils.dist_info()
    loader = paddle.io.DataLoader(dataset, batch_size=4, collate_fn=collate)

Sample schema (every kind): ``{"pixel_values": uint8 ndarray [H, W, 3], "caption": str}``: the
cropped (and flipped) RGB pixels as `ldm.data.transforms.ImageTransform` returns them, not yet
normalised. DataLoader workers thus hand over uint8 batches, a quarter of the bytes of float32;
the consumer normalises a collated batch where it lives, with the one function
`ldm.data.transforms.normalize_pixels` (uint8 [B, H, W, 3] -> float32 [B, 3, H, W], x / 127.5 - 1
or x / 255); the training tasks do it first thing in their step (`TrainingTask.pixels`, on the
training device). `DatasetSpec.normalize` names that range (`NORMALIZE_MODES`), what the recipe's
networks take. A kind may add keys (the trainers use only these two). Tokenization and caption
dropout are not data: they are part of each recipe's training step.

Dataset contract (what a kind's factory returns): a `paddle.io.Dataset` (map-style, sharded over
ranks by the Trainer's `DistributedBatchSampler`) or a `paddle.io.IterableDataset` that shards
itself over ``rank x DataLoader worker`` (every sample read by exactly one consumer per pass),
with ``set_epoch(epoch)`` (fresh random crops/order per epoch; the SD recipe calls it with the
resumed step so a resumed stream does not replay consumed samples).

Adding a data format (e.g. webdataset tar shards) is one new module in `ldm/data/` that defines
its dataset and a factory ``factory(spec, rank, world_size) -> dataset`` and calls
``register_dataset_kind("name", factory)`` at import, plus its import line in
`ldm/data/__init__.py`; the trainers only ever see `DatasetSpec` and `build_dataset`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ldm.data.transforms import NORMALIZE_MODES

__all__ = ["DatasetSpec", "build_dataset", "register_dataset_kind", "dataset_kinds", "check_options", "collate",
           "SAMPLE_KEYS"]

SAMPLE_KEYS = ("pixel_values", "caption")  # the sample schema every kind yields

DatasetFactory = Callable[["DatasetSpec", Optional[int], Optional[int]], Any]
_KINDS: Dict[str, DatasetFactory] = {}


@dataclass(frozen=True)
class DatasetSpec:
    """What data to read and how to turn it into samples.

    Args:
        kind: a registered kind ("folder", "laion", see `dataset_kinds()`).
        path: what the kind reads (a folder, a file list, ...).
        resolution: output size, an int (square) or (height, width).
        normalize: the range the consumer normalises the uint8 pixels to (`normalize_pixels`):
            "minus_one_one" (x / 127.5 - 1, the diffusion convention) or "zero_one" (x / 255).
        center_crop: centre crop instead of a random crop.
        random_flip: horizontal flip with probability 0.5.
        seed: base seed of every random draw of the data (crops, flips, order).
        options: kind-specific options; the kind's factory rejects unknown ones (`check_options`).
    """

    kind: str
    path: str
    resolution: Union[int, Tuple[int, int]] = 256
    normalize: str = "minus_one_one"
    center_crop: bool = False
    random_flip: bool = False
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"DatasetSpec.kind must be a non-empty string, got {self.kind!r}")
        if self.path is None:
            raise ValueError(f"DatasetSpec.path is required (kind {self.kind!r})")
        object.__setattr__(self, "path", os.fspath(self.path))
        res = self.resolution
        sides = (res,) if isinstance(res, (int, np.integer)) else tuple(res) if isinstance(res, (tuple, list)) else ()
        if len(sides) not in (1, 2) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sides):
            raise ValueError(f"DatasetSpec.resolution must be a positive int or (height, width), got {res!r}")
        object.__setattr__(self, "resolution", int(sides[0]) if len(sides) == 1 else (int(sides[0]), int(sides[1])))
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"DatasetSpec.normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"DatasetSpec.options must be a mapping, got {type(self.options).__name__}")
        object.__setattr__(self, "options", dict(self.options))  # a private copy: the spec stays as built
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def size(self) -> Tuple[int, int]:
        """(height, width) of the samples."""
        r = self.resolution
        return (r, r) if isinstance(r, int) else r


def register_dataset_kind(name: str, factory: DatasetFactory) -> None:
    """Make ``DatasetSpec(kind=name, ...)`` buildable: ``factory(spec, rank, world_size) -> dataset``
    (see the module doc for the dataset contract). Registering a taken name with another factory
    is an error."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a dataset kind needs a non-empty name, got {name!r}")
    if not callable(factory):
        raise ValueError(f"the factory of dataset kind {name!r} is not callable: {factory!r}")
    if _KINDS.get(name, factory) is not factory:
        raise ValueError(f"dataset kind {name!r} is already registered (by {_KINDS[name].__module__})")
    _KINDS[name] = factory


def dataset_kinds() -> Tuple[str, ...]:
    """The registered kind names, sorted."""
    return tuple(sorted(_KINDS))


def check_options(spec: DatasetSpec, allowed: Sequence[str]) -> Dict[str, Any]:
    """``spec.options`` after checking every name is in `allowed` (for factories); a ValueError
    names the unknown options, the kind and what it accepts."""
    unknown = sorted(set(spec.options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for dataset kind {spec.kind!r}; "
            f"it accepts: {', '.join(sorted(allowed)) or 'none'}"
        )
    return dict(spec.options)


def build_dataset(spec: DatasetSpec, rank: Optional[int] = None, world_size: Optional[int] = None):
    """The dataset `spec` describes. rank / world_size (default: `ldm.utils.dist_info()`) matter to
    kinds that shard themselves; map-style kinds are sharded by the Trainer's sampler."""
    if not isinstance(spec, DatasetSpec):
        raise ValueError(f"build_dataset takes a DatasetSpec, got {type(spec).__name__}")
    factory = _KINDS.get(spec.kind)
    if factory is None:
        raise ValueError(f"unknown dataset kind {spec.kind!r}; registered kinds: {', '.join(dataset_kinds()) or 'none'}")
    dataset = factory(spec, rank, world_size)
    if not callable(getattr(dataset, "set_epoch", None)):
        raise TypeError(f"dataset kind {spec.kind!r} built a {type(dataset).__name__} without set_epoch(epoch)")
    return dataset


def collate(samples: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """One batch from a list of samples: numpy arrays and numbers are stacked along a new first
    axis (``pixel_values`` -> uint8 [B, H, W, 3], normalised later by the consumer:
    `ldm.data.transforms.normalize_pixels`); strings and other values stay lists (``caption`` ->
    [B] str).

    Plain numpy, so it runs in DataLoader worker processes (PaddleNLP's default collator
    segfaults there); the DataLoader turns the arrays into tensors.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = list(samples[0])
    for i, s in enumerate(samples):
        if set(s) != set(keys):
            raise ValueError(f"sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    out: Dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, (np.ndarray, np.number, np.bool_, int, float, bool)):
            try:
                out[key] = np.stack([np.asarray(v) for v in values])
            except ValueError:
                shapes = sorted({np.shape(v) for v in values})
                raise ValueError(f"cannot stack {key!r}: the samples have shapes {shapes}") from None
        else:
            out[key] = values
    return out
