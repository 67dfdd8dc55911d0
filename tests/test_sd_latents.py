"""Precomputed SD latents (issue 15 item 5): scripts/precompute_latents.py stores VAE latent moments
+ CLIP text outputs of LAION part files in the encoder cache (ldm/data/cache.py, streams), and the
SD trainer trains from them with --latents_path.

- training from latents gives the losses of training from images (same seed and samples, fp32 CPU,
  centre crop, caption dropout on; without flips, and with flips drawn as the part-file reader
  draws them), without building the VAE and the text encoder;
- a stopped and resumed run from latents ends bit-identical to a straight one (0 and 2 DataLoader workers);
- caption dropout swaps in the stored empty caption's text outputs;
- the latent stream is read as the part files are: per (rank x worker) consumer the same records
  in the same order, each valid record once per pass, bad records counted by reason (3 parts and
  1 part, 2 ranks x 4 workers);
- tar shards (kind "tar") precompute the same way, a truncated shard counted as the tar reader counts it;
- latents of other encoders (VAE, tokenizer max length) or another resolution are refused with
  one error saying what differs; an unfinished pass is refused too.
"""
import importlib.util
import os
import shutil
import sys
import tarfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from sd_tiny import build_tiny_sd, write_images_jsonl

    from ldm.data.prepare import create_pretraining_data

    root = tmp_path_factory.mktemp("sdlat")
    build_tiny_sd(root / "m")
    jsonl = write_images_jsonl(str(root / "img"), n=12, size=24)
    res = create_pretraining_data(jsonl, str(root / "data"), per_part_file_num=4, progress=False)
    listing = res.filelist_list
    parts = sorted(p for p in os.listdir(root / "data" / "laion400m_format_data"))
    with open(root / "data" / "laion400m_format_data" / parts[1], "a", encoding="utf-8") as f:
        f.write("a bad record\tNONE\t!!not-base64!!\n")  # counted as bad_base64 by both paths
    precompute = _load("precompute_latents", "scripts/precompute_latents.py")
    assert precompute.main(_model_flags(root) + ["--file_list", str(listing), "--resolution", "16",
                                                 "--latents_path", str(root / "lat"), "--batch_size", "3"]) == 0
    return {"root": root, "listing": str(listing), "lat": str(root / "lat"),
            "part": str(root / "data" / "laion400m_format_data" / parts[0])}


def _model_flags(root, model="m"):
    return ["--pretrained_model_name_or_path", str(root / model), "--unet_name_or_path",
            str(root / "m" / "unet_config.json"), "--model_max_length", "16"]


def _argv(env, out, max_steps, *extra):
    return ["--do_train", "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--max_steps", str(max_steps), "--lr_scheduler_type", "constant", "--image_logging_steps", "0",
            "--logging_steps", "1", "--resolution", "16", "--save_steps", "2", "--seed", "23",
            "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--report_to", "none",
            "--caption_drop_prob", "0.5", *_model_flags(env["root"]), *extra]


def _with(argv, flag, value):
    """`argv` with the value of `flag` replaced."""
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def _train(argv):
    """(per-step losses, task, trainer) of a run through build_sd_trainer."""
    from ldm.train.sd import build_sd_trainer, parse_sd_args
    from ldm.train.trainer import run_training

    losses, box = [], {}

    def build(m, d, t, resume):
        trainer, task, ema = build_sd_trainer(m, d, t, resume)
        task.register_forward_post_hook(lambda layer, inputs, loss: losses.append(float(loss)))
        box["task"] = task
        return trainer, task, ema

    trainer = run_training(*parse_sd_args(argv), build=build)
    return losses, box["task"], trainer


@pytest.mark.parametrize("flip", [False, True])
def test_latents_give_the_losses_of_images(env, tmp_path, flip):
    lat, flags = env["lat"], ["--random_flip", str(flip)]
    if flip:  # both orientations stored; the flip drawn as the part-file reader draws it
        lat = str(tmp_path / "lat_flip")
        precompute = _load("precompute_latents", "scripts/precompute_latents.py")
        precompute.main(_model_flags(env["root"]) + ["--file_list", env["listing"], "--resolution", "16",
                                                     "--latents_path", lat, *flags])
    images, _, _ = _train(_argv(env, tmp_path / "img", 5, "--file_list", env["listing"], "--center_crop", "True",
                                "--record_log_dir", str(tmp_path / "rec_img"), *flags))
    latents, task, _ = _train(_argv(env, tmp_path / "lat", 5, "--latents_path", lat,
                                    "--record_log_dir", str(tmp_path / "rec_lat"), *flags))
    assert task.vae is None and task.text_encoder is None and task.tokenizer is None  # never loaded
    assert len(images) == 5
    np.testing.assert_allclose(latents, images, rtol=0, atol=1e-6)
    seen = [(tmp_path / f"rec_{k}" / "rank0.txt").read_text().splitlines() for k in ("img", "lat")]
    assert seen[0] == seen[1] and "" in seen[0] and len(seen[0]) == 10  # the same captions, some dropped


def _unet(folder):
    from ldm.weights import load_state_dict

    return load_state_dict(os.path.join(str(folder), "unet", "diffusion_paddle_model.safetensors"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_latents_is_exact(env, tmp_path, workers):
    def argv(out, steps):
        return _with(_argv(env, out, steps, "--latents_path", env["lat"], "--save_steps", "3",
                           "--record_log_dir", str(out) + "_rec"), "--dataloader_num_workers", str(workers))

    _train(argv(tmp_path / "straight", 6))
    _train(argv(tmp_path / "resumed", 3))
    _, _, trainer = _train(argv(tmp_path / "resumed", 6))
    assert trainer.state.global_step == 6
    seen = [(tmp_path / f"{k}_rec" / "rank0.txt").read_text().splitlines() for k in ("straight", "resumed")]
    assert len(seen[0]) == 12 and seen[0] == seen[1]  # steps 4-6 resumed (not 6 steps again) on the same records
    a, b = _unet(tmp_path / "straight"), _unet(tmp_path / "resumed")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_caption_dropout_uses_the_stored_empty_caption(env, tmp_path):
    import paddle

    from ldm.sd.loading import load_text_encoder, load_tokenizer
    from ldm.train.sd import SDEncoders

    m = env["root"] / "m"
    fresh = SDEncoders(None, load_text_encoder(str(m / "text_encoder")), load_tokenizer(str(m / "tokenizer"), 16))
    _, task, trainer = _train(_argv(env, tmp_path / "drop", 1, "--latents_path", env["lat"],
                                    "--caption_drop_prob", "1.0"))
    empty = task.cached_constants["clip_text"]
    np.testing.assert_allclose(empty, fresh.cache_constants()["clip_text"], rtol=0, atol=1e-6)
    seen = {}
    forward = task.unet.forward

    def capture(*a, **kw):
        seen["context"] = kw["encoder_hidden_states"].numpy()
        return forward(*a, **kw)

    task.unet.forward = capture
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"caption", "latent_mean", "latent_std", "clip_text"}
    assert not np.allclose(batch["clip_text"].numpy(), empty[None])
    task(**batch)
    assert task.last_captions == ["", ""]
    np.testing.assert_array_equal(seen["context"], np.broadcast_to(empty, seen["context"].shape))
    task.caption_dropout = 0.0
    task(**batch)
    np.testing.assert_array_equal(seen["context"], batch["clip_text"].numpy())
    assert isinstance(batch["latent_mean"], paddle.Tensor)


def _consumers(make, world, workers):
    """{(rank, worker): ([captions in order], stats)} of one pass of every consumer."""
    out = {}
    for rank in range(world):
        ds = make(rank)
        for w in range(workers):
            caps = [s["caption"] for s in ds.iter_consumer(w, workers, epoch=1)]
            out[(rank, w)] = (caps, (ds.stats.records, ds.stats.valid, dict(ds.stats.invalid)))
    return out


@pytest.mark.parametrize("which", ["listing", "part"])
def test_latent_stream_reads_like_the_part_files(env, tmp_path, which):
    from ldm.data import DatasetSpec, build_dataset
    from ldm.train.sd import latents_fingerprint, parse_precompute_args, precompute_latents

    source, lat = env[which], env["lat"]
    m, d, _ = parse_precompute_args(_model_flags(env["root"]) + ["--file_list", source, "--resolution", "16",
                                                                "--latents_path", str(tmp_path / "one")])
    fp = latents_fingerprint(m)
    if which == "part":  # one part file (4 records) for 2 ranks x 4 workers
        summary = precompute_latents(m, d, batch_size=2)
        assert (summary["parts"], summary["records"], summary["valid"], summary["invalid"]) == (1, 4, 4, {})
        lat = str(tmp_path / "one")
    opts = {"infinite": False, "shuffle_buffer": 3}

    def images(rank):
        return build_dataset(DatasetSpec("laion", source, resolution=16, center_crop=True, seed=5, options=opts),
                             rank=rank, world_size=2)

    def latents(rank):
        spec = DatasetSpec("cached", lat, resolution=16, center_crop=True, seed=5,
                           options={"source_kind": "laion", "fingerprint": fp, "source_options": opts})
        return build_dataset(spec, rank=rank, world_size=2)

    want, got = _consumers(images, 2, 4), _consumers(latents, 2, 4)
    assert got == want
    captions = [c for caps, _ in got.values() for c in caps]
    n = 4 if which == "part" else 12
    assert sorted(captions) == sorted(set(captions)) and len(captions) == n  # each valid record once
    assert sum(st[2].get("bad_base64", 0) for _, st in got.values()) == (which == "listing")
    sample = next(iter(latents(0).iter_consumer(0, 4, epoch=1)))
    assert sample["latent_mean"].shape[0] == 4 and sample["latent_std"].shape == sample["latent_mean"].shape
    assert sample["clip_text"].shape[0] == 16 and sample["latent_mean"].dtype == np.float32


def test_tar_shards_precompute_and_read_like_the_tars(env, tmp_path):
    from tar_fixtures import good_shards, truncate

    from ldm.data import DatasetSpec, build_dataset
    from ldm.train.sd import latents_fingerprint, parse_precompute_args, precompute_latents

    paths, _ = good_shards(tmp_path / "tars", [3, 4])
    with tarfile.open(paths[1]) as tar:
        last = tar.getmembers()[-1]
    truncate(paths[1], last.offset_data + 10)  # shard 1 ends inside its last member
    pattern = str(tmp_path / "tars" / "shard-{00000..00001}.tar")
    m, d, _ = parse_precompute_args(_model_flags(env["root"]) + ["--file_list", pattern, "--resolution", "16",
                                                                "--latents_path", str(tmp_path / "lat")])
    summary = precompute_latents(m, d, batch_size=4)
    assert summary["parts"] == 2 and summary["invalid"] == {"truncated_tar": 1}
    fp, opts = latents_fingerprint(m), {"infinite": False}
    want = _consumers(lambda r: build_dataset(DatasetSpec("tar", pattern, resolution=16, center_crop=True, seed=2,
                                                          options=opts), rank=r, world_size=1), 1, 2)
    got = _consumers(lambda r: build_dataset(DatasetSpec("cached", str(tmp_path / "lat"), resolution=16,
                                                         center_crop=True, seed=2,
                                                         options={"source_kind": "laion", "fingerprint": fp,
                                                                  "source_options": opts}), rank=r, world_size=1), 1, 2)
    assert got == want and sum(len(c) for c, _ in got.values()) == summary["valid"]


def test_other_encoders_or_settings_are_refused(env, tmp_path):
    from sd_tiny import build_tiny_sd

    from ldm.data.cache import EncoderCache

    other = env["root"] / "m_other_vae"
    if not other.exists():
        shutil.copytree(env["root"] / "m", other)
        shutil.rmtree(other / "vae")
        build_tiny_sd(tmp_path / "seed1", seed=1)
        shutil.copytree(tmp_path / "seed1" / "vae", other / "vae")
    argv = _argv(env, tmp_path / "x", 1, "--latents_path", env["lat"])
    with pytest.raises(ValueError, match=r"other encoders \(vae differ\)") as err:
        _train(_with(argv, "--pretrained_model_name_or_path", str(other)))
    assert "precompute_latents.py" in str(err.value)
    with pytest.raises(ValueError, match=r"other encoders \(model_max_length differ\)"):
        _train(_with(argv, "--model_max_length", "8"))
    with pytest.raises(ValueError, match=r"size \[16, 16\] \(this run: \[32, 32\]\)"):
        _train(_with(argv, "--resolution", "32"))
    # an unfinished pass (a part's shard missing from the index) is refused, naming the fix
    cut = tmp_path / "cut"
    shutil.copytree(env["lat"], cut)
    cache = EncoderCache(str(cut))
    (record,) = cache.streams.values()
    cache.prune([k for k in cache.entries if k != record["parts"][0]["key"]])
    with pytest.raises(ValueError, match="unfinished .*run scripts/precompute_latents.py again"):
        _train(_argv(env, tmp_path / "y", 1, "--latents_path", str(cut)))
