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


# ---------------------------------------------------------------------------------------------
# the analyser (ldm.demo.score)
# ---------------------------------------------------------------------------------------------
def test_analyser_is_right_on_the_data_sets_own_images():
    import io

    from ldm.demo.score import accuracy, analyse

    results = []
    for k, combo in enumerate(shapes.combinations()):
        for size in (64, 128, 256):
            image = shapes.render(*combo, size=size, rng_or_seed=[k, size])
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=shapes.JPEG_QUALITY, subsampling=0)
            for im in (image, Image.open(buf)):
                results.append((combo, analyse(im)))
    acc = accuracy(results)
    assert acc["n"] == 90 * 6
    assert acc["background"] == acc["color"] == acc["shape"] == acc["all"] == 1.0


def test_analyser_is_about_chance_on_noise():
    from ldm.demo.score import accuracy, analyse

    rng = np.random.default_rng(0)
    results = [(combo, analyse(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)))
               for combo in shapes.combinations()]
    acc = accuracy(results)
    assert acc["background"] <= 1 / 6 + 0.1 and acc["color"] <= 1 / 6 + 0.1 and acc["shape"] <= 1 / 3 + 0.15
    assert acc["all"] <= 0.1


def test_analyser_flat_image_and_bad_input():
    from ldm.demo.score import analyse

    flat = Image.new("RGB", (64, 64), shapes.PALETTE["green"])
    assert analyse(flat) == ("green", None, None)
    with pytest.raises(ValueError):
        analyse(np.zeros((64, 64), np.uint8))


def test_score_script_on_the_data_family(capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "demo_score.py")
    spec = importlib.util.spec_from_file_location("demo_score", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--family", "data", "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert "| data trained | 81 | 100.0% | 100.0% | 100.0% | 100.0% |" in out
    assert "| data held-out | 9 | 100.0% |" in out


def test_score_script_cascade_samples_through_generate(capsys, monkeypatch):
    """The cascade family samples through ldm.demo.cascade.generate (networks loaded once, the
    images inference.py --preset demo writes): one call per combination with n = K and seed
    seed + j * K; stdout is the table and the JSON line only."""
    import importlib.util

    from ldm.demo import cascade as demo_cascade

    calls = []

    def fake_generate(caption, n=1, seed=0, weights_path=None, **sampling):
        calls.append((caption, n, seed, weights_path, sampling))
        color, shape, background = shapes.parse_caption(caption)
        return [np.asarray(shapes.render(color, shape, background, size=64, rng_or_seed=seed + i)) for i in range(n)]

    monkeypatch.setattr(demo_cascade, "generate", fake_generate)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "demo_score.py")
    spec = importlib.util.spec_from_file_location("demo_score", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--family", "cascade", "--k", "2", "--seed", "5", "--cascade_dir", "/somewhere"]) == 0
    captions = [shapes.caption(*c) for c in shapes.combinations()]
    assert calls == [(c, 2, 5 + 2 * j, "/somewhere", {}) for j, c in enumerate(captions)]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == "| cascade trained | 162 | 100.0% | 100.0% | 100.0% | 100.0% |"
    assert len(lines) == 5 and lines[-1].startswith("{")  # header, rule, 2 rows, JSON
