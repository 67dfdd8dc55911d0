"""A simple deterministic analyser of demo images (issue 14): `analyse(image) -> (background,
color, shape)`, and the accuracy table of `scripts/demo_score.py`.

- background: the palette colour (`ldm.demo.shapes.PALETTE`, nearest in RGB) of the median of the
  border pixels (the outer 5% of each side; a demo shape never reaches it: 30% half-size + 10%
  offset leaves 10% free).
- foreground: first the pixels farther than `FOREGROUND_DISTANCE` from that median border colour
  (about half the smallest distance between two palette colours); fewer than `MIN_AREA` of the
  image: no shape, (background, None, None). Their per-channel median is the shape's colour; the
  final mask is the pixels nearer to it than to the border colour (soft edges split halfway).
- color: the palette colour nearest to that median.
- shape: from the mask's bounding box (rows and columns holding at least 2% of the side of mask
  pixels, so isolated specks do not widen it) and the fill of its four corner patches (`CORNER`
  of the box side): a square fills all four, an upward triangle the two bottom ones only (~0.75),
  a circle none (~0.02).
"""
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from ldm.demo.shapes import COLORS, PALETTE

FOREGROUND_DISTANCE = 80.0
MIN_AREA = 0.02
BORDER = 0.05
CORNER = 0.15  # corner patches of the shape's box, as a fraction of its side
_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)  # (6, 3)


def nearest_color(rgb) -> str:
    """The palette colour nearest (Euclidean RGB) to rgb."""
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float64)[None, :]) ** 2).sum(-1)
    return COLORS[int(np.argmin(d))]


def _as_array(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL image
        image = image.convert("RGB")
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
    if a.shape[0] < 8 or a.shape[1] < 8:
        raise ValueError(f"image too small to analyse: {a.shape[:2]}")
    return a.astype(np.float64)


def _shape_of(mask: np.ndarray) -> Optional[str]:
    h, w = mask.shape
    rows = np.nonzero(mask.sum(1) >= max(1.0, 0.02 * w))[0]
    cols = np.nonzero(mask.sum(0) >= max(1.0, 0.02 * h))[0]
    if rows.size < 2 or cols.size < 2:
        return None
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float64)
    bh, bw = box.shape
    ch, cw = max(1, int(round(CORNER * bh))), max(1, int(round(CORNER * bw)))
    top = (box[:ch, :cw].mean() + box[:ch, -cw:].mean()) / 2
    bottom = (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean()) / 2
    if top > 0.5 and bottom > 0.5:
        return "square"
    if bottom - top > 0.3:
        return "triangle"
    return "circle"


def analyse(image) -> Tuple[str, Optional[str], Optional[str]]:
    """(background, color, shape) of a PIL image or uint8 (H, W, 3) array; color and shape are
    None when no foreground is found."""
    a = _as_array(image)
    h, w = a.shape[:2]
    bh, bw = max(1, int(round(BORDER * h))), max(1, int(round(BORDER * w)))
    border = np.concatenate([a[:bh].reshape(-1, 3), a[-bh:].reshape(-1, 3),
                             a[:, :bw].reshape(-1, 3), a[:, -bw:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    rough = np.sqrt(((a - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    if rough.mean() < MIN_AREA:
        return background, None, None
    fg_rgb = np.median(a[rough], axis=0)
    mask = ((a - fg_rgb) ** 2).sum(-1) < ((a - bg_rgb) ** 2).sum(-1)  # nearer the shape colour: soft edges split halfway
    return background, nearest_color(fg_rgb), _shape_of(mask)


FIELDS = ("background", "color", "shape")


def accuracy(results: Iterable[Tuple[Sequence[str], Sequence[str]]]) -> Dict[str, float]:
    """results: (expected (color, shape, background), predicted (background, color, shape)) pairs
    -> {"background", "color", "shape", "all", "n"}: fractions correct (all: the three at once)."""
    n = 0
    hits = dict.fromkeys(FIELDS + ("all",), 0)
    for (color, shape, background), predicted in results:
        ok = dict(zip(FIELDS, (predicted[0] == background, predicted[1] == color, predicted[2] == shape)))
        for k, v in ok.items():
            hits[k] += int(v)
        hits["all"] += int(all(ok.values()))
        n += 1
    if n == 0:
        raise ValueError("no results to score")
    out = {k: v / n for k, v in hits.items()}
    out["n"] = n
    return out


def format_table(rows: Dict[str, Dict[str, float]]) -> str:
    """A markdown table: one row per {name: accuracy(...)} entry."""
    lines = ["| set | images | background | shape colour | shape | all three |", "|---|---|---|---|---|---|"]
    for name, acc in rows.items():
        lines.append(f"| {name} | {acc['n']} | {acc['background']:.1%} | {acc['color']:.1%} | "
                     f"{acc['shape']:.1%} | {acc['all']:.1%} |")
    return "\n".join(lines)
