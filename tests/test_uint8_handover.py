"""Issue 15 item 4: DataLoader workers hand over uint8 HWC pixels; the batch is normalised after
collation, where it lives (`ldm.data.transforms.normalize_pixels`, `TrainingTask.pixels`).

Parity: the uint8 path gives exactly the float32 CHW tensors of the float path it replaces (the
worker-side normalisation of `ImageTransform.__call__` before this change, reproduced below as
`_float_path` and patched into the very same datasets, so crops, flips and random draws are
shared), for the "folder" and "laion" kinds, with and without flip, at the resolutions and
aspect buckets the recipes use (Stage C 768 / 32 px buckets, Stage B 1024 / 64 px buckets, SD
256 / 512, the tiny 64 / 128), in both ranges, in-process and through DataLoader workers.
"""
import io
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from laion_fixtures import record, write_part
from ldm.data import DatasetSpec, build_dataset, collate
from ldm.data import transforms
from ldm.data.buckets import OFFICIAL_ASPECT_RATIOS, parse_aspect_ratios
from ldm.data.transforms import ImageTransform, normalize_pixels
from ldm.train.task import TrainingTask

SIZES = [(96, 64), (64, 96), (80, 80), (200, 75), (51, 170)]  # (w, h): several aspect buckets, up- and downscales


def _float_path(self, img, rng=None):
    """ImageTransform.__call__ as it was (float32 CHW made in the worker): the same geometry, then
    ``out.transpose(2, 0, 1).astype(float32); *= 1 / 127.5; -= 1`` (or ``*= 1 / 255``)."""
    x = self._as_input(img)
    out = self._geometry_array(x, rng) if isinstance(x, np.ndarray) else np.asarray(self._geometry_pil(x, rng), np.uint8)
    arr = out.transpose(2, 0, 1).astype(np.float32)
    if self.normalize == "minus_one_one":
        arr *= 1.0 / 127.5
        arr -= 1.0
    else:
        arr *= 1.0 / 255.0
    return arr


def _photo(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 127 + 60 * (np.sin(xx / (3 + seed % 5)) * np.cos(yy / 7))[..., None]
    arr = base + rng.normal(0, 25, (h, w, 3))  # sharp noise: every resize / crop / flip difference shows
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _jpeg(img, quality=92):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _folder(root, sizes=SIZES):
    os.makedirs(root, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        with open(os.path.join(root, f"{i:02d}.jpg"), "wb") as f:
            f.write(_jpeg(_photo(w, h, i)))
        with open(os.path.join(root, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"image {i}")
    return str(root)


def _Task(normalize):  # noqa: N802 - builds a task
    """The smallest task in range `normalize`: just the base's `pixels` (what every recipe's step calls)."""
    return type("PixelTask", (TrainingTask,), {"pixel_normalize": normalize})()


def _both(monkeypatch, make, read):
    """(uint8 samples, float samples of the old path) read by `read(make())` twice."""
    new = read(make())
    with monkeypatch.context() as m:
        m.setattr(ImageTransform, "__call__", _float_path)
        old = read(make())
    return new, old


def _assert_parity(new, old, normalize):
    assert [s["caption"] for s in new] == [s["caption"] for s in old]
    task = _Task(normalize)
    for s, r in zip(new, old):
        px = s["pixel_values"]
        assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[-1] == 3 and px.flags.c_contiguous
        assert r["pixel_values"].dtype == np.float32 and r["pixel_values"].shape == (3, *px.shape[:2])
        np.testing.assert_array_equal(normalize_pixels(px, normalize), r["pixel_values"])  # numpy, per sample
    # the trainers' way: collate (workers) -> paddle Tensor -> normalise where the batch lives
    by_shape = {}
    for s, r in zip(new, old):
        by_shape.setdefault(s["pixel_values"].shape, []).append((s, r))
    for pairs in by_shape.values():
        batch = collate([s for s, _ in pairs])
        assert batch["pixel_values"].dtype == np.uint8
        got = task.pixels(paddle.to_tensor(batch["pixel_values"]))
        assert got.dtype == paddle.float32
        want = np.stack([r["pixel_values"] for _, r in pairs])
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got.numpy(), want)  # in fact bit-exact


# ----------------------------------------------------------------------------------- folder kind
FOLDER_CASES = [  # (resolution, size_multiple or None, normalize, epochs): the tiny tests, plain and bucketed
    (64, None, "zero_one", 2), (64, 32, "zero_one", 2), (128, 64, "zero_one", 2), ((48, 80), None, "minus_one_one", 2),
]
LARGE_CASES = [  # Stage C (768, 32 px buckets) and Stage B (1024, 64 px buckets) at their default sizes
    (768, 32, "zero_one", 1, False, True), (768, 32, "zero_one", 1, True, False),
    (1024, 64, "zero_one", 1, True, True), (1024, 64, "zero_one", 1, False, False),
]


def _folder_parity(tmp_path, monkeypatch, resolution, multiple, normalize, epochs, flip, center_crop):
    root = _folder(tmp_path / "d")
    options = {"multi_aspect_ratio": parse_aspect_ratios(list(OFFICIAL_ASPECT_RATIOS)), "size_multiple": multiple} \
        if multiple else {}
    spec = DatasetSpec("folder", root, resolution=resolution, normalize=normalize, center_crop=center_crop,
                       random_flip=flip, seed=11, options=options)

    def read(ds):
        out = []
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            out += [ds[i] for i in range(len(ds))]
        return out

    new, old = _both(monkeypatch, lambda: build_dataset(spec), read)
    if multiple:
        assert len({s["pixel_values"].shape for s in new}) >= 3  # several buckets really used
    _assert_parity(new, old, normalize)


@pytest.mark.parametrize("resolution,multiple,normalize,epochs", FOLDER_CASES)
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("center_crop", [True, False])
def test_folder_kind_uint8_equals_float_path(tmp_path, monkeypatch, resolution, multiple, normalize, epochs, flip,
                                             center_crop):
    _folder_parity(tmp_path, monkeypatch, resolution, multiple, normalize, epochs, flip, center_crop)


@pytest.mark.parametrize("resolution,multiple,normalize,epochs,flip,center_crop", LARGE_CASES)
def test_folder_kind_uint8_equals_float_path_at_recipe_sizes(tmp_path, monkeypatch, resolution, multiple, normalize,
                                                             epochs, flip, center_crop):
    _folder_parity(tmp_path, monkeypatch, resolution, multiple, normalize, epochs, flip, center_crop)


def test_folder_kind_through_dataloader_workers(tmp_path, monkeypatch):
    root = _folder(tmp_path / "d", SIZES * 2)
    spec = DatasetSpec("folder", root, resolution=64, normalize="zero_one", random_flip=True, seed=3)
    ds = build_dataset(spec)
    loader = paddle.io.DataLoader(ds, batch_size=5, shuffle=False, num_workers=2, collate_fn=collate)
    batches = list(loader)
    with monkeypatch.context() as m:
        m.setattr(ImageTransform, "__call__", _float_path)
        ref = [ds[i]["pixel_values"] for i in range(len(ds))]
    task = _Task("zero_one")
    got = np.concatenate([task.pixels(b["pixel_values"]).numpy() for b in batches])
    assert all(str(b["pixel_values"].dtype).endswith("uint8") for b in batches)
    np.testing.assert_array_equal(got, np.stack(ref))


# ----------------------------------------------------------------------------------- laion kind
def _laion_part(tmp_path, n=6):
    sizes = [(640, 480), (480, 640), (300, 200), (700, 700), (256, 300), (120, 90)]  # reduced-scale decodes too
    recs = [record(f"photo {i}", _jpeg(_photo(*sizes[i % len(sizes)], 20 + i))) for i in range(n)]
    return write_part(tmp_path / "part-00001", recs)


@pytest.mark.parametrize("resolution,normalize", [(64, "zero_one"), (64, "minus_one_one"), (256, "minus_one_one"),
                                                  (512, "minus_one_one")])  # tiny recipe, SD v1 256 and 512
@pytest.mark.parametrize("flip,center_crop", [(False, True), (True, True), (True, False), (False, False)])
def test_laion_kind_uint8_equals_float_path(tmp_path, monkeypatch, resolution, flip, center_crop, normalize):
    part = _laion_part(tmp_path)
    spec = DatasetSpec("laion", part, resolution=resolution, normalize=normalize, center_crop=center_crop,
                       random_flip=flip, seed=5, options={"infinite": False, "shuffle_buffer": 3})
    new, old = _both(monkeypatch, lambda: build_dataset(spec, rank=0, world_size=1),
                     lambda ds: [s for w in range(2) for s in ds.iter_consumer(w, 2, epoch=1)])
    assert len(new) == 6
    _assert_parity(new, old, normalize)


def test_laion_kind_through_dataloader_workers(tmp_path, monkeypatch):
    part = _laion_part(tmp_path, 8)
    spec = DatasetSpec("laion", part, resolution=64, random_flip=True, seed=2, options={"infinite": False})
    ds = build_dataset(spec, rank=0, world_size=1)
    loader = paddle.io.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    task = _Task("minus_one_one")
    got = {}
    for b in loader:
        assert str(b["pixel_values"].dtype).endswith("uint8")
        for c, x in zip(b["caption"], task.pixels(b["pixel_values"]).numpy()):
            got[c] = x
    with monkeypatch.context() as m:
        m.setattr(ImageTransform, "__call__", _float_path)
        ref = {s["caption"]: s["pixel_values"] for w in range(2) for s in ds.iter_consumer(w, 2)}
    assert sorted(got) == sorted(ref) and len(ref) == 8
    for c in ref:
        np.testing.assert_array_equal(got[c], ref[c])


# ----------------------------------------------------------------------------------- the helpers
def test_normalize_pixels_every_value_both_ranges():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 1, 256, 1).repeat(3, axis=3)  # [1, 1, 256, 3]
    for mode, want in (("minus_one_one", np.arange(256) / 127.5 - 1), ("zero_one", np.arange(256) / 255)):
        a = normalize_pixels(u8, mode)
        b = normalize_pixels(paddle.to_tensor(u8), mode)
        assert a.shape == (1, 3, 1, 256) and a.dtype == np.float32 and a.flags.c_contiguous
        assert isinstance(b, paddle.Tensor) and b.dtype == paddle.float32 and tuple(b.shape) == (1, 3, 1, 256)
        np.testing.assert_array_equal(a, b.numpy())
        np.testing.assert_allclose(a[0, 0, 0], want, atol=1e-6)
    assert normalize_pixels(u8[0], "zero_one").shape == (3, 1, 256)  # one sample [H, W, 3] -> [3, H, W]


def test_normalize_pixels_rejects_other_inputs():
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalize_pixels(np.zeros((2, 2, 3), np.uint8), "imagenet")
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(np.zeros((3, 2, 2), np.uint8))  # CHW is not the schema


def test_task_pixels_normalises_uint8_and_passes_normalised_floats():
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    sd, cascade = _Task("minus_one_one"), _Task("zero_one")
    np.testing.assert_array_equal(sd.pixels(x).numpy(), normalize_pixels(x, "minus_one_one"))
    np.testing.assert_array_equal(cascade.pixels(paddle.to_tensor(x)).numpy(), normalize_pixels(x, "zero_one"))
    f = paddle.rand([2, 3, 8, 6])
    assert cascade.pixels(f) is f and cascade.pixels(None) is None  # already normalised: unchanged
    with pytest.raises(ValueError, match="pixel_normalize"):
        _Task("imagenet")


def test_recipes_declare_their_range():
    from ldm.train.sd import SDTask
    from ldm.train.stage_b import StageBTask
    from ldm.train.stage_c import StageCTask, folder_spec

    assert SDTask.pixel_normalize == "minus_one_one"  # the VAE takes [-1, 1]
    assert StageCTask.pixel_normalize == StageBTask.pixel_normalize == "zero_one"  # EfficientNet, Stage A: [0, 1]

    class Args:
        dataset_path, resolution, center_crop, random_flip, skip_missing_captions, seed = ".", 64, True, False, False, 0
        multi_aspect_ratio = None

    assert folder_spec(StageBTask, Args, Args).normalize == "zero_one"


def test_flip_of_uint8_batch_is_flip_of_normalised_batch():
    """The encoder cache mirrors a collated uint8 [B, H, W, 3] batch on its W axis (ldm.data.cache)."""
    x = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(normalize_pixels(np.ascontiguousarray(x[:, :, ::-1]), "zero_one"),
                                  normalize_pixels(x, "zero_one")[..., ::-1])


def test_transform_returns_owned_uint8_hwc(monkeypatch):
    arr = np.asarray(_photo(64, 64, 1))  # exactly the target size: the crop is the whole input
    t = ImageTransform(64, center_crop=True)
    out = t(arr)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3) and out.flags.c_contiguous and out.flags.writeable
    assert not np.may_share_memory(out, arr)
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(t.normalized(arr), normalize_pixels(arr, "minus_one_one"))
    monkeypatch.setattr(transforms, "_cv2", None)  # the Pillow-only path
    pil_out = ImageTransform(32, random_flip=True)(_photo(50, 40, 2), np.random.default_rng(0))
    assert pil_out.dtype == np.uint8 and pil_out.shape == (32, 32, 3) and pil_out.flags.writeable
    assert ImageTransform(40, center_crop=True)(_photo(40, 40, 3)).flags.writeable  # Pillow crop of the whole image


_REUSE_SCRIPT = r"""
import json, sys
import numpy as np
from ldm.data import DatasetSpec, build_dataset, collate
from ldm.train import trainer

spec = DatasetSpec("laion", sys.argv[1], resolution=64, random_flip=True, seed=2, options={"infinite": True})
ref = build_dataset(spec, rank=0, world_size=1)
consumers = [ref.iter_consumer(0, 2), ref.iter_consumer(1, 2)]
expected = [np.stack([next(consumers[k % 2])["pixel_values"] for _ in range(2)]) for k in range(24)]


def run(n):  # the consumer keeps the 3 latest batches alive (workers go on filling reused buffers)
    bad, held = 0, []
    loader = trainer.TimedDataLoader(build_dataset(spec, rank=0, world_size=1), batch_size=2, num_workers=2,
                                     collate_fn=collate)
    for k, b in enumerate(loader):
        held.append((k, b["pixel_values"]))
        if len(held) > 3:
            j, px = held.pop(0)
            bad += not np.array_equal(px.numpy(), expected[j])
        if k + 1 == n:
            break
    return bad + sum(not np.array_equal(px.numpy(), expected[j]) for j, px in held)


first = run(24)
reused = trainer._shm_reuse_taken
second = run(12)  # a second iterator of the process: no reuse, the same batches
import paddle
print(json.dumps({"first_bad": first, "second_bad": second, "reused": reused,
                  "flag": paddle.get_flags(["FLAGS_use_shm_cache"])["FLAGS_use_shm_cache"]}))
"""


def test_trainer_loader_reuses_shared_memory_and_batches_stay_exact(tmp_path):
    """TimedDataLoader's shared-memory buffer reuse (the trainer's loader, 2 workers): every batch,
    read while the consumer still holds the 3 before it, equals the in-process consumers' batch;
    a second iterator of the same process (no reuse) too. A fresh process, as reuse is per process."""
    import json
    import subprocess
    import sys

    part = _laion_part(tmp_path, 8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT, str(part)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "open failed" not in done.stderr, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"first_bad": 0, "second_bad": 0, "reused": True, "flag": True}
