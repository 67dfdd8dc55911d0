"""Encoder cache (ldm/data/cache.py, --cache_dir of the Stage C and Stage B trainers; issue 11 section 4).

- a run from the cache gives the losses of the run without it (centre crop, no flip, fp32, same
  seed), Stage C and Stage B, and a complete cache builds none of the cached encoders;
- touching an image (its bytes, or only its mtime) gives it a new key: it is recomputed, the
  others are not; the cached dataset refuses an image that is not in the cache;
- random crops are refused with a message; random flips cache both orientations and the cached
  sample is the encoding of the folder kind's (flipped or not) pixels;
- caption dropout uses the cached empty caption.
"""
import os
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "demo_dataset")
sys.path.insert(0, ROOT)

import ldm.train.stage_b as train_b  # noqa: E402
import ldm.train.stage_c as train_c  # noqa: E402
from ldm.data import DatasetSpec, build_dataset  # noqa: E402
from ldm.data.cache import EncoderCache, cached_spec, missing_entries  # noqa: E402


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(DEMO, folder)
    return str(folder)


def argv(out, data, *extra):
    return ["--do_train", "--dataset_path", data, "--output_dir", str(out), "--model_version", "tiny",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_steps", "3",
            "--logging_steps", "1", "--seed", "3", "--report_to", "none", "--disable_tqdm", "True",
            "--image_logging_steps", "0", "--save_steps", "1000", "--multi_aspect_ratio", "1", *extra]


def run(stage, out, data, *extra):
    """(per-step losses, task) of a short run."""
    mod, parse, build = ((train_c, train_c.parse_stage_c_args, train_c.build_stage_c_trainer) if stage == "c" else
                         (train_b, train_b.parse_stage_b_args, train_b.build_stage_b_trainer))
    res = "64"
    m, d, t = parse(argv(out, data, "--resolution", res, *extra))
    trainer, task, _ = build(m, d, t)
    losses = []
    forward = task.forward

    def recording(*a, **kw):
        loss = forward(*a, **kw)
        losses.append(float(loss))
        return loss

    task.forward = recording
    trainer.train()
    return losses, task


@pytest.mark.parametrize("stage", ["c", "b"])
def test_cached_run_gives_the_same_losses(tmp_path, data, stage):
    plain, _ = run(stage, tmp_path / "plain", data, "--caption_dropout", "0.5")
    cache = str(tmp_path / "cache")
    first, task1 = run(stage, tmp_path / "first", data, "--caption_dropout", "0.5", "--cache_dir", cache)
    assert task1.effnet is None and task1.text_encoder is None  # dropped once the cache was filled
    again, task2 = run(stage, tmp_path / "again", data, "--caption_dropout", "0.5", "--cache_dir", cache)
    assert len(plain) == 3
    np.testing.assert_allclose(first, plain, rtol=0, atol=1e-6)
    np.testing.assert_allclose(again, plain, rtol=0, atol=1e-6)
    for name in task2.cache_encoders:  # a complete cache: the cached encoders were never built
        assert getattr(task2, name, None) is None, name


def _spec(data, cache, **kw):
    source = DatasetSpec("folder", data, resolution=64, normalize="zero_one", center_crop=True, seed=3,
                         options={"verify_images": False}, **kw)
    return cached_spec(source, cache, "fp")


def _fill(spec, calls):
    from ldm.data.cache import build_encoder_cache

    def images(x):
        calls.append(len(x))
        return {"latents": x[:, :, ::8, ::8].copy()}

    return build_encoder_cache(spec, images, lambda caps: {"text": np.array([[len(c)] for c in caps], np.float32)},
                               lambda: {"text": np.zeros([1], np.float32)}, batch_size=4)


def test_touching_an_image_invalidates_its_entry(tmp_path, data):
    spec = _spec(data, str(tmp_path / "cache"))
    calls = []
    _fill(spec, calls)
    n = len(build_dataset(spec))
    assert sum(calls) == n and missing_entries(spec) == 0
    first = build_dataset(spec)[0]["latents"]
    image = os.path.join(data, "0001.jpg")
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # mtime only
    assert missing_entries(spec) == 1
    with pytest.raises(ValueError, match="not in the encoder cache"):
        build_dataset(spec)
    calls.clear()
    _fill(spec, calls)
    assert calls == [1]  # only the touched image
    np.testing.assert_array_equal(build_dataset(spec)[0]["latents"], first)
    from PIL import Image

    Image.open(image).convert("RGB").transpose(Image.FLIP_TOP_BOTTOM).save(image)  # new bytes
    calls.clear()
    _fill(spec, calls)
    assert calls == [1]
    assert not np.array_equal(build_dataset(spec)[0]["latents"], first)
    old = len(EncoderCache(spec.path).entries)
    assert old == n + 1 + 2  # images + constants + the two superseded entries (ignored)


def test_random_crop_refused(tmp_path, data):
    spec = DatasetSpec("cached", str(tmp_path), resolution=64, center_crop=False,
                       options={"source_path": data, "fingerprint": "x"})
    with pytest.raises(ValueError, match="deterministic crop"):
        build_dataset(spec)
    m, d, t = train_c.parse_stage_c_args(argv(tmp_path / "o", data, "--resolution", "64", "--center_crop", "False",
                                              "--cache_dir", str(tmp_path / "c")))
    with pytest.raises(ValueError, match="--center_crop True"):
        train_c.build_stage_c_trainer(m, d, t)


def test_random_flip_caches_both_orientations(tmp_path, data):
    spec = _spec(data, str(tmp_path / "cache"), random_flip=True)
    _fill(spec, [])
    cached = build_dataset(spec)
    folder = build_dataset(DatasetSpec("folder", data, resolution=64, normalize="zero_one", center_crop=True,
                                       random_flip=True, seed=3))
    plain = build_dataset(DatasetSpec("folder", data, resolution=64, normalize="zero_one", center_crop=True, seed=3))
    flips = set()
    for epoch in range(3):
        cached.set_epoch(epoch)
        folder.set_epoch(epoch)
        for i in range(len(folder)):
            want = folder[i]["pixel_values"][:, ::8, ::8]
            np.testing.assert_array_equal(cached[i]["latents"], want)
            flips.add(not np.array_equal(want, plain[i]["pixel_values"][:, ::8, ::8]))
    assert flips == {True, False}  # both orientations were drawn


def test_bucketed_cache_keeps_item_sizes(tmp_path, data):
    source = DatasetSpec("folder", data, resolution=64, normalize="zero_one", center_crop=True, seed=3,
                         options={"verify_images": False, "multi_aspect_ratio": (1.0, 0.5, 2.0), "size_multiple": 32})
    spec = cached_spec(source, str(tmp_path / "cache"), "fp")
    _fill(spec, [])
    cached, folder = build_dataset(spec), build_dataset(source)
    assert cached.item_sizes == folder.item_sizes
    for i in range(len(folder)):
        np.testing.assert_array_equal(cached[i]["latents"], folder[i]["pixel_values"][:, ::8, ::8])
