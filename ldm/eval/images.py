"""Image sets to evaluate, read one image at a time: a folder of image files or LAION-format data.

- A folder: its image files (pytorch-fid's extensions), sorted by name, not recursive, as
  pytorch-fid's `compute_statistics_of_path` reads them.
- A file: a LAION part file, `.filelist` or `.filelist.list` (ldm.data.laion reads them; records
  that fail to decode are skipped and counted, as in training).

Images come out as uint8 (H, W, 3) RGB arrays, at their own size unless `resolution` is given
(shorter side resized to it with PIL bicubic, then a centre crop to a square), which puts a
reference set on the footing of generated images (PaddleMIX's `coco_256_*.npz` are from 256 px
images).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np

from ldm.utils import get_logger, special_file_problem

__all__ = ["IMAGE_EXTENSIONS", "list_image_files", "iter_images", "count_images", "load_image", "to_float_chw"]

logger = get_logger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def to_float_chw(image) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) in [0, 1] (torchvision's ToTensor)."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (H, W, 3) RGB arrays, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32) / 255.0


def list_image_files(folder) -> list[str]:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder} is not a folder")
    return sorted(os.path.join(folder, e.name) for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS))


def _square(img, resolution: Optional[int]):
    from PIL import Image

    img = img.convert("RGB")
    if resolution:
        w, h = img.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img)


def load_image(path, resolution: Optional[int] = None) -> np.ndarray:
    """One image file as uint8 (H, W, 3) RGB (`Image.open(path).convert("RGB")`)."""
    from PIL import Image

    if special_file_problem(path):  # a FIFO or device would block Image.open (issue 12 item 6)
        raise ValueError(f"image {special_file_problem(path)}")
    with Image.open(path) as img:
        return _square(img, resolution)


def _iter_laion(file_list: str, resolution: Optional[int]) -> Iterator[np.ndarray]:
    from PIL import Image

    from ldm.data.laion import RecordError, decode_record_image, expand_file_list, open_part, parse_record
    from ldm.data.transforms import DEFAULT_MAX_PIXELS

    skipped = 0
    for entry in expand_file_list(file_list):
        with open_part(entry.path) as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    _, data = parse_record(raw)
                    arr = decode_record_image(data, DEFAULT_MAX_PIXELS, None, as_array=True)
                except RecordError:
                    skipped += 1
                    continue
                yield _square(Image.fromarray(np.asarray(arr)), resolution) if resolution else np.asarray(arr)
    if skipped:
        logger.warning("%s: %d records skipped (not decodable)", file_list, skipped)


def iter_images(source, resolution: Optional[int] = None, limit: Optional[int] = None) -> Iterator[np.ndarray]:
    """uint8 (H, W, 3) images of a folder or a LAION file list (see the module docstring), at
    most `limit` of them."""
    source = os.fspath(source)
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if os.path.isdir(source):
        files = list_image_files(source)
        if not files:
            raise ValueError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        it = (load_image(f, resolution) for f in files)
    elif os.path.isfile(source):
        it = _iter_laion(source, resolution)
    else:
        raise FileNotFoundError(f"{source}: no such image folder or LAION file list")
    for i, img in enumerate(it):
        if limit is not None and i >= limit:
            break
        yield img


def count_images(source, limit: Optional[int] = None) -> Optional[int]:
    """How many images iter_images yields for a folder (None for LAION data: not known up front)."""
    source = os.fspath(source)
    if not os.path.isdir(source):
        return limit
    n = len(list_image_files(source))
    return n if limit is None else min(n, limit)
