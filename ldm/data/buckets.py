"""Multi-aspect buckets for map-style datasets: bucket sizes, the nearest bucket of an image, and
the batch sampler that draws every batch from one bucket.

Facts of the original recipe (Stability-AI/StableCascade `core/data/bucketeer.py` and
`train/base.py`; facts only, the code here is this project's own):
- the ratio list of the training configs (`multi_aspect_ratio`), given as fractions w/h
  (`OFFICIAL_ASPECT_RATIOS`); each ratio r is used in both orientations (r and 1/r);
- a bucket keeps the pixel area of `image_size`^2: height = floor(sqrt(area / r) / m) * m,
  width = floor(sqrt(area * r) / m) * m, with m = 32 (`factor=32`, the EfficientNet stride);
- an image goes to the ratio nearest to its own w/h (smallest |w/h - r|), is resized to cover the
  bucket size and cropped to it (random or centre crop), and a batch holds images of one bucket.

Here m is the recipe's size multiple: 32 for Stage C (EfficientNet stride), 64 for Stage B
(Stage A downsamples by 4, Stage B patchifies by 2 and halves three more times: 4 * 2 * 8 = 64,
so every level of Stage B sees whole pixels; `ldm.cascade.settings.SIZE_MULTIPLE`). A side
below m is raised to m; buckets that end up with the same size are one bucket.

`BucketBatchSampler` (data parallel, resumable): see its docstring.
"""
from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
from PIL import Image

__all__ = ["OFFICIAL_ASPECT_RATIOS", "parse_aspect_ratios", "AspectBuckets", "image_size", "ResumableSampler",
           "BucketBatchSampler"]

# configs/training/finetune_c_*.yaml multi_aspect_ratio (w / h)
OFFICIAL_ASPECT_RATIOS = ("1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16")
_SAMPLER_TAG = 0xB0C  # keeps the bucket order's generator apart from the crops' (seed, epoch, index)
_SWAP_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def parse_aspect_ratios(values: Union[None, str, float, Sequence[Union[str, float]]]) -> Optional[Tuple[float, ...]]:
    """Ratios w/h from `--multi_aspect_ratio` values: fractions ("3/4"), decimals ("0.75", 0.75),
    also comma separated ("1/1,2/3"). None, an empty list or the single ratio 1 mean "off" (None:
    square crops at --resolution, the behaviour without buckets)."""
    if values is None:
        return None
    if isinstance(values, (str, int, float, Fraction)):
        values = [values]
    items = [s for v in values for s in (str(v).split(",") if isinstance(v, str) else [v]) if str(s).strip()]
    ratios = []
    for v in items:
        try:
            r = Fraction(v.strip()) if isinstance(v, str) else Fraction(v)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--multi_aspect_ratio: {v!r} is not a ratio (write 3/4 or 0.75)") from None
        if r <= 0:
            raise ValueError(f"--multi_aspect_ratio: ratios must be positive, got {v!r}")
        ratios.append(float(r))
    if not ratios or all(r == 1.0 for r in ratios):
        return None
    return tuple(ratios)


class AspectBuckets:
    """The bucket sizes of `ratios` (w/h, both orientations) at about `resolution`^2 pixels
    (an int, or (h, w): area h * w) with sides that are multiples of `multiple`."""

    def __init__(self, resolution: Union[int, Sequence[int]], ratios: Sequence[float], multiple: int = 32):
        if isinstance(resolution, int):
            area = resolution * resolution
        else:
            h, w = resolution
            area = int(h) * int(w)
        if multiple < 1 or area < multiple * multiple:
            raise ValueError(f"bucket area {area} px is below one {multiple}x{multiple} block")
        if not ratios:
            raise ValueError("AspectBuckets needs at least one ratio")
        both: List[float] = []
        for r in ratios:
            for x in (float(r), 1.0 / float(r)):
                if not any(math.isclose(x, y) for y in both):
                    both.append(x)
        self.ratios = tuple(both)
        self.multiple = int(multiple)
        self.sizes: Tuple[Tuple[int, int], ...] = tuple(self._size(area, r) for r in self.ratios)

    def _size(self, area: int, r: float) -> Tuple[int, int]:
        m = self.multiple
        h = int(math.sqrt(area / r) // m) * m
        w = int(math.sqrt(area * r) // m) * m
        return max(h, m), max(w, m)

    def assign(self, width: int, height: int) -> Tuple[int, int]:
        """(h, w) of the bucket whose ratio is nearest to width / height."""
        if width <= 0 or height <= 0:
            raise ValueError(f"bad image size {width}x{height}")
        a = width / height
        return self.sizes[int(np.argmin([abs(a - r) for r in self.ratios]))]

    def __repr__(self) -> str:
        return f"AspectBuckets(sizes={sorted(set(self.sizes))}, multiple={self.multiple})"


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) of the image file as displayed (EXIF orientation applied), from its header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                orientation = img.getexif().get(0x0112, 1)
    except Exception as e:  # noqa: BLE001 - any reader error names the file
        raise ValueError(f"cannot read the size of image {path}: {type(e).__name__}: {e}") from None
    return (h, w) if orientation in _SWAP_ORIENTATIONS else (w, h)


class ResumableSampler:
    """The resume position of a batch sampler with `set_epoch` (this one and
    `ldm.train.trainer.SeededBatchSampler`): `start_at(epochs, batches)` makes loop epoch 0 the
    data epoch `epochs`, whose first `batches` batches `_resumed` does not yield (only on the
    first pass after start_at)."""

    _epoch_offset, _skip = 0, 0

    def start_at(self, epochs: int, batches: int) -> None:
        if epochs < 0 or not 0 <= batches < max(len(self), 1):
            raise ValueError(f"cannot start at epoch {epochs}, batch {batches} of {len(self)}")
        self._epoch_offset, self._skip = int(epochs), int(batches)
        self.set_epoch(0)

    def _resumed(self, batches):
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(batches):
            if i >= skip:
                yield batch


class BucketBatchSampler(ResumableSampler, paddle.io.DistributedBatchSampler):
    """Batches of indices of `dataset` whose items share one size (`sizes[i]`, any hashable; the
    dataset's `item_sizes`), sharded over `num_replicas` ranks.

    Per epoch (the generator is `default_rng([seed, epoch, tag])`, the same on every rank):
    each bucket's indices are shuffled and cut into global batches of batch_size * num_replicas
    (the last one padded by repeating the bucket's own shuffled indices, or dropped with
    `drop_last`), the global batches of all buckets are shuffled together, and rank k takes the
    k-th slice of batch_size of each. So every batch has one size, the ranks read disjoint images
    of each global batch (only pads repeat), and all ranks run `len(self)` batches per epoch (a
    number that depends only on the bucket counts: no rank waits for another at the end of an
    epoch). With padding each image is read at least once per epoch, exactly once when every
    bucket's count is a multiple of batch_size * num_replicas.

    Driven like `ldm.train.trainer.SeededBatchSampler`: `set_epoch(e)` (the Trainer calls it; it
    also sets the dataset's epoch) and `start_at(epochs, batches)` (resume: loop epoch 0 is data
    epoch `epochs`, its first `batches` batches are not yielded), so a resumed run continues the
    same bucket order.
    """

    def __init__(self, dataset, sizes: Sequence, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, drop_last: bool = False):
        if len(sizes) != len(dataset):
            raise ValueError(f"{len(sizes)} item sizes for a dataset of {len(dataset)} items")
        super().__init__(dataset, batch_size=batch_size, num_replicas=num_replicas, rank=rank, shuffle=True,
                         drop_last=drop_last)
        groups: Dict = {}
        for i, s in enumerate(sizes):
            groups.setdefault(tuple(s) if isinstance(s, (list, tuple)) else s, []).append(i)
        self.buckets = {k: np.asarray(v, np.int64) for k, v in sorted(groups.items())}
        self._seed, self._data_epoch = int(seed), 0
        g = self.batch_size * self.nranks
        rounding = math.floor if drop_last else math.ceil
        self._num_batches = sum(int(rounding(len(v) / g)) for v in self.buckets.values())
        if self._num_batches == 0:
            counts = {k: len(v) for k, v in self.buckets.items()}
            raise ValueError(f"no bucket holds batch_size x ranks = {g} images (bucket counts {counts}); "
                             "lower the batch size or turn drop_last off")
        self.set_epoch(0)

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self._data_epoch = int(epoch) + self._epoch_offset
        self.epoch = self._data_epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self._data_epoch)

    def global_batches(self, epoch: int) -> List[np.ndarray]:
        """The epoch's global batches (each [batch_size * num_replicas] indices of one bucket), in order."""
        rng = np.random.default_rng([self._seed, int(epoch), _SAMPLER_TAG])
        g = self.batch_size * self.nranks
        chunks = []
        for idx in self.buckets.values():
            idx = rng.permutation(idx)
            n = (len(idx) // g) * g if self.drop_last else -(-len(idx) // g) * g
            chunks.extend(np.resize(idx, n).reshape(-1, g))  # np.resize repeats the shuffled indices
        return [chunks[i] for i in rng.permutation(len(chunks))]

    def __iter__(self):
        lo = self.local_rank * self.batch_size
        yield from self._resumed(c[lo:lo + self.batch_size].tolist() for c in self.global_batches(self._data_epoch))
