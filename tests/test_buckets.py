"""Multi-aspect buckets (issue 11 section 3): ldm.data.buckets + the folder dataset + the Trainer.

- bucket sizes keep about resolution^2 pixels, sides multiples of 32 (Stage C) / 64 (Stage B),
  both orientations; an image goes to its nearest ratio; `1` turns buckets off;
- the sampler over 2 simulated ranks: every batch has one shape, each image once per epoch,
  disjoint ranks, equal batch counts (also with uneven buckets: padded, no hang);
- resume (`start_at`) continues the same bucket order;
- a tiny Stage C run on mixed-size JPEGs trains with buckets (one shape per batch).
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldm.data.buckets import (OFFICIAL_ASPECT_RATIOS, AspectBuckets, BucketBatchSampler,  # noqa: E402
                              parse_aspect_ratios)
from ldm.data.transforms import normalize_pixels  # noqa: E402

SIZES = [(96, 64), (64, 96), (64, 64), (128, 48)]  # (w, h) of the test images, cycled


class _Sized:
    """A dataset stand-in: just its length and epoch."""

    def __init__(self, n):
        self.n, self.epoch = n, None

    def __len__(self):
        return self.n

    def set_epoch(self, e):
        self.epoch = e


def _write_images(folder, n, sizes=SIZES):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.new("RGB", (w, h), (40 * (i % 6), 255 - 30 * (i % 8), 90)).save(folder / f"{i:03d}.jpg")
        (folder / f"{i:03d}.txt").write_text(f"image {i}", encoding="utf-8")
    return folder


def test_parse_and_sizes():
    assert parse_aspect_ratios("1") is None and parse_aspect_ratios(["1"]) is None and parse_aspect_ratios([]) is None
    assert parse_aspect_ratios(["1/1", "2/3", "0.75", "9/16"]) == (1.0, 2 / 3, 0.75, 9 / 16)
    assert parse_aspect_ratios("1/1,3/4") == (1.0, 0.75)
    for bad in (["0"], ["x"], ["3/0"], ["-1/2"]):
        with pytest.raises(ValueError, match="multi_aspect_ratio"):
            parse_aspect_ratios(bad)
    ratios = parse_aspect_ratios(list(OFFICIAL_ASPECT_RATIOS))
    for res, m in ((768, 32), (1024, 64), (512, 32)):
        b = AspectBuckets(res, ratios, m)
        assert len(b.ratios) == 2 * len(ratios) - 1  # r and 1/r, 1/1 once
        for h, w in b.sizes:
            assert h % m == 0 and w % m == 0
            assert 0.75 * res * res <= h * w <= res * res  # about resolution^2 pixels, never more
        assert (res, res) in b.sizes and (b.sizes[b.ratios.index(0.5)][::-1] == b.sizes[b.ratios.index(2.0)])
    b = AspectBuckets(768, ratios, 32)
    assert b.assign(1920, 1080) == b.sizes[b.ratios.index(16 / 9)]  # landscape 16:9 -> w > h
    h, w = b.assign(1920, 1080)
    assert w > h and b.assign(1080, 1920) == (w, h)
    assert b.assign(500, 500) == (768, 768)
    with pytest.raises(ValueError, match="area"):
        AspectBuckets(16, ratios, 32)


def _epoch(samplers):
    return [list(s) for s in samplers]


@pytest.mark.parametrize("counts", [(8, 4, 12), (5, 3, 9, 1)])
def test_sampler_two_ranks(counts):
    sizes = [k for k, c in enumerate(counts) for _ in range(c)]
    n, bs = len(sizes), 2
    samplers = [BucketBatchSampler(_Sized(n), sizes, bs, num_replicas=2, rank=r, seed=7) for r in range(2)]
    assert len(samplers[0]) == len(samplers[1])
    for epoch in range(3):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = _epoch(samplers)
        assert [len(b) for b in per_rank] == [len(samplers[0])] * 2  # equal step counts: no hang
        seen = []
        for b0, b1 in zip(*per_rank):
            assert len(b0) == len(b1) == bs
            assert len({sizes[i] for i in b0 + b1}) == 1  # one bucket per (global) batch
            seen += b0 + b1
        if all(c % (2 * bs) == 0 for c in counts):
            assert sorted(seen) == list(range(n))  # each image exactly once per epoch, ranks disjoint
        else:
            assert set(seen) == set(range(n))  # every image at least once; only the pads repeat
            assert len(seen) == sum(-(-c // (2 * bs)) * 2 * bs for c in counts)
        assert samplers[0].dataset.epoch == epoch
    orders = []
    for epoch in (0, 1):
        samplers[0].set_epoch(epoch)
        orders.append(list(samplers[0]))
    assert orders[0] != orders[1]  # a fresh order every epoch
    other = BucketBatchSampler(_Sized(n), sizes, bs, num_replicas=2, rank=0, seed=8)
    assert list(other) != orders[0]  # --seed changes it


def test_sampler_drop_last_and_errors():
    sizes = [0] * 5 + [1] * 2
    s = BucketBatchSampler(_Sized(7), sizes, 2, num_replicas=2, rank=1, seed=0, drop_last=True)
    assert len(s) == 1 and all(sizes[i] == 0 for i in list(s)[0])
    with pytest.raises(ValueError, match="no bucket"):
        BucketBatchSampler(_Sized(3), [0, 1, 2], 2, num_replicas=2, rank=0, drop_last=True)
    with pytest.raises(ValueError, match="item sizes"):
        BucketBatchSampler(_Sized(4), [0, 1], 2)


def test_resume_continues_the_bucket_order():
    sizes = [k % 3 for k in range(30)]
    straight = BucketBatchSampler(_Sized(30), sizes, 2, num_replicas=2, rank=1, seed=5)
    full = []
    for epoch in range(3):
        straight.set_epoch(epoch)
        full.append(list(straight))
    resumed = BucketBatchSampler(_Sized(30), sizes, 2, num_replicas=2, rank=1, seed=5)
    resumed.start_at(1, 3)  # the Trainer's resume_position: 1 epoch + 3 batches done
    assert list(resumed) == full[1][3:] and resumed.dataset.epoch == 1
    resumed.set_epoch(1)  # the Trainer's next loop epoch
    assert list(resumed) == full[2]
    with pytest.raises(ValueError, match="cannot start"):
        resumed.start_at(0, len(resumed))


def test_folder_dataset_buckets(tmp_path):
    from ldm.data import DatasetSpec, build_dataset

    folder = _write_images(tmp_path / "d", 8)
    ratios = parse_aspect_ratios(list(OFFICIAL_ASPECT_RATIOS))
    ds = build_dataset(DatasetSpec("folder", str(folder), resolution=64, normalize="zero_one", center_crop=True,
                                   options={"multi_aspect_ratio": ratios, "size_multiple": 32}))
    buckets = AspectBuckets(64, ratios, 32)
    assert ds.item_sizes == [buckets.assign(*SIZES[i % 4]) for i in range(8)]
    assert len(set(ds.item_sizes)) == 4  # 3:2 landscape, 2:3 portrait, square, 8:3
    for i in range(8):  # the schema: uint8 [H, W, 3]; the step normalises to float32 [3, H, W]
        assert ds[i]["pixel_values"].dtype == np.uint8
        assert normalize_pixels(ds[i]["pixel_values"], "zero_one").shape == (3, *ds.item_sizes[i])
    plain = build_dataset(DatasetSpec("folder", str(folder), resolution=64, center_crop=True))
    assert plain.item_sizes is None and normalize_pixels(plain[0]["pixel_values"]).shape == (3, 64, 64)
    b64 = build_dataset(DatasetSpec("folder", str(folder), resolution=128, options={
        "multi_aspect_ratio": ratios, "size_multiple": 64}))
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in b64.item_sizes)


def test_exif_rotation_swaps_the_size(tmp_path):
    from PIL import Image

    from ldm.data.buckets import image_size

    img = Image.new("RGB", (96, 64))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed 64 x 96
    img.save(tmp_path / "r.jpg", exif=exif)
    assert image_size(str(tmp_path / "r.jpg")) == (64, 96)


def test_tiny_stage_c_run_trains_with_buckets(tmp_path):
    import ldm.train.stage_c as train_c
    from ldm.data.buckets import BucketBatchSampler as Sampler

    folder = _write_images(tmp_path / "d", 8)
    argv = ["--do_train", "--dataset_path", str(folder), "--output_dir", str(tmp_path / "o"), "--model_version", "tiny",
            "--resolution", "64", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_steps", "4",
            "--logging_steps", "1", "--seed", "3", "--report_to", "none", "--disable_tqdm", "True",
            "--image_logging_steps", "0", "--save_steps", "2", "--dataloader_num_workers", "0"]
    m, d, t = train_c.parse_stage_c_args(argv)
    assert tuple(d.multi_aspect_ratio) == OFFICIAL_ASPECT_RATIOS  # on by default
    trainer, task, ema = train_c.build_stage_c_trainer(m, d, t)
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.batch_sampler, Sampler)
    batches = list(loader)
    shapes = [tuple(b["pixel_values"].shape) for b in batches]
    assert len(shapes) == len(loader.batch_sampler) == 4 and len(set(shapes)) >= 2
    assert all(s[0] == 2 for s in shapes)
    seen = []
    orig_forward = task.forward

    def recording(pixel_values, caption, **kw):
        seen.append(tuple(pixel_values.shape))
        return orig_forward(pixel_values, caption, **kw)

    task.forward = recording
    trainer.fit(None, ema)
    assert len(seen) == 4 and len(set(seen)) >= 2
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    # resume from checkpoint-2 (2 of the epoch's 4 batches done): the loader continues the same bucket order
    resumed, _, _ = train_c.build_stage_c_trainer(m, d, t)
    resumed.args.resume_from_checkpoint = str(tmp_path / "o" / "checkpoint-2")
    assert [b["caption"] for b in resumed.get_train_dataloader()] == [b["caption"] for b in batches[2:]]
    off = train_c.parse_stage_c_args(argv[:-2] + ["--multi_aspect_ratio", "1", "--output_dir", str(tmp_path / "o2")])
    trainer2, _, _ = train_c.build_stage_c_trainer(*off)
    assert trainer2.train_dataset.item_sizes is None
    assert {tuple(normalize_pixels(b["pixel_values"]).shape) for b in trainer2.get_train_dataloader()} == {(2, 3, 64, 64)}


def test_tiny_stage_b_run_trains_with_64px_buckets(tmp_path):
    import ldm.train.stage_b as train_b

    folder = _write_images(tmp_path / "d", 4, sizes=[(192, 128), (128, 192)])
    m, d, t = train_b.parse_stage_b_args([
        "--do_train", "--dataset_path", str(folder), "--output_dir", str(tmp_path / "o"), "--model_version", "tiny",
        "--resolution", "128", "--per_device_train_batch_size", "1", "--learning_rate", "1e-3", "--max_steps", "2",
        "--logging_steps", "1", "--seed", "3", "--report_to", "none", "--disable_tqdm", "True",
        "--image_logging_steps", "0", "--save_steps", "100"])
    trainer, task, ema = train_b.build_stage_b_trainer(m, d, t)
    assert task.size_multiple == 64
    with pytest.raises(ValueError, match="multi_aspect_ratio"):
        train_b.parse_stage_b_args(["--output_dir", str(tmp_path / "x"), "--model_version", "tiny",
                                    "--multi_aspect_ratio", "3/0"])
    assert sorted(set(trainer.train_dataset.item_sizes)) == [(64, 128), (128, 64)]  # 3:2 and 2:3 at x64 sides
    trainer.fit(None, ema)
    assert trainer.state.global_step == 2
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def _worker(out, data):  # one rank of test_two_process_gloo_buckets (run by tests/two_rank_runs.py)
    import paddle

    import train_stage_c_trainer as script

    trainer = script.main([
        "--do_train", "--dataset_path", data, "--output_dir", os.path.join(out, "train"), "--model_version", "tiny",
        "--resolution", "64", "--per_device_train_batch_size", "1", "--max_steps", "4", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_steps", "100", "--seed", "7", "--report_to", "none", "--disable_tqdm", "True",
        "--image_logging_steps", "0", "--record_log_dir", os.path.join(out, "captions"),
    ])
    rank = paddle.distributed.get_rank()
    np.savez(os.path.join(out, f"params_rank{rank}.npz"),
             **{k: v.numpy() for k, v in trainer.model.stage_c.state_dict().items()})


def prepare_two_process(folder):  # the two_rank_runs job: worker arguments
    data = _write_images(Path(folder) / "d", 8)  # 4 buckets x 2 images: one epoch = 4 steps of 1 image per rank
    return [folder, str(data)]


def test_two_process_gloo_buckets(two_rank_runs):
    tmp_path = Path(two_rank_runs["stage_c_buckets"])
    caps = [(tmp_path / "captions" / f"rank{r}.txt").read_text(encoding="utf-8").splitlines() for r in (0, 1)]
    assert len(caps[0]) == len(caps[1]) == 4  # equal step counts
    assert not set(caps[0]) & set(caps[1]) and sorted(caps[0] + caps[1]) == sorted(f"image {i}" for i in range(8))
    for a, b in zip(caps[0], caps[1]):  # each step's two images (one per rank) share a bucket
        i, j = int(a.split()[1]), int(b.split()[1])
        assert i % 4 == j % 4
    p0, p1 = (np.load(tmp_path / f"params_rank{r}.npz") for r in (0, 1))
    assert all(np.array_equal(p0[k], p1[k]) for k in p0.files)
