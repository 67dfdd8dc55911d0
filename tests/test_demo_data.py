"""The demo data set of issue 14 (ldm.demo.shapes): deterministic, matches its captions."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ldm.demo import shapes


def test_combinations_and_held_out():
    everything = shapes.combinations()
    assert len(everything) == 90 and len(set(everything)) == 90
    assert len(shapes.combinations(False)) == 81
    assert sorted(shapes.combinations(True)) == sorted(shapes.HELD_OUT)
    assert all(c != b for c, _, b in everything)
    assert shapes.caption("red", "circle", "blue") == "a red circle on a blue background"
    assert shapes.parse_caption("a red circle on a blue background") == ("red", "circle", "blue")
    with pytest.raises(ValueError):
        shapes.caption("red", "circle", "red")
    with pytest.raises(ValueError):
        shapes.render("purple", "circle", "red", 64, 0)


def test_render_is_deterministic_and_flat():
    a = np.asarray(shapes.render("yellow", "square", "black", 64, 7))
    b = np.asarray(shapes.render("yellow", "square", "black", 64, np.random.default_rng(7)))
    c = np.asarray(shapes.render("yellow", "square", "black", 64, 8))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    # corners are background; the centre (offset <= 10%, size >= 30%) is the shape colour
    assert tuple(a[0, 0]) == shapes.PALETTE["black"] and tuple(a[32, 32]) == shapes.PALETTE["yellow"]


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_shape_size_and_offset(shape):
    side = 96
    bg = np.array(shapes.PALETTE["white"])
    for seed in range(20):
        a = np.asarray(shapes.render("blue", shape, "white", side, seed)).astype(int)
        mask = np.abs(a - bg).sum(-1) > 200
        ys, xs = np.nonzero(mask)
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / side
        assert 0.3 - 2 / side <= extent <= 0.6 + 2 / side
        cx, cy = (xs.max() + xs.min() + 1) / 2 / side, (ys.max() + ys.min() + 1) / 2 / side
        assert abs(cx - 0.5) <= 0.1 + 2 / side and abs(cy - 0.5) <= 0.1 + 2 / side
        if shape == "triangle":  # upward: narrow top row, wide bottom row
            top, bottom = mask[ys.min()].sum(), mask[ys.max()].sum()
            assert top < bottom


def test_caption_folder_and_jsonl_match_and_repeat(tmp_path):
    n = shapes.write_caption_folder(str(tmp_path / "f"), per_combination=1, size=32, seed=3)
    assert n == 81
    names = sorted(p[:-4] for p in os.listdir(tmp_path / "f") if p.endswith(".jpg"))
    assert len(names) == 81
    held = set(shapes.HELD_OUT)
    for name in names:
        with open(tmp_path / "f" / (name + ".txt"), encoding="utf-8") as f:
            combo = shapes.parse_caption(f.read())
        assert combo not in held
        assert name.startswith("{}_{}_on_{}_".format(*combo))
    n = shapes.write_jsonl(str(tmp_path / "j" / "data.jsonl"), str(tmp_path / "j" / "images"), 1, 32, 3)
    assert n == 81
    with open(tmp_path / "j" / "data.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 81
    for r in records:
        assert not os.path.isabs(r["image"])
        name = os.path.basename(r["image"])[:-4]
        # same seed: the jsonl images equal the caption folder's
        a = np.asarray(Image.open(tmp_path / "j" / r["image"]))
        b = np.asarray(Image.open(tmp_path / "f" / (name + ".jpg")))
        assert np.array_equal(a, b)
        with open(tmp_path / "f" / (name + ".txt"), encoding="utf-8") as f:
            assert f.read().strip() == r["caption"]
