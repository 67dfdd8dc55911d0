"""Image-caption folder dataset for Stage C fine-tuning (`--dataset_path`).

Layout (the Stable Cascade seed README): one flat folder holding ``NAME.jpg`` + ``NAME.txt``
pairs (``0001.jpg`` / ``0001.txt`` ...). Rules:

* Images are files with extension .jpg / .jpeg / .png / .webp in any letter case; each is paired
  with the caption file of the SAME stem (``NAME.txt``, extension in any case), never by listing
  order. Caption files without an image, hidden files and sub-folders are ignored.
* Images without a caption: a `ValueError` lists every one of them, unless
  ``skip_missing_captions=True``, which drops them with a warning.
* Captions are read as strict UTF-8 (a leading BOM is accepted) and stripped; a file that is not
  UTF-8 raises a `ValueError` naming it. Captions are read once, at construction.
* Corrupt images (undecodable, truncated, over the pixel limit) are found at construction, by
  decoding every image once (``verify_images=True``, the default): a `ValueError` lists every bad
  file with its reason, unless ``skip_corrupt_images=True``, which drops them with a warning and
  records them in ``self.skipped``. Fine-tuning folders are small, so one decode pass is cheap;
  an error at step 10,000 of a run is not. With ``verify_images=False`` a bad file raises
  `ValueError` naming it when it is read.
* Images are decoded with `ldm.data.transforms.decode_image` (EXIF orientation applied, any
  colour mode to RGB) and resized + cropped to the training resolution, so every sample has the
  same shape and batches always collate.

Sample (the schema of `ldm.data.spec`): ``{"pixel_values": uint8 [H, W, 3], "caption": str}``,
normalised after collation by the consumer (`ldm.data.transforms.normalize_pixels`):
``normalize="minus_one_one"`` (x / 127.5 - 1) is the diffusion convention; ``normalize="zero_one"``
(x / 255) is what Stage C's EfficientNet encoder takes before its ImageNet mean/std normalisation.

Randomness (crop offset, flip) comes from ``numpy.random.default_rng([seed, epoch, index])``:
the same (seed, epoch, index) gives the same sample in any process or DataLoader worker. Call
`set_epoch` at each epoch to get fresh crops (otherwise every epoch repeats epoch 0's).

Registered as dataset kind "folder" (`build_dataset(DatasetSpec("folder", root, ...))`).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import paddle

from ldm.data.buckets import AspectBuckets, image_size
from ldm.data.spec import DatasetSpec, check_options, register_dataset_kind
from ldm.data.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTransform, decode_image
from ldm.utils import get_logger, special_file_problem

logger = get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSION = ".txt"


def _read_caption(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"caption file {path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
            "save it as UTF-8"
        ) from None


def scan_folder(root: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Pair images with captions by stem. Returns ([(image_path, caption_path)], [unpaired images]).

    Both lists are sorted by image file name, so the order is the same on every file system.
    """
    if not os.path.exists(root):
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"dataset path {root} is not a folder")
    images: list[str] = []
    captions: dict[str, str] = {}
    for entry in os.scandir(root):
        if entry.name.startswith("."):
            continue
        stem, ext = os.path.splitext(entry.name)
        ext = ext.lower()
        if ext not in IMAGE_EXTENSIONS and ext != CAPTION_EXTENSION:
            continue
        problem = special_file_problem(entry.path)  # a symlink loop, FIFO, device (issue 12 items 6, 9)
        if problem or not os.path.isfile(entry.path):
            if problem:
                logger.warning("skipped: %s", problem)
            continue
        if ext in IMAGE_EXTENSIONS:
            images.append(entry.name)
        elif ext == CAPTION_EXTENSION:
            if stem in captions:
                raise ValueError(
                    f"two caption files for stem {stem!r} in {root}: {captions[stem]} and {entry.name}"
                )
            captions[stem] = entry.name
    images.sort()
    pairs, missing = [], []
    for name in images:
        stem = os.path.splitext(name)[0]
        if stem in captions:
            pairs.append((os.path.join(root, name), os.path.join(root, captions[stem])))
        else:
            missing.append(os.path.join(root, name))
    return pairs, missing


def _list_for_error(paths: Sequence[str], limit: int = 50) -> str:
    shown = "\n  ".join(paths[:limit])
    more = f"\n  ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return f"\n  {shown}{more}"


class FolderDataset(paddle.io.Dataset):
    """Map-style dataset over a folder of ``NAME.{jpg,jpeg,png,webp}`` + ``NAME.txt`` pairs.

    Args:
        root: the folder (flat; sub-folders are ignored).
        resolution: output size, int or (height, width).
        center_crop: centre crop instead of a random crop.
        random_flip: horizontal flip with probability 0.5.
        normalize: "minus_one_one" (default) or "zero_one" (see module doc).
        seed: base seed of the per-sample generators.
        skip_missing_captions: drop images without a caption (warning) instead of raising.
        verify_images: decode every image once at construction (see module doc).
        skip_corrupt_images: with verify_images, drop bad images (warning) instead of raising.
        max_pixels: decompression-bomb limit passed to decode_image (None disables it).
        multi_aspect_ratio: ratios w/h (`ldm.data.buckets`): each image gets the size of the bucket
            of its nearest ratio (about `resolution` pixels in area, sides multiples of
            `size_multiple`), listed in `item_sizes`; None: every image at `resolution`.
        size_multiple: the bucket sides' multiple (32 for Stage C, 64 for Stage B).
    Attributes:
        samples: [(image_path, caption)] in file-name order.
        skipped: {"missing_caption": [paths], "corrupt": [(path, reason)]}.
        item_sizes: with multi_aspect_ratio, the (h, w) of every sample (the Trainer then batches
            by size: `ldm.data.buckets.BucketBatchSampler`); else None.
    """

    def __init__(
        self,
        root: str,
        resolution: int | Sequence[int] = 768,
        center_crop: bool = False,
        random_flip: bool = False,
        normalize: str = "minus_one_one",
        seed: int = 0,
        skip_missing_captions: bool = False,
        verify_images: bool = True,
        skip_corrupt_images: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        multi_aspect_ratio: Sequence[float] | None = None,
        size_multiple: int = 32,
    ):
        super().__init__()
        self.root = os.fspath(root)
        self.transform = ImageTransform(
            resolution, center_crop=center_crop, random_flip=random_flip, normalize=normalize
        )
        self.seed = int(seed)
        self.max_pixels = max_pixels
        self.epoch = 0
        self.skipped: dict = {"missing_caption": [], "corrupt": []}

        pairs, missing = scan_folder(self.root)
        if missing:
            if not skip_missing_captions:
                raise ValueError(
                    f"{len(missing)} image(s) in {self.root} have no caption file NAME.txt "
                    f"(pass --skip_missing_captions True to skip them; option skip_missing_captions=True of the "
                    f"dataset):{_list_for_error(missing)}"
                )
            logger.warning(
                "skipping %d image(s) without a caption in %s:%s", len(missing), self.root, _list_for_error(missing)
            )
            self.skipped["missing_caption"] = list(missing)
        if not pairs:
            raise ValueError(
                f"no image/caption pairs in {self.root}: expected NAME.jpg|.jpeg|.png|.webp files, "
                f"each with a NAME.txt caption"
            )

        samples = [(image, _read_caption(caption_path)) for image, caption_path in pairs]
        if verify_images:
            samples = self._verify(samples, skip_corrupt_images)
        self.samples: list[tuple[str, str]] = samples
        self.item_sizes: list[tuple[int, int]] | None = None
        self._bucket_transforms: dict = {}
        if multi_aspect_ratio:
            buckets = AspectBuckets(self.transform.height if self.transform.height == self.transform.width
                                    else (self.transform.height, self.transform.width), multi_aspect_ratio, size_multiple)
            self.item_sizes = [buckets.assign(*image_size(path)) for path, _ in samples]
            self._bucket_transforms = {hw: ImageTransform(hw, center_crop=center_crop, random_flip=random_flip,
                                                          normalize=normalize) for hw in set(self.item_sizes)}

    def _verify(self, samples, skip: bool):
        good, bad = [], []
        for image, caption in samples:
            try:
                self._decode(image)
            except ImageDecodeError as e:
                bad.append((image, e.reason))
                continue
            good.append((image, caption))
        if bad:
            listed = [f"{path} ({reason})" for path, reason in bad]
            if not skip:
                raise ValueError(
                    f"{len(bad)} image(s) in {self.root} cannot be used "
                    f"(pass skip_corrupt_images=True to skip them):{_list_for_error(listed)}"
                )
            logger.warning("skipping %d corrupt image(s) in %s:%s", len(bad), self.root, _list_for_error(listed))
            self.skipped["corrupt"] = bad
        if not good:
            raise ValueError(f"no usable image in {self.root}: all {len(samples)} failed to decode")
        return good

    def _decode(self, path: str):
        with open(path, "rb") as f:
            data = f.read()
        target = max(self.transform.height, self.transform.width)
        return decode_image(data, max_pixels=self.max_pixels, target_short_side=target)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index = index % n
        path, caption = self.samples[index]
        try:
            img = self._decode(path)
        except ImageDecodeError as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        transform = self.transform if self.item_sizes is None else self._bucket_transforms[self.item_sizes[index]]
        return {"pixel_values": transform(img, rng), "caption": caption}


FOLDER_OPTIONS = ("skip_missing_captions", "verify_images", "skip_corrupt_images", "max_pixels", "multi_aspect_ratio",
                  "size_multiple")


def build_folder_dataset(spec: DatasetSpec, rank: int | None = None, world_size: int | None = None) -> FolderDataset:
    """Dataset kind "folder": `spec.path` is the folder; `spec.options` may hold FOLDER_OPTIONS
    (FolderDataset's arguments of those names). Map-style: the Trainer's sampler shards it over
    ranks, so rank / world_size are not used here."""
    return FolderDataset(
        spec.path, resolution=spec.size, center_crop=spec.center_crop, random_flip=spec.random_flip,
        normalize=spec.normalize, seed=spec.seed, **check_options(spec, FOLDER_OPTIONS),
    )


register_dataset_kind("folder", build_folder_dataset)

__all__ = ["IMAGE_EXTENSIONS", "FOLDER_OPTIONS", "FolderDataset", "build_folder_dataset", "scan_folder"]
