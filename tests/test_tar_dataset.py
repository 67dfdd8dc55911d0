"""Tar shards (webdataset / img2dataset layout) as dataset kind "tar" (issue 15 item 1).

- sources: one tar, a folder, brace and shell patterns, a listing (weights), .tar.gz; the
  trainers' kind choice (`is_tar_source`);
- bad samples (no image, no caption, undecodable, non-UTF-8, bad json, a truncated shard) skipped
  and counted by reason, exactly, in shards written by webdataset's TarWriter and by hand
  (`check_tars` over rank x worker grids; scripts/check_data.py: tests/test_check_data.py);
- the shard x rank x worker grid (1 shard x 2 ranks x 4 workers included) reads every valid sample
  exactly once, also through a real DataLoader with 2 worker processes;
- a resumed stream continues at the right sample, mid-shard;
- the same samples (pixels, captions) as the LAION reader on the same images;
- a Stage C, a Stage B and an SD trainer run from tar shards.
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from laion_fixtures import image_bytes, record, write_filelist, write_part  # noqa: E402
from tar_fixtures import good_shards, members_of, sample, truncate, write_shard, write_shard_by_hand  # noqa: E402

from ldm.data import DatasetSpec, build_dataset  # noqa: E402
from ldm.data.laion import LaionDataError, LaionDataset  # noqa: E402
from ldm.data.tars import TarDataset, check_tars, expand_tar_source, is_tar_source, split_key  # noqa: E402


def _captions(ds, worker=0, num_workers=1, epoch=0):
    return [s["caption"] for s in ds.iter_consumer(worker, num_workers, epoch=epoch)]


def _ds(source, **kw):
    kw.setdefault("resolution", 8)
    kw.setdefault("infinite", False)
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    return TarDataset(str(source), **kw)


def test_split_key_follows_webdataset_names():
    assert split_key("000012.jpg") == ("000012", "jpg")
    assert split_key("a/b.seg.PNG") == ("a/b", "seg.png")
    assert split_key("README") == ("README", "")


def test_sources_and_kind_choice(tmp_path):
    paths, caps = good_shards(tmp_path / "shards", [3, 2, 4])
    want = sorted(caps)
    assert sorted(_captions(_ds(paths[0], shuffle_files=False))) == sorted(caps[:3])
    for source in (tmp_path / "shards", str(tmp_path / "shards" / "shard-{00000..00002}.tar"),
                   str(tmp_path / "shards" / "shard-*.tar")):
        assert is_tar_source(source)
        assert sorted(_captions(_ds(source))) == want
    listing = write_filelist(tmp_path / "tars.filelist", paths)
    nested = write_filelist(tmp_path / "tars.filelist.list", [f"{listing} 2"])
    for source in (listing, nested):
        assert is_tar_source(source)
        assert sorted(_captions(_ds(source))) == want
    assert [e.weight for e in expand_tar_source(nested)] == [2.0] * 3
    gz = write_shard_by_hand(tmp_path / "one.tar.gz", members_of([sample("k0", "gz caption")]), gz=True)
    assert is_tar_source(gz) and _captions(_ds(gz)) == ["gz caption"]
    # what stays a LAION file list or a caption folder
    part = write_part(tmp_path / "part-0", [record("laion", image_bytes())], gzipped=True)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes())
    (folder / "a.txt").write_text("a")
    write_shard(folder / "backup.tar", [sample("k", "k")])  # a stray tar: still a caption folder
    for other in (part, write_filelist(tmp_path / "parts.filelist", [part]), folder, tmp_path / "missing.tar"):
        assert not is_tar_source(other), other
    # the kinds through the one interface
    spec = DatasetSpec("tar", str(tmp_path / "shards"), resolution=8, options={"infinite": False})
    built = build_dataset(spec, rank=0, world_size=1)
    assert isinstance(built, TarDataset) and sorted(_captions(built)) == want
    with pytest.raises(ValueError, match="unknown option"):
        build_dataset(DatasetSpec("tar", str(paths[0]), options={"bogus": 1}))


def bad_shards(folder):
    """Shards with every bad case; returns (source folder, valid captions, expected counts)."""
    os.makedirs(folder, exist_ok=True)
    # webdataset's writer: 4 good samples, one of them captioned by .json only, one by a .png
    write_shard(folder / "a-00000.tar", [sample("a0", "a0"), sample("a1", "a1", as_json=True),
                                         sample("a2", "a2", ext="png"), sample("a3", "a3")])
    # by hand: no caption, undecodable, no image, non-UTF-8 caption, bad json, then a good one
    write_shard_by_hand(folder / "b-00000.tar", [
        ("b0.jpg", image_bytes(seed=1)), ("b0.txt", b"b0"),
        ("b1.jpg", image_bytes(seed=2)),                                  # no caption
        ("b2.jpg", b"this is no image at all"), ("b2.txt", b"b2"),        # undecodable
        ("b3.txt", b"b3"), ("b3.json", b'{"caption": "b3"}'),             # no image
        ("b4.jpg", image_bytes(seed=3)), ("b4.txt", b"\xff\xfe caption"),  # not UTF-8
        ("b5.jpg", image_bytes(seed=4)), ("b5.json", b"{not json"),       # bad json, no .txt
        ("b6.webp", image_bytes(seed=5, fmt="WEBP")), ("b6.txt", b"b6"),
    ])
    # truncated in the middle of sample c2's image: c0, c1 complete, the rest is one truncation
    c = write_shard(folder / "c-00000.tar", [sample(f"c{j}", f"c{j}", image=image_bytes(40, 40, seed=10 + j))
                                             for j in range(4)])
    offsets = {}
    import tarfile

    with tarfile.open(c) as t:
        for m in t.getmembers():
            offsets[m.name] = m.offset_data
    truncate(c, offsets["c2.jpg"] + 100)
    valid = ["a0", "a1", "a2", "a3", "b0", "b6", "c0", "c1"]
    counts = {"bad_json": 1, "no_caption": 1, "no_image": 1, "non_utf8": 1, "truncated_tar": 1, "undecodable": 1}
    return folder, valid, counts


def test_bad_samples_skipped_and_counted_by_reason(tmp_path):
    folder, valid, counts = bad_shards(tmp_path / "bad")
    ds = _ds(folder, shuffle_files=False)
    assert _captions(ds) == valid
    assert ds.stats.invalid == counts and ds.stats.valid == len(valid)
    assert ds.stats.records == len(valid) + sum(counts.values())
    assert ds.stats.first_example["no_caption"] == f"{folder / 'b-00000.tar'}:2"
    assert ds.stats.first_example["truncated_tar"] == f"{folder / 'c-00000.tar'}:3"
    for world, workers in ((1, 1), (2, 4), (3, 2)):
        rep = check_tars(str(folder), world_size=world, num_workers=workers, resolution=8)
        assert rep["valid"] == len(valid) and rep["records"] == len(valid) + sum(counts.values())
        assert {k: v["count"] for k, v in rep["invalid"].items()} == counts
        assert rep["invalid"]["undecodable"]["first"] == f"{folder / 'b-00000.tar'}:3"
        assert sum(c["valid"] for c in rep["per_consumer"]) == len(valid) and rep["shards"] == 3


@pytest.mark.parametrize("sizes", [[13], [5, 7], [3, 1, 4, 1, 5], [2] * 9])
def test_shard_rank_worker_grid_reads_every_sample_once(tmp_path, sizes):
    paths, caps = good_shards(tmp_path / "s", sizes)
    for world in (1, 2, 3):
        for workers in (1, 2, 4):
            got = []
            for rank in range(world):
                ds = _ds(tmp_path / "s", rank=rank, world_size=world, seed=5)
                for w in range(workers):
                    got += _captions(ds, w, workers, epoch=1)
            assert sorted(got) == sorted(caps), (sizes, world, workers)


def test_one_shard_two_ranks_four_workers_split_by_sample_index(tmp_path):
    paths, caps = good_shards(tmp_path / "s", [16])
    shares = {}
    for rank in range(2):
        ds = _ds(paths[0], rank=rank, world_size=2)
        for w in range(4):
            shares[(rank, w)] = _captions(ds, w, 4)
    assert all(len(v) == 2 for v in shares.values())  # 16 samples / 8 consumers
    assert sorted(sum(shares.values(), [])) == sorted(caps)
    assert shares[(0, 0)] == [caps[0], caps[8]] and shares[(1, 3)] == [caps[7], caps[15]]  # sample j -> consumer j % 8


def test_real_dataloader_two_workers_reads_each_sample_once(tmp_path):
    import paddle

    from ldm.data import collate

    paths, caps = good_shards(tmp_path / "s", [7])
    ds = _ds(paths[0])
    loader = paddle.io.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate)
    got = [c for batch in loader for c in batch["caption"]]
    assert sorted(got) == sorted(caps)


def test_resume_mid_shard_continues_at_the_right_sample(tmp_path):
    good_shards(tmp_path / "s", [9, 6])
    full = _ds(tmp_path / "s", seed=3, infinite=True)
    straight = list(zip(range(20), full.iter_consumer(0, 1)))
    for done_batches, batch_size in ((2, 2), (3, 3), (6, 2)):  # 4 (mid shard 1), 9 (shard boundary), 12 (mid shard 2)
        ds = _ds(tmp_path / "s", seed=3, infinite=True)
        ds.set_start(done_batches, batch_size)
        it = iter(ds)
        skip = done_batches * batch_size
        for k in range(5):
            s = next(it)
            want = straight[skip + k][1]
            assert s["caption"] == want["caption"], (done_batches, batch_size, k)
            assert np.array_equal(s["pixel_values"], want["pixel_values"])


def test_same_samples_as_the_laion_reader(tmp_path):
    imgs = [image_bytes(12, 10, seed=s) for s in range(6)]
    tar = write_shard(tmp_path / "x.tar", [sample(f"k{j}", f"cap {j}", image=imgs[j]) for j in range(6)])
    part = write_part(tmp_path / "part-0", [record(f"cap {j}", imgs[j]) for j in range(6)], gzipped=True)
    kw = dict(resolution=8, random_flip=True, seed=11, infinite=False, rank=1, world_size=2)
    a = list(TarDataset(tar, **kw).iter_consumer(1, 2))
    b = list(LaionDataset(part, **kw).iter_consumer(1, 2))
    assert [s["caption"] for s in a] == [s["caption"] for s in b] and len(a) == 1
    for x, y in zip(a, b):
        assert np.array_equal(x["pixel_values"], y["pixel_values"])


def test_bad_sources_name_the_file(tmp_path):
    paths, _ = good_shards(tmp_path / "s", [2])
    with pytest.raises(LaionDataError, match="shard-00001.tar"):
        _ds(str(tmp_path / "s" / "shard-{00000..00001}.tar"))
    with pytest.raises(LaionDataError, match="matches no file"):
        _ds(str(tmp_path / "s" / "none-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LaionDataError, match="holds no tar shard"):
        _ds(tmp_path / "empty")
    part = write_part(tmp_path / "part-0", [record("laion", image_bytes())], gzipped=True)
    mixed = write_filelist(tmp_path / "mixed.filelist", [paths[0], part])
    with pytest.raises(LaionDataError, match="part-0 is not a tar shard"):
        _ds(mixed)
    with pytest.raises(LaionDataError, match="kind 'tars?'"):
        LaionDataset(mixed, resolution=8)
    # a consumer without any valid sample stops with an error instead of spinning
    bad = write_shard_by_hand(tmp_path / "bad.tar", [("x.jpg", b"no image"), ("x.txt", b"x")])
    with pytest.raises(LaionDataError, match="no valid sample"):
        next(_ds(bad, infinite=True).iter_consumer())


def _load_script(rel):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _demo_shards(folder, n_shards=2):
    """The demo caption folder's images and captions as webdataset shards."""
    demo = os.path.join(ROOT, "assets", "demo_dataset")
    names = sorted(f for f in os.listdir(demo) if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))
    os.makedirs(folder, exist_ok=True)
    per = -(-len(names) // n_shards)
    for i in range(n_shards):
        samples = []
        for name in names[i * per:(i + 1) * per]:
            stem, ext = os.path.splitext(name)
            with open(os.path.join(demo, name), "rb") as f:
                image = f.read()
            with open(os.path.join(demo, stem + ".txt"), "rb") as f:
                caption = f.read()
            samples.append({"__key__": stem, ext[1:].lower(): image, "txt": caption})
        write_shard(os.path.join(folder, f"{i:05d}.tar"), samples)
    return len(names)


@pytest.mark.parametrize("stage", ["c", "b"])
def test_stage_c_and_b_trainers_run_from_tar_shards(tmp_path, stage):
    if stage == "c":
        import train_stage_c_trainer as script
    else:
        from scripts import train_stage_b_trainer as script

    _demo_shards(tmp_path / "shards")
    source = tmp_path / "shards" if stage == "c" else tmp_path / "shards" / "{00000..00001}.tar"
    argv = ["--do_train", "--dataset_path", str(source), "--output_dir", str(tmp_path / "out"),
            "--model_version", "tiny", "--resolution", "64", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "3", "--report_to", "none",
            "--disable_tqdm", "True", "--image_logging_steps", "0", "--max_steps", "2", "--save_steps", "100",
            "--dataloader_num_workers", "0"]
    trainer = script.main(argv)
    assert isinstance(trainer.train_dataset, TarDataset)
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_sd_trainer_runs_from_a_shard_pattern(tmp_path, monkeypatch):
    from ldm.sd.tiny import write_tiny_sd

    for k in ("FLAG_USE_EMA", "FLAG_RECOMPUTE", "FLAG_XFORMERS"):
        monkeypatch.delenv(k, raising=False)
    write_tiny_sd(tmp_path / "m")
    _demo_shards(tmp_path / "shards")
    train = _load_script("train_txt2img_laion400m_trainer.py")
    argv = ["--do_train", "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--max_steps", "2", "--lr_scheduler_type", "constant",
            "--image_logging_steps", "0", "--logging_steps", "1", "--resolution", "16", "--save_steps", "100",
            "--seed", "23", "--dataloader_num_workers", "0", "--pretrained_model_name_or_path", str(tmp_path / "m"),
            "--unet_name_or_path", str(tmp_path / "m" / "unet_config.json"),
            "--file_list", str(tmp_path / "shards" / "{00000..00001}.tar"), "--model_max_length", "16",
            "--disable_tqdm", "True", "--bf16", "False", "--use_ema", "False", "--report_to", "none"]
    trainer = train.main(argv)
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_stage_c_resume_from_tar_shards_continues_at_the_next_sample(tmp_path):
    """4 straight steps == 2 steps, then resumed from checkpoint-2 to 4: the same captions in the
    same order (--record_log_dir) and the same weights; 2 shards of 4 samples at batch 3, so the
    resumed stream starts mid-shard."""
    import train_stage_c_trainer as script

    from ldm.weights import load_state_dict

    _demo_shards(tmp_path / "shards")

    def argv(out, steps, *extra):
        return ["--do_train", "--dataset_path", str(tmp_path / "shards"), "--output_dir", str(out),
                "--model_version", "tiny", "--resolution", "64", "--per_device_train_batch_size", "3",
                "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--seed", "3",
                "--report_to", "none", "--disable_tqdm", "True", "--image_logging_steps", "0", "--max_steps",
                str(steps), "--save_steps", "2", "--dataloader_num_workers", "0", "--caption_dropout", "0",
                "--record_log_dir", str(out / "captions"), *extra]

    script.main(argv(tmp_path / "straight", 4))
    script.main(argv(tmp_path / "resumed", 2))
    script.main(argv(tmp_path / "resumed", 4, "--resume_from_checkpoint", str(tmp_path / "resumed" / "checkpoint-2")))
    a = (tmp_path / "straight" / "captions" / "rank0.txt").read_text().splitlines()
    b = (tmp_path / "resumed" / "captions" / "rank0.txt").read_text().splitlines()
    assert len(a) == 12 and a == b
    wa = load_state_dict(str(tmp_path / "straight" / "stage_c.safetensors"))
    wb = load_state_dict(str(tmp_path / "resumed" / "stage_c.safetensors"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_fewer_samples_than_consumers_stops_with_an_error_not_a_hang(tmp_path):
    paths, caps = good_shards(tmp_path / "s", [3])
    got = []
    for rank in range(2):
        ds = _ds(paths[0], rank=rank, world_size=2, infinite=True)
        for w in range(4):
            k = rank * 4 + w
            if k < 3:  # sample j goes to consumer j: consumers 0-2 get one each, forever
                it = ds.iter_consumer(w, 4)
                got += [next(it)["caption"], next(it)["caption"]]
            else:
                with pytest.raises(LaionDataError, match="no record fell to this consumer"):
                    next(ds.iter_consumer(w, 4))
    assert sorted(got) == sorted(caps * 2)
