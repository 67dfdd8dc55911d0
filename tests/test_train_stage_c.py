"""Stage C fine-tuning (train_stage_c_trainer.py) on the offline tiny preset, CPU, fp32.

- every flag of the seed's train.sh parses and reaches TrainingArguments; fp16 on CPU is refused;
- the training step follows the recipe (loss recomputed by hand from the same draws, P2 weight,
  5% empty captions, 10% image embeddings, frozen parts without gradients and in eval mode);
- gradient accumulation: the Trainer divides the loss once (same gradient norm for 2x1 and 1x2,
  the latter through a DataLoader worker process);
- resume: 3 steps + stop + resume to 6 == 6 straight steps (weights, EMA, adaptive buckets), and an
  interrupted newer checkpoint folder is skipped; checkpoints, VisualDL scalars and images exist;
- extracted weights load in ModelC and predict exactly like the trained network;
- the dataset pairs by name through the script; a missing caption names the image;
- recompute gives the same loss and gradients.
"""
import json
import os
import shutil
import sys

import numpy as np
import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "demo_dataset")
sys.path.insert(0, ROOT)

import train_stage_c_trainer as script  # noqa: E402
import ldm.train.stage_c as train_c  # noqa: E402

SEED_FLAGS = [  # the seed README's train.sh, values as written (USE_AMP=False, fp16_opt_level=O1)
    "--do_train", "--dataset_path", DEMO, "--per_device_train_batch_size", "1",
    "--gradient_accumulation_steps", "1", "--learning_rate", "1.0e-4", "--weight_decay", "0.01",
    "--max_grad_norm", "1.0", "--max_steps", "1000", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
    "--image_logging_steps", "1000000", "--logging_steps", "1", "--save_steps", "5000", "--save_total_limit", "50",
    "--seed", "1", "--dataloader_num_workers", "0", "--num_inference_steps", "200", "--model_max_length", "77",
    "--fp16", "False", "--fp16_opt_level=O1",
]


def tiny_argv(out, *extra):
    return ["--do_train", "--dataset_path", DEMO, "--output_dir", str(out), "--model_version", "tiny",
            "--resolution", "64", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--seed", "3", "--report_to", "none", "--disable_tqdm", "True",
            "--image_logging_steps", "0", "--multi_aspect_ratio", "1", *extra]  # square crops: numbers as before buckets


def stage_c_state(path):
    from ldm.weights import load_state_dict

    return load_state_dict(path)


def test_seed_flags_parse(tmp_path):
    argv = SEED_FLAGS + ["--output_dir", str(tmp_path), "--resolution", "768", "--bf16", "False", "--use_ema", "True",
                         "--recompute", "True", "--model_version", "3.6B", "--adaptive_loss_weight", "True",
                         "--resume_from_checkpoint", "auto", "--weights_path", "w", "--stage_c", "s.safetensors",
                         "--effnet", "e", "--previewer", "p", "--clip_text", "t", "--clip_image", "none",
                         "--lr_scheduler_type", "cosine", "--warmup_steps", "7"]
    m, d, t = train_c.parse_stage_c_args(argv)
    assert (t.learning_rate, t.weight_decay, t.max_grad_norm, t.max_steps) == (1e-4, 0.01, 1.0, 1000)
    assert (str(t.lr_scheduler_type.value if hasattr(t.lr_scheduler_type, "value") else t.lr_scheduler_type),
            t.warmup_steps) == ("cosine", 7)
    assert (t.image_logging_steps, t.save_steps, t.save_total_limit, t.seed) == (1000000, 5000, 50, 1)
    assert (t.fp16, t.fp16_opt_level, t.bf16, t.use_ema, t.recompute) == (False, "O1", False, True, True)
    assert (m.num_inference_steps, m.model_max_length, m.model_version, m.adaptive_loss_weight) == (200, 77, "3.6B", True)
    assert (m.weights_path, m.stage_c, m.effnet, m.previewer, m.clip_text, m.clip_image) == (
        "w", "s.safetensors", "e", "p", "t", "none")
    assert (d.dataset_path, d.resolution, t.resume_from_checkpoint) == (DEMO, 768, "auto")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train_c.parse_stage_c_args(SEED_FLAGS[:-2] + ["--fp16", "True", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="multiple of 32"):
        train_c.parse_stage_c_args(SEED_FLAGS + ["--output_dir", str(tmp_path), "--resolution", "100"])
    with pytest.raises(ValueError, match="model_version"):
        train_c.parse_stage_c_args(SEED_FLAGS + ["--output_dir", str(tmp_path), "--model_version", "2B"])


@pytest.fixture(scope="module")
def layer():
    from ldm.cascade.components import tiny_components

    paddle.seed(0)
    return train_c.StageCTask(tiny_components(), train_c.stage_c_config_of("tiny"), seed=5)


def test_training_step_recipe(layer):
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.random([3, 3, 64, 64], dtype=np.float32))
    caps = ["a red circle", "a blue square", "green hills"]
    state = layer.train_state()
    layer.stage_c.clear_gradients()
    loss = layer(x, caps)
    loss.backward()
    # recompute by hand from the same draws
    layer.set_train_state(state)
    keep = layer.rng.random(3) >= 0.05
    use = layer.rng.random(3) < 0.1
    t, eps = layer.draw([3, 16, 2, 2])
    from ldm.cascade.effnet import imagenet_normalize

    with paddle.no_grad():
        lat = layer.effnet(imagenet_normalize(x))  # (3, 16, 64/32, 64/32)
        assert lat.shape == [3, 16, 2, 2]
        text, pooled = layer.encode_captions([c if k else "" for c, k in zip(caps, keep)])
        img = layer.encode_images(x, use)
        d = layer.gdf.diffuse(lat, epsilon=eps, t=t)
        pred = layer.stage_c(d.noised, d.noise_cond, clip_text=text, clip_text_pooled=pooled, clip_img=img)
        snr = paddle.exp(d.logSNR)
        want = (((pred - eps) ** 2).mean(axis=[1, 2, 3]) / (1 + snr)).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    # frozen parts: no gradients, eval mode; Stage C trains
    assert all(p.stop_gradient and p.grad is None for m in layer.frozen for p in m.parameters())
    assert not any(m.training for m in layer.frozen) and layer.stage_c.training
    assert sum(p.grad is not None for p in layer.stage_c.parameters()) > 0
    layer.stage_c.clear_gradients()
    # probabilities of the recipe: 5% empty captions, 10% image embeddings (draws of 20000 samples)
    r = np.random.default_rng([1, 0, 0x5C])
    keep, use = r.random(20000) >= 0.05, r.random(20000) < 0.1
    assert abs(1 - keep.mean() - 0.05) < 0.01 and abs(use.mean() - 0.1) < 0.01
    img = layer.encode_images(x, np.array([True, False, False]))
    assert float(img[0].abs().sum()) > 0 and float(img[1:].abs().sum()) == 0
    layer.image_encoder, saved = None, layer.image_encoder
    assert float(layer.encode_images(x, np.array([True, True, True])).abs().sum()) == 0  # not configured: zeros
    layer.image_encoder = saved


def test_recompute_same_loss_and_grads(layer, monkeypatch):
    import paddle.distributed.fleet.utils as fleet_utils

    calls = []
    real = fleet_utils.recompute
    monkeypatch.setattr(fleet_utils, "recompute", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = paddle.to_tensor(np.random.default_rng(1).random([2, 3, 64, 64], dtype=np.float32))
    caps = ["a", "b"]
    for p in layer.stage_c.parameters():  # non-zero output layer so every block gets a gradient
        if not bool(p.abs().sum() > 0):
            p.set_value(paddle.full_like(p, 0.01))
    out = []
    for rc in (False, True):
        if rc:
            layer.enable_recompute()
        layer.set_train_state({"rng": np.random.default_rng(9).bit_generator.state})
        layer.stage_c.clear_gradients()
        loss = layer(x, caps)
        loss.backward()
        out.append((float(loss), {n: p.grad.numpy().copy() for n, p in layer.stage_c.named_parameters()}))
    layer.stage_c.enable_gradient_checkpointing(False)
    n_blocks = sum(len(level) for level in list(layer.stage_c.down_blocks) + list(layer.stage_c.up_blocks))
    assert len(calls) >= n_blocks  # every block ran under recompute (repeat mappers run some twice)
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for n, g in out[0][1].items():
        assert np.allclose(out[1][1][n], g, rtol=1e-4, atol=1e-7), (n, float(np.abs(out[1][1][n] - g).max()))
    layer.stage_c.clear_gradients()


def _grad_norm(tmp_path, name, bs, accum, workers=0):
    trainer = script.main(tiny_argv(tmp_path / name, "--per_device_train_batch_size", str(bs), "--gradient_accumulation_steps",
                                    str(accum), "--max_steps", "1", "--max_grad_norm", "0", "--caption_dropout", "0",
                                    "--image_embed_prob", "0", "--save_steps", "100",
                                    "--dataloader_num_workers", str(workers)))
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h][0]


def test_gradient_accumulation_divides_once(tmp_path, monkeypatch):
    counter = [0]

    def draw(self, shape):  # sample k of the run gets noise stream k, however it is batched
        eps = []
        for _ in range(shape[0]):
            eps.append(np.random.default_rng(counter[0]).standard_normal(shape[1:], dtype=np.float32))
            counter[0] += 1
        return paddle.full([shape[0]], 0.5, "float32"), paddle.to_tensor(np.stack(eps))

    monkeypatch.setattr(train_c.StageCTask, "draw", draw)
    g1 = _grad_norm(tmp_path, "a", 2, 1)
    counter[0] = 0
    g2 = _grad_norm(tmp_path, "b", 1, 2, workers=1)  # the Trainer divides each micro-batch loss by 2, once
    assert g1 > 0 and g2 == pytest.approx(g1, rel=1e-4)


def test_resume_equals_straight_run_and_skips_interrupted(tmp_path, monkeypatch):
    from paddlenlp.trainer import TrainerCallback

    common = ["--max_steps", "6", "--save_steps", "3", "--use_ema", "True", "--ema_decay", "0.5",
              "--adaptive_loss_weight", "True", "--lr_scheduler_type", "linear", "--warmup_steps", "2",
              "--save_total_limit", "1"]
    straight = tmp_path / "straight"
    script.main(tiny_argv(straight, *common, "--report_to", "visualdl", "--image_logging_steps", "3",
                          "--num_inference_steps", "2"))

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    from ldm.train import trainer as trainer_mod

    orig_init = trainer_mod.DiffusionTrainer.__init__

    def init_with_stop(self, *a, callbacks=None, **kw):
        orig_init(self, *a, callbacks=list(callbacks) + [StopAt3()], **kw)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(trainer_mod.DiffusionTrainer, "__init__", init_with_stop)
    script.main(tiny_argv(resumed, *common))
    monkeypatch.undo()
    ck3 = resumed / "checkpoint-3"
    assert (ck3 / "checkpoint_complete.json").is_file() and not (resumed / "checkpoint-6").exists()
    # a newer checkpoint interrupted mid-save: no marker, truncated weights -> must be skipped
    bad = resumed / "checkpoint-5"
    shutil.copytree(ck3, bad)
    os.remove(bad / "checkpoint_complete.json")
    with open(bad / train_c.STAGE_C_FILE, "r+b") as f:
        f.truncate(100)
    trainer = script.main(tiny_argv(resumed, *common))
    assert trainer.state.global_step == 6
    for name in (train_c.STAGE_C_FILE, train_c.STAGE_C_EMA_FILE):
        a, b = stage_c_state(straight / name), stage_c_state(resumed / name)
        assert sorted(a) == sorted(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), (name, k, float(np.abs(a[k] - b[k]).max()))
    ema, w = stage_c_state(straight / train_c.STAGE_C_EMA_FILE), stage_c_state(straight / train_c.STAGE_C_FILE)
    assert any(not np.array_equal(ema[k], w[k]) for k in w)  # EMA is its own average
    sa = json.load(open(straight / "checkpoint-6" / "train_c_state_rank0.json"))
    sb = json.load(open(resumed / "checkpoint-6" / "train_c_state_rank0.json"))
    assert sa == sb and min(sa["adaptive_loss"]["bucket_losses"]) < 1.0  # buckets updated and restored
    # checkpoints: save_total_limit 1 keeps only checkpoint-6 (complete) in the straight run
    assert [n for n in os.listdir(straight) if n.startswith("checkpoint-")] == ["checkpoint-6"]
    files = set(os.listdir(straight / "checkpoint-6"))
    assert {"stage_c.safetensors", "stage_c_ema.safetensors", "optimizer.safetensors", "scheduler.json",
            "rng_state_rank0.json", "trainer_state.json", "checkpoint_complete.json"} <= files
    assert not [n for n in files if n.endswith((".pdopt", ".pdparams", ".pth", ".bin"))], files  # nothing pickled
    # learning rate: linear warmup over 2 steps then linear decay to 0 at step 6
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[-3:] == pytest.approx([1e-3 * 2 / 4, 1e-3 * 1 / 4, 0.0], abs=1e-9)
    _check_visualdl(straight)
    _check_extract(tmp_path, straight, ema=True)


def test_resume_on_epoch_boundary_restores_rng_for_dropout(tmp_path, monkeypatch):
    """8 demo images at batch 2 = 4 steps per epoch: a checkpoint at step 4 sits on an epoch boundary,
    where PaddleNLP itself skips no batch and so never restores the RNG states. With dropout > 0 the
    resumed run must still equal the uninterrupted one bit for bit."""
    from paddlenlp.trainer import TrainerCallback

    from ldm.cascade import stage_c
    from ldm.train import trainer as trainer_mod

    tiny = stage_c.STAGE_C_PRESETS["tiny"].replace(dropout=(0.1, 0.1))
    monkeypatch.setitem(stage_c.STAGE_C_PRESETS, "tiny", tiny)
    common = ["--max_steps", "6", "--save_steps", "4"]
    script.main(tiny_argv(tmp_path / "straight", *common))

    class StopAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                control.should_training_stop = True

    orig_init = trainer_mod.DiffusionTrainer.__init__
    with monkeypatch.context() as m:
        m.setattr(trainer_mod.DiffusionTrainer, "__init__",
                  lambda self, *a, callbacks=None, **kw: orig_init(self, *a, callbacks=list(callbacks) + [StopAt4()], **kw))
        script.main(tiny_argv(tmp_path / "resumed", *common))
    assert (tmp_path / "resumed" / "checkpoint-4" / "checkpoint_complete.json").is_file()
    assert script.main(tiny_argv(tmp_path / "resumed", *common)).state.global_step == 6
    a, b = stage_c_state(tmp_path / "straight" / train_c.STAGE_C_FILE), stage_c_state(tmp_path / "resumed" / train_c.STAGE_C_FILE)
    for k in a:
        assert np.array_equal(a[k], b[k]), (k, float(np.abs(a[k] - b[k]).max()))


def _check_visualdl(out):
    from visualdl import LogReader

    tags = {"scalar": set(), "image": set()}
    for root, _, names in os.walk(out / "runs"):
        for n in names:
            if n.startswith("vdlrecords"):
                t = LogReader(file_path=os.path.join(root, n)).get_tags()
                for kind in tags:
                    tags[kind] |= {x.split("/")[-1] if kind == "scalar" else x for x in t.get(kind, [])}
    assert {"loss", "learning_rate", "grad_norm", "samples_per_second"} <= tags["scalar"], tags
    assert {"preview/ema", "preview/batch_reconstruction"} <= tags["image"], tags


def _check_extract(tmp_path, out, ema):
    from scripts.extract_unet_weights import main as extract
    from ldm.cascade.components import tiny_components
    from ldm.cascade.loading import load_stage_c
    from ldm.model_c import ModelC

    path = str(tmp_path / "extracted.safetensors")
    summary = extract(["--checkpoint", str(out / "checkpoint-6"), "--output", path] + (["--ema"] if ema else []))
    assert summary["tensors"] == len(stage_c_state(out / train_c.STAGE_C_FILE))
    trained = load_stage_c(str(out / "checkpoint-6" / (train_c.STAGE_C_EMA_FILE if ema else train_c.STAGE_C_FILE)), None)
    comps = tiny_components()
    comps.builders["stage_c"] = lambda: load_stage_c(path, "tiny")  # as config.py / inference.py load it
    model = ModelC(components=comps, progress=False)
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal([2, 16, 3, 3], dtype=np.float32))
    r = paddle.to_tensor([0.3, 0.8], dtype="float32")
    text, pooled, img = (paddle.to_tensor(rng.standard_normal(s, dtype=np.float32)) for s in ([2, 77, 32], [2, 1, 32], [2, 1, 32]))
    with paddle.no_grad():
        got = comps.get("stage_c")(x, r, clip_text=text, clip_text_pooled=pooled, clip_img=img)
        want = trained(x, r, clip_text=text, clip_text_pooled=pooled, clip_img=img)
    assert np.array_equal(got.numpy(), want.numpy())
    assert float(want.abs().sum()) > 0  # the output layer was trained away from its zero init
    _, lat = model.log_image("a red circle", height=128, width=128, steps=2, seed=1)
    comps2 = tiny_components()
    comps2.builders["stage_c"] = lambda: trained
    _, lat2 = ModelC(components=comps2, progress=False).log_image("a red circle", height=128, width=128, steps=2, seed=1)
    assert np.array_equal(lat.numpy(), lat2.numpy())
    with pytest.raises(FileNotFoundError, match="use_ema"):
        extract(["--checkpoint", str(tmp_path), "--output", path, "--ema"])
    half = tmp_path / "other" / "checkpoint-9"  # a save that was interrupted: refused unless asked for
    shutil.copytree(out / "checkpoint-6", half)
    os.remove(half / "checkpoint_complete.json")
    with pytest.raises(ValueError, match="incomplete"):
        extract(["--checkpoint", str(half), "--output", path])
    assert extract(["--checkpoint", str(half), "--output", path, "--allow_incomplete"])["tensors"] > 0


def test_dataset_pairs_by_name_and_missing_caption(tmp_path):
    from PIL import Image

    from ldm.data.transforms import normalize_pixels

    data = tmp_path / "data"
    data.mkdir()
    for i, (name, color) in enumerate([("b", (255, 0, 0)), ("a", (0, 0, 255)), ("c10", (0, 255, 0))]):
        Image.new("RGB", (80, 64), color).save(data / f"{name}.jpg")
        (data / f"{name}.txt").write_text(f"caption of {name}", encoding="utf-8")
    m, d, t = train_c.parse_stage_c_args(tiny_argv(tmp_path / "o", "--max_steps", "1") + ["--dataset_path", str(data)])
    trainer, _, _ = train_c.build_stage_c_trainer(m, d, t)
    pairs = [(os.path.basename(p), c) for p, c in trainer.train_dataset.samples]
    assert pairs == [("a.jpg", "caption of a"), ("b.jpg", "caption of b"), ("c10.jpg", "caption of c10")]
    sample = dict(trainer.train_dataset[1])
    sample["pixel_values"] = normalize_pixels(sample["pixel_values"], "zero_one")  # uint8 HWC -> the step's [0, 1] CHW
    assert sample["pixel_values"].shape == (3, 64, 64) and sample["pixel_values"].max() <= 1.0
    assert sample["pixel_values"][0].mean() > 0.9 and sample["pixel_values"][2].mean() < 0.1  # b.jpg is red, [0, 1]
    Image.new("RGB", (64, 64)).save(data / "lonely.png")
    with pytest.raises(ValueError, match="lonely.png"):
        script.main(tiny_argv(tmp_path / "o2", "--max_steps", "1") + ["--dataset_path", str(data)])


def _fake_python(tmp_path):
    """A `python` on PATH that prints its arguments (one per line) instead of running anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    return str(bin_dir)


def test_train_sh_commands(tmp_path):
    import subprocess

    path = _fake_python(tmp_path) + os.pathsep + os.environ["PATH"]
    env = {k: v for k, v in os.environ.items() if k not in ("USE_AMP", "fp16_opt_level", "GPUS", "MODEL_VERSION")}
    env["PYTHON"] = "python"  # the fake on PATH, not the repository's .venv

    def run(**extra):
        out = subprocess.run(["sh", "train.sh"], cwd=ROOT, env={**env, "PATH": path, **extra}, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        return out

    default = run()
    assert default[:2] == ["-u", "./train_stage_c_trainer.py"]
    m, d, t = train_c.parse_stage_c_args(default[2:])  # every flag of train.sh parses
    assert (m.model_version, d.dataset_path, t.output_dir, t.fp16, t.fp16_opt_level) == (
        "1B", "./dataset", "./train_output", False, "O1")
    assert (t.max_steps, t.learning_rate, str(t.lr_scheduler_type).split(".")[-1].lower(), t.save_total_limit) == (
        1000, 1e-4, "constant", 50)
    tiny = run(MODEL_VERSION="tiny", OUTPUT_DIR="/x/out", fp16_opt_level="O2", DATASET_PATH="/x/data")
    m, d, t = train_c.parse_stage_c_args(tiny[2:])
    assert (m.model_version, d.dataset_path, t.output_dir, t.fp16_opt_level, d.resolution) == (
        "tiny", "/x/data", "/x/out", "O2", 128)
    multi = run(GPUS="0,1", SHARDING="stage2", RECOMPUTE="True")
    assert multi[:6] == ["-u", "-m", "paddle.distributed.launch", "--gpus", "0,1", "./train_stage_c_trainer.py"]
    i = multi.index("--sharding")
    assert multi[i + 1] == "stage2" and multi[multi.index("--recompute") + 1] == "True"
    amp = run(USE_AMP="True")
    assert amp[amp.index("--fp16") + 1] == "True"


def test_train_sh_from_any_folder_uses_the_repo_venv(tmp_path):
    """Issue 12 item 11: after the README's set-up command (which makes <repo>/.venv), `sh train.sh`
    runs that venv's Python without activation, and `sh /path/to/repo/train.sh` works from any folder."""
    import shutil
    import subprocess

    repo = tmp_path / "repo with space"
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "train.sh"), repo / "train.sh")
    fake = repo / ".venv" / "bin" / "python"
    fake.write_text('#!/bin/sh\necho "venv-python"\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "TRAINING_PYTHON", "GPUS", "MODEL_VERSION",
                                                            "DATASET_PATH", "STAGE")}
    for stage, trainer in (("c", "train_stage_c_trainer.py"), ("b", "scripts/train_stage_b_trainer.py")):
        out = subprocess.run(["sh", str(repo / "train.sh")], cwd=elsewhere, env={**env, "STAGE": stage,
                             "MODEL_VERSION": "tiny"}, capture_output=True, text=True, check=True).stdout.splitlines()
        assert out[:3] == ["venv-python", "-u", f"{repo}/{trainer}"], out[:3]
        assert out[out.index("--dataset_path") + 1] == f"{repo}/assets/demo_dataset"
    out = subprocess.run(["sh", str(repo / "train.sh")], cwd=elsewhere, env={**env, "GPUS": "0,1"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:7] == ["venv-python", "-u", "-m", "paddle.distributed.launch", "--gpus", "0,1",
                       f"{repo}/train_stage_c_trainer.py"]


def test_missing_weights_error_lists_files(tmp_path):
    from ldm.cascade.components import MissingWeightsError

    m, _, _ = train_c.parse_stage_c_args(SEED_FLAGS + ["--output_dir", str(tmp_path), "--weights_path", str(tmp_path)])
    with pytest.raises(MissingWeightsError) as e:
        train_c.build_components(m)
    msg = str(e.value)
    for name in ("stage_c_lite", "effnet_encoder", "previewer", "clip_text", "MODEL_VERSION=tiny"):
        assert name in msg, (name, msg)


def test_previews_use_ema_weights_and_restore(layer):
    from types import SimpleNamespace

    before = {k: p.numpy().copy() for k, p in layer.stage_c.named_parameters()}
    shadow = {k: paddle.to_tensor(p.numpy() + 0.05) for k, p in layer.ema_parameters().items()}
    kw = dict(prompts=("a red circle", "a blue square"), num_inference_steps=2, seed=3, latent_size=3)
    plain = layer.log_images(**kw)
    with_ema = layer.log_images(ema=SimpleNamespace(shadow=shadow), **kw)
    again = layer.log_images(**kw)
    assert set(plain) == {"preview/model"} and set(with_ema) == {"preview/ema"}
    assert plain["preview/model"].shape == (24, 48, 3) and plain["preview/model"].dtype == np.uint8  # 2 prompts side by side
    assert np.array_equal(plain["preview/model"], again["preview/model"])  # fixed prompts and seed: same images
    assert not np.array_equal(plain["preview/model"], with_ema["preview/ema"])
    assert all(np.array_equal(p.numpy(), before[k]) for k, p in layer.stage_c.named_parameters())  # weights restored
    assert layer.stage_c.training


def test_grn_gradient_finite_for_an_all_zero_channel():
    # fine-tuning NaN regression: a channel that is exactly 0 over H x W (GELU underflow) made
    # sqrt'(0) = inf and every Stage C gradient NaN after ~90 tiny steps at lr 1e-3
    from ldm.cascade.common import GlobalResponseNorm

    grn = GlobalResponseNorm(4)
    grn.gamma.set_value(paddle.full([1, 1, 1, 4], 0.5))
    x = np.random.default_rng(0).standard_normal([2, 3, 3, 4]).astype(np.float32)
    x[..., 1] = 0.0
    xt = paddle.to_tensor(x, stop_gradient=False)
    grn(xt).square().sum().backward()
    g = xt.grad.numpy()
    assert np.isfinite(g).all() and np.isfinite(grn.gamma.grad.numpy()).all()
    assert np.abs(g[..., 0]).sum() > 0


OLD_CHECKPOINT = os.path.join(ROOT, "tests", "data", "old_train_checkpoint", "checkpoint-2")


def test_checkpoint_of_the_previous_training_code_resumes(tmp_path):
    """A checkpoint written by the training code before the task refactor (commit ec1deb9: pickled
    optimizer / scheduler / RNG files and param_names.json; tests/data/old_train_checkpoint) resumes:
    weights, EMA, Adam moments, scheduler, global RNG and task state are the checkpoint's, and the
    checkpoint the resumed run writes holds no pickle."""
    import random

    from paddlenlp.trainer import TrainerCallback

    from ldm.cascade.components import tiny_components
    from ldm.cascade.stage_c import StageC
    from ldm.train.checkpoint import read_legacy_state, resolve_resume

    sys.path.insert(0, os.path.dirname(os.path.dirname(OLD_CHECKPOINT)))
    from old_train_checkpoint.make_fixture import ARGV, MICRO_STAGE_C

    out = tmp_path / "out"
    shutil.copytree(OLD_CHECKPOINT, out / "checkpoint-2")
    m, d, t = train_c.parse_stage_c_args(ARGV + ["--output_dir", str(out), "--max_steps", "3", "--save_steps", "3"])
    comps = tiny_components()
    comps.builders["stage_c"] = lambda: StageC(MICRO_STAGE_C)
    trainer, task, ema = train_c.build_stage_c_trainer(m, d, t, components=comps, config=MICRO_STAGE_C)
    seen = {}

    class Probe(TrainerCallback):  # runs after the trainer's own callbacks
        def on_step_begin(self, args, state, control, model=None, lr_scheduler=None, **kw):
            seen.update(step=state.global_step, numpy=np.random.get_state(), python=random.getstate(),
                        task_rng=model.rng.bit_generator.state, lr_epoch=lr_scheduler.last_epoch,
                        weights={k: v.numpy().copy() for k, v in model.stage_c.state_dict().items()},
                        ema={k: v.numpy().copy() for k, v in ema.shadow.items()},
                        buckets=model.gdf.loss_weight.state_dict())

        def on_optimizer_begin(self, args, state, control, model=None, **kw):
            seen["grads"] = {n: p.grad.numpy().copy() for n, p in model.trainable_parameters().items()}

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            names = {p.name: n for n, p in model.trainable_parameters().items()}
            seen["moment1"] = {names[k[:-len("_moment1_0")]]: v.numpy() for k, v in optimizer.state_dict().items()
                               if k.endswith("_moment1_0")}

    trainer.add_callback(Probe())
    trainer.fit(resolve_resume(str(out), None), ema)
    old = {name: read_legacy_state(os.path.join(OLD_CHECKPOINT, name)) for name in ("rng_state.pth", "optimizer.pdopt")}
    assert seen["step"] == 2 and trainer.state.global_step == 3 and seen["lr_epoch"] == 2
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]  # history of the checkpoint kept
    # global RNG states restored right before the first resumed step
    assert seen["python"] == old["rng_state.pth"]["python"]
    name, keys, pos, *_ = old["rng_state.pth"]["numpy"]
    assert seen["numpy"][0] == name and np.array_equal(seen["numpy"][1], keys) and seen["numpy"][2] == pos
    task_state = json.load(open(os.path.join(OLD_CHECKPOINT, "train_c_state_rank0.json")))
    assert seen["task_rng"] == task_state["rng"]
    assert seen["buckets"]["bucket_losses"] == pytest.approx(task_state["adaptive_loss"]["bucket_losses"])
    for file, got, prefix in (("stage_c.safetensors", seen["weights"], ""), ("stage_c_ema.safetensors", seen["ema"], "stage_c.")):
        want = stage_c_state(os.path.join(OLD_CHECKPOINT, file))
        for k, v in want.items():
            if prefix + k in got:
                assert np.array_equal(got[prefix + k], v), (file, k)
    assert len(seen["ema"]) == len(seen["moment1"]) == len(seen["grads"]) > 0
    # Adam moments continued from the checkpoint's: m = 0.9 m_old + 0.1 g (no clipping, --max_grad_norm 0)
    saved_names = json.load(open(os.path.join(OLD_CHECKPOINT, "param_names.json")))  # structured -> old paddle name
    for k, g in seen["grads"].items():
        m_old = np.asarray(old["optimizer.pdopt"][f"{saved_names[k]}_moment1_0"])
        np.testing.assert_allclose(seen["moment1"][k], 0.9 * m_old + 0.1 * g, rtol=1e-5, atol=1e-9, err_msg=k)
    files = set(os.listdir(out / "checkpoint-3"))
    assert {"optimizer.safetensors", "scheduler.json", "rng_state_rank0.json", "train_c_state_rank0.json"} <= files
    assert not [n for n in files if n.endswith((".pdopt", ".pdparams", ".pth", ".bin"))], files


def test_training_args_name_the_device_this_process_runs_on(tmp_path):
    """PaddleNLP's TrainingArguments default `device: gpu` (printed with --verbose) on a CPU machine."""
    _, _, t = train_c.parse_stage_c_args(SEED_FLAGS + ["--output_dir", str(tmp_path)])
    assert t.device == paddle.device.get_device().split(":")[0] == "cpu"
