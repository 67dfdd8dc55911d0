"""The demo data set of issue 14: one flat-coloured shape on a flat background.

Caption ``a {color} {shape} on a {background} background``; color and background from `COLORS`
(color != background), shape from `SHAPES` (axis-aligned square, upward triangle): 90
combinations, of which the 9 in `HELD_OUT` are never trained on (they test composition). The shape
is 30%-60% of the image side, its centre at most 10% of the side away from the image centre.

Everything is deterministic for a seed: image ``i`` of combination ``(c, s, b)`` is drawn from
``numpy.random.default_rng([seed, index of (c, s, b) in combinations(), i])``, so a subset or a
different ``per_combination`` does not change the other images.

Written out as a caption folder (NAME.jpg + NAME.txt, the Stage C folder kind) by
`write_caption_folder`, or as an image+caption jsonl for create_pretraining_data.py by
`write_jsonl`. JPEGs are saved at quality 95 without chroma subsampling, so the palette colours
stay distinct (`PALETTE` values are at least ~150 apart in RGB).
"""
import json
import os
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# (color, shape, background) triples of issue 14 that no demo model is trained on.
HELD_OUT = (
    ("red", "circle", "blue"),
    ("green", "square", "black"),
    ("blue", "triangle", "yellow"),
    ("yellow", "circle", "green"),
    ("white", "square", "red"),
    ("black", "triangle", "white"),
    ("red", "triangle", "green"),
    ("blue", "square", "white"),
    ("green", "circle", "yellow"),
)
SIZE_RANGE = (0.3, 0.6)  # shape extent / image side
MAX_OFFSET = 0.1  # |centre offset| / image side, per axis
_SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: smooth edges, flat interiors
JPEG_QUALITY = 95


def combinations(held_out: Optional[bool] = None) -> list:
    """All 90 (color, shape, background) triples in a fixed order; held_out=True: only the 9
    held-out ones, False: only the 81 trained ones, None: all."""
    held = set(HELD_OUT)
    out = []
    for color in COLORS:
        for shape in SHAPES:
            for background in COLORS:
                if color == background:
                    continue
                combo = (color, shape, background)
                if held_out is None or (combo in held) == held_out:
                    out.append(combo)
    return out


def caption(color: str, shape: str, background: str) -> str:
    _check(color, shape, background)
    return f"a {color} {shape} on a {background} background"


def parse_caption(text: str) -> tuple:
    """Inverse of `caption`: (color, shape, background); ValueError for another text."""
    words = text.strip().split()
    if (len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background"):
        raise ValueError(f"not a demo caption: {text!r}")
    combo = (words[1], words[2], words[5])
    _check(*combo)
    return combo


def _check(color, shape, background):
    if color not in PALETTE or background not in PALETTE:
        raise ValueError(f"colours must be in {COLORS}, got {color!r} and {background!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be in {SHAPES}, got {shape!r}")
    if color == background:
        raise ValueError(f"shape colour and background must differ, both are {color!r}")


def _rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def render(color: str, shape: str, background: str, size: int = 128,
           rng_or_seed: Union[int, list, np.random.Generator] = 0) -> Image.Image:
    """One RGB image of side `size`: the shape's extent (circle diameter, square side, triangle
    base = height) is uniform in SIZE_RANGE of the side, its centre offset uniform in
    +-MAX_OFFSET of the side on each axis."""
    _check(color, shape, background)
    if int(size) < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    size = int(size)
    rng = _rng(rng_or_seed)
    extent = rng.uniform(*SIZE_RANGE)
    dx, dy = rng.uniform(-MAX_OFFSET, MAX_OFFSET, size=2)
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[background])
    draw = ImageDraw.Draw(image)
    half = extent * big / 2
    cx, cy = (0.5 + dx) * big, (0.5 + dy) * big
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upward triangle: apex on top, base at the bottom of the box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((size, size), Image.BOX)


def _samples(per_combination: int, seed: int, held_out: Optional[bool] = False):
    """(name, combo, rng) for every image, trained combinations only by default."""
    if int(per_combination) < 1:
        raise ValueError(f"per_combination must be >= 1, got {per_combination}")
    index = {combo: k for k, combo in enumerate(combinations())}
    for combo in combinations(held_out):
        for i in range(int(per_combination)):
            name = "{}_{}_on_{}_{:04d}".format(*combo, i)
            yield name, combo, np.random.default_rng([int(seed), index[combo], i])


def _save_jpeg(image: Image.Image, path: str):
    image.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def write_caption_folder(path: str, per_combination: int = 8, size: int = 128, seed: int = 0) -> int:
    """NAME.jpg + NAME.txt for `per_combination` images of each of the 81 trained combinations;
    returns the number of images written."""
    os.makedirs(path, exist_ok=True)
    n = 0
    for name, combo, rng in _samples(per_combination, seed):
        _save_jpeg(render(*combo, size=size, rng_or_seed=rng), os.path.join(path, name + ".jpg"))
        with open(os.path.join(path, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption(*combo) + "\n")
        n += 1
    return n


def write_jsonl(path: str, image_dir: str, per_combination: int = 8, size: int = 128, seed: int = 0) -> int:
    """Images of the 81 trained combinations into image_dir (NAME.jpg) and one
    {"caption", "image"} line per image into the jsonl at `path` (image paths relative to the
    jsonl's folder when image_dir is below it, else absolute), the input of
    create_pretraining_data.py; returns the number of records."""
    os.makedirs(image_dir, exist_ok=True)
    jsonl_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(jsonl_dir, exist_ok=True)
    rel = os.path.relpath(os.path.abspath(image_dir), jsonl_dir)
    below = not rel.startswith(os.pardir)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for name, combo, rng in _samples(per_combination, seed):
            image_path = os.path.join(image_dir, name + ".jpg")
            _save_jpeg(render(*combo, size=size, rng_or_seed=rng), image_path)
            ref = os.path.join(rel, name + ".jpg") if below else os.path.abspath(image_path)
            f.write(json.dumps({"caption": caption(*combo), "image": ref}) + "\n")
            n += 1
    return n
