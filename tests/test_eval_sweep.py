"""scripts/evaluate.py end to end on tiny components (CPU): a tiny SD v1 (diffusers layout, built in
torch) and the tiny Stable Cascade preset, a tiny CLIP, a random-weight FID Inception, a reference
image folder. Checks the images, results.json / results.csv / fid_clip.png with both runs, that a
caption starts from the same initial latents at every guidance scale (read at the first UNet /
Stage C call), and that generation resumes: only missing files are sampled, to the same pixels."""
import csv
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import paddle  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.clip import make_tiny_clip_text, make_tiny_clip_vision  # noqa: E402
from ldm.eval import sweep  # noqa: E402
from ldm.eval.clip_score import CLIP_TEXT_SUBDIR, CLIP_VISION_SUBDIR  # noqa: E402
from ldm.eval.inception import MODEL_NAME, InceptionV3  # noqa: E402
from ldm.weights import save_safetensors, weights_metadata  # noqa: E402
from scripts import evaluate  # noqa: E402
from sd_tiny import build_tiny_sd  # noqa: E402  (tests/ is on sys.path under pytest)

CAPTIONS = ["a red bus", "two cats", "a bowl of fruit"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    build_tiny_sd(str(d / "sd"), unet_weights=True)
    make_tiny_clip_text(d / "clip" / CLIP_TEXT_SUBDIR)
    make_tiny_clip_vision(d / "clip" / CLIP_VISION_SUBDIR)
    paddle.seed(0)
    save_safetensors(InceptionV3().initialize_weights().state_dict(), str(d / "inception_fid.safetensors"),
                     metadata=weights_metadata(MODEL_NAME))
    rng = np.random.default_rng(0)
    (d / "ref").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / "ref" / f"{i}.png")
    with open(d / "captions.tsv", "w", encoding="utf-8") as f:
        f.write("id\tcaption_en\n" + "".join(f"{i}\t{c}\n" for i, c in enumerate(CAPTIONS)))
    return d


class Spy:
    """Wraps a generator: records, for each call, the captions, the scale and the initial latents
    (the first positional input of the first call of `net` during that call)."""

    def __init__(self, generator, net):
        self.generator, self.calls, self._first = generator, [], None
        net.register_forward_pre_hook(self._hook)

    def _hook(self, layer, inputs):
        if self._first is None:
            self._first = inputs[0].numpy().copy()

    def __call__(self, captions, seed, guidance_scale):
        self._first = None
        out = self.generator(captions, seed, guidance_scale)
        self.calls.append((list(captions), guidance_scale, self._first[:len(captions)]))
        return out

    def describe(self):
        return self.generator.describe()


@pytest.fixture
def spies(monkeypatch):
    made = []
    real = evaluate.build_generator

    def build(args):
        g = real(args)
        net = g.unet if args.family == "sd" else g.model_c.components.get("stage_c")
        made.append(Spy(g, net))
        return made[-1]

    monkeypatch.setattr(evaluate, "build_generator", build)
    return made


def _common(d, out):
    return ["--captions", str(d / "captions.tsv"), "--reference", str(d / "ref"), "--inception",
            str(d / "inception_fid.safetensors"), "--clip_dir", str(d / "clip"), "--output_dir", str(out),
            "--batch_size", "2", "--seed", "7", "--no_progress"]


def _latents_by_caption(calls):
    seen = {}
    for captions, g, latents in calls:
        for c, x in zip(captions, latents):
            seen.setdefault(c, {})[g] = x
    return seen


def _check_same_latents(calls, scales):
    seen = _latents_by_caption(calls)
    assert sorted(seen) == sorted(CAPTIONS)
    for c, by_scale in seen.items():
        assert sorted(by_scale) == sorted(scales)
        first = by_scale[scales[0]]
        for g in scales[1:]:
            np.testing.assert_array_equal(by_scale[g], first)
    assert not np.allclose(seen[CAPTIONS[0]][scales[0]], seen[CAPTIONS[2]][scales[0]])


def test_evaluate_sd_and_cascade(files, spies, tmp_path):
    d, out = files, tmp_path / "eval"
    sd = ["--family", "sd", "--pretrained_model_name_or_path", str(d / "sd"), "--height", "16", "--width", "16",
          "--guidance_scales", "1", "3", "--run_name", "tiny-sd", *_common(d, out)]
    sd_points = evaluate.main([*sd, "--num_inference_steps", "2"])
    sd_spy = spies[0]
    assert [(c, g) for c, g, _ in sd_spy.calls] == [(CAPTIONS[:2], 1.0), (CAPTIONS[2:], 1.0), (CAPTIONS[:2], 3.0),
                                                    (CAPTIONS[2:], 3.0)]  # batches of consecutive captions
    _check_same_latents(sd_spy.calls, [1.0, 3.0])
    for g in ("g1", "g3"):
        names = sorted(os.listdir(out / "tiny-sd" / g))
        assert names == ["00000.png", "00001.png", "00002.png"]
        im = Image.open(out / "tiny-sd" / g / "00002.png")
        assert im.size == (16, 16) and im.text["caption"] == CAPTIONS[2] and im.text["seed"] == "9"
    assert [p["guidance_scale"] for p in sd_points] == [1.0, 3.0]
    for p in sd_points:
        assert np.isfinite(p["fid"]) and p["fid"] > 0 and 0.0 <= p["clip_score"] <= 100.0 and p["num_images"] == 3
    assert os.path.exists(out / "reference_ref.npz")  # the reference folder's statistics, cached

    cascade_points = evaluate.main(["--family", "cascade", "--preset", "tiny", "--height", "64", "--width", "64",
                                    "--steps_c", "2", "--steps_b", "2", "--guidance_scales", "2", "4",
                                    "--run_name", "tiny-cascade", *_common(d, out)])
    _check_same_latents(spies[1].calls, [2.0, 4.0])
    assert Image.open(out / "tiny-cascade" / "g4" / "00000.png").size == (64, 64)
    assert len(cascade_points) == 2

    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == ["tiny-cascade", "tiny-sd"]
    assert results["runs"]["tiny-sd"]["points"] == sd_points
    assert results["runs"]["tiny-cascade"]["settings"]["family"] == "cascade"
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [(r["run"], float(r["guidance_scale"])) for r in rows] == [
        ("tiny-sd", 1.0), ("tiny-sd", 3.0), ("tiny-cascade", 2.0), ("tiny-cascade", 4.0)]
    assert float(rows[0]["fid"]) == pytest.approx(sd_points[0]["fid"])
    with Image.open(out / "fid_clip.png") as plot:
        assert plot.format == "PNG" and plot.size[0] >= 400

    # resume: only the missing file is sampled, to the same pixels; the others are kept untouched
    missing = out / "tiny-sd" / "g3" / "00001.png"
    before = np.asarray(Image.open(missing))
    kept_mtime = os.path.getmtime(out / "tiny-sd" / "g3" / "00000.png")
    os.remove(missing)
    sd_spy.calls.clear()
    n = sweep.generate_missing(sd_spy, CAPTIONS, [1.0, 3.0], out / "tiny-sd", seed=7, batch_size=2, progress=False)
    assert n == 1 and [(c, g) for c, g, _ in sd_spy.calls] == [([CAPTIONS[1]], 3.0)]
    np.testing.assert_array_equal(np.asarray(Image.open(missing)), before)
    assert os.path.getmtime(out / "tiny-sd" / "g3" / "00000.png") == kept_mtime
    # the kept images of a run are never mixed with images of other settings
    with pytest.raises(ValueError, match=r"other settings \(num_inference_steps: \[2\] -> \[3\]\)"):
        evaluate.main([*sd, "--num_inference_steps", "3"])


def test_read_captions(tmp_path):
    (tmp_path / "a.csv").write_text('caption,x\n"a, quoted caption",1\nsecond,2\n', encoding="utf-8")
    assert sweep.read_captions(tmp_path / "a.csv") == ["a, quoted caption", "second"]
    (tmp_path / "b.jsonl").write_text('{"caption": "one"}\n\n"two"\n{"caption_en": "three", "caption": "no"}\n',
                                      encoding="utf-8")
    assert sweep.read_captions(tmp_path / "b.jsonl") == ["one", "two", "three"]
    (tmp_path / "c.txt").write_text("first\n\n  second  \nthird\n", encoding="utf-8")
    assert sweep.read_captions(tmp_path / "c.txt", limit=2) == ["first", "second"]
    (tmp_path / "d.tsv").write_text("id\ttext\n0\thello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="caption_en or caption"):
        sweep.read_captions(tmp_path / "d.tsv")


def test_image_sources(tmp_path):
    """Reference images from a folder and from LAION part files (through a .filelist), with the
    optional short-side resize + centre crop; undecodable records are skipped."""
    import base64
    import io

    from ldm.eval.images import count_images, iter_images

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (24 + 8 * i, 40, 3), dtype=np.uint8) for i in range(3)]
    (tmp_path / "dir").mkdir()
    lines = []
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / "dir" / f"{i}.png")
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        lines.append(f"caption {i}\tx\t{base64.b64encode(buf.getvalue()).decode()}\n")
    lines.insert(1, "broken\tx\tnot-base64!\n")
    (tmp_path / "part-00000").write_text("".join(lines), encoding="utf-8")
    (tmp_path / "data.filelist").write_text(str(tmp_path / "part-00000") + "\n", encoding="utf-8")
    for source in (tmp_path / "dir", tmp_path / "data.filelist"):
        got = list(iter_images(source))
        assert len(got) == 3 and all(np.array_equal(g, a) for g, a in zip(got, arrays))
        cropped = list(iter_images(source, resolution=16, limit=2))
        assert [c.shape for c in cropped] == [(16, 16, 3)] * 2
    assert count_images(tmp_path / "dir", limit=2) == 2 and count_images(tmp_path / "data.filelist") is None
    with pytest.raises(FileNotFoundError):
        list(iter_images(tmp_path / "nothing"))


def test_evaluate_sd_from_component_folders(files, tmp_path):
    """--family sd without a pipeline folder: a training checkpoint folder (its unet/) + --vae_path
    + --text_encoder_path + --tokenizer_path + --scheduler_path give the pipeline folder's images."""
    import shutil

    d = files
    ckpt, te_only = tmp_path / "checkpoint-5", tmp_path / "elsewhere" / "text_encoder"
    shutil.copytree(d / "sd" / "unet", ckpt / "unet")
    shutil.copytree(d / "sd" / "text_encoder", te_only)  # no tokenizer/ beside it
    run = ["--family", "sd", "--height", "16", "--width", "16", "--num_inference_steps", "2", "--guidance_scales", "3",
           "--num_images", "2", "--run_name", "r", *_common(d, tmp_path / "x")]
    out = {o: ["--output_dir", str(tmp_path / o)] for o in ("pipe", "parts")}  # the last --output_dir wins
    base = evaluate.main([*run, *out["pipe"], "--pretrained_model_name_or_path", str(d / "sd")])
    parts = ["--unet_path", str(ckpt), "--vae_path", str(d / "sd" / "vae"), "--text_encoder_path", str(te_only),
             "--scheduler_path", str(d / "sd" / "scheduler")]
    with pytest.raises(ValueError, match="--tokenizer_path"):
        evaluate.main([*run, *out["parts"], *parts])
    points = evaluate.main([*run, *out["parts"], *parts, "--tokenizer_path", str(d / "sd" / "tokenizer")])
    for k in range(2):
        a, b = (np.asarray(Image.open(tmp_path / o / "r" / "g3" / f"{k:05d}.png")) for o in ("pipe", "parts"))
        np.testing.assert_array_equal(a, b)
    assert points[0]["fid"] == pytest.approx(base[0]["fid"], rel=1e-6)
    assert points[0]["clip_score"] == pytest.approx(base[0]["clip_score"], rel=1e-6)
    settings = json.loads((tmp_path / "parts" / "r" / "settings.json").read_text())
    assert settings["source"]["pretrained"] is None and settings["source"]["unet"] == str(ckpt)
    with pytest.raises(SystemExit):  # no pipeline folder and no VAE folder: refused up front
        evaluate.parse_args([*run, "--unet_path", str(ckpt), "--text_encoder_path", str(te_only)])


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    """No matplotlib: a warning naming it and the missing plot, no traceback; JSON / CSV unaffected."""
    import sys

    warned = []
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(sweep.logger, "warning", lambda msg, *a: warned.append(msg % a))
    results = {"runs": {"r": {"settings": {"family": "sd"},
                              "points": [{"guidance_scale": 3.0, "fid": 10.0, "clip_score": 20.0, "num_images": 2}]}}}
    assert sweep.plot_runs(tmp_path, results) is None
    assert len(warned) == 1 and "matplotlib is not installed" in warned[0] and sweep.RESULTS_PLOT in warned[0]
    assert not (tmp_path / sweep.RESULTS_PLOT).exists()
    assert os.path.exists(sweep.write_table(tmp_path, results))
