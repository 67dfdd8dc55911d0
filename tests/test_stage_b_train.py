"""Stage B fine-tuning (scripts/train_stage_b_trainer.py) on the offline tiny preset, CPU, fp32.

- the step follows train/train_b.py: pyramid noise (unit variance, the levels of the original),
  EfficientNet latents of the nearest-resized image at a multiple of 32, zeros for the others;
  only Stage B gets gradients;
- the denoising loss on held-out images goes down after training;
- resume: 2 steps + stop + resume to 4 == 4 straight steps (weights, EMA, adaptive buckets, RNG);
- extract_unet_weights.py writes a Stage B file that inference.py --stage_b uses; --preset tiny
  honours --stage_c / --stage_b files of tiny size and refuses other sizes;
- STAGE=b sh train.sh runs the Stage B trainer with its defaults.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "demo_dataset")

from scripts import train_stage_b_trainer as script  # noqa: E402
import ldm.train.stage_b as train_b  # noqa: E402


def tiny_argv(out, *extra, data=DEMO):
    return ["--do_train", "--dataset_path", str(data), "--output_dir", str(out), "--model_version", "tiny",
            "--resolution", "64", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--seed", "3", "--report_to", "none", "--disable_tqdm", "True",
            "--image_logging_steps", "0", *extra]


def state(path):
    from ldm.weights import load_state_dict

    return load_state_dict(str(path))


@pytest.fixture(scope="module")
def task():
    from ldm.cascade.components import tiny_components
    from ldm.cascade.stage_b import stage_b_config

    return train_b.StageBTask(tiny_components(), stage_b_config("tiny"), seed=0)


def test_pyramid_noise_levels_and_variance():
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((64, 4, 32, 32), dtype=np.float32)
    out = train_b.pyramid_noise(eps, np.random.default_rng(1))
    assert out.shape == eps.shape and out.dtype == np.float32
    assert abs(float(out.std()) - 1.0) < 0.03 and abs(float(out.mean())) < 0.05
    # 32x32: levels 16, 8, 4, 2, 1 are within [1, 16]: multipliers 0.75^1..0.75^5 (stop at side 1)
    ms = [0.75 ** i for i in range(1, 6)]
    r = np.random.default_rng(1)
    want = eps.copy()
    for i, m in enumerate(ms, 1):
        s = 32 // 2 ** i
        off = r.standard_normal((64, 4, s, s), dtype=np.float32)
        want += np.repeat(np.repeat(off, 2 ** i, axis=2), 2 ** i, axis=3) * np.float32(m)
    want /= np.float32((1 + sum(m * m for m in ms)) ** 0.5)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # a 64x64 latent skips the 32x32 level (outside [1, 16])
    big = train_b.pyramid_noise(np.zeros((1, 1, 64, 64), np.float32), np.random.default_rng(2))
    assert big.shape == (1, 1, 64, 64)


def test_effnet_conditions_resize_and_zeros(task):
    from ldm.cascade.effnet import imagenet_normalize

    x = paddle.to_tensor(np.random.default_rng(0).random((3, 3, 128, 128), dtype=np.float32))
    use = np.array([True, False, True])
    out = task.effnet_conditions(x, 0.8, use)  # 128 * 0.8 = 102.4 -> 96 -> 3x3 latents
    assert out.shape == [3, 16, 3, 3]
    assert float(out[1].abs().max()) == 0.0
    small = paddle.nn.functional.interpolate(x[0:1], size=[96, 96], mode="nearest")
    with paddle.no_grad():
        want = task.effnet(imagenet_normalize(small))
    np.testing.assert_allclose(out[0:1].numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="too small"):
        task.effnet_conditions(x[:, :, :40, :40], 0.5, use)


def test_step_trains_only_stage_b(task):
    x = paddle.to_tensor(np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32))
    task.train()
    loss = task(pixel_values=x, caption=["a cat", "a dog"])
    assert loss.shape == [] or loss.size == 1
    loss.backward()
    assert all(p.grad is not None for p in task.stage_b.parameters())
    for part in (task.stage_a, task.effnet, task.text_encoder):
        assert not part.training and all(p.grad is None and p.stop_gradient for p in part.parameters())
    assert set(task.trainable_parameters()) == {f"stage_b.{k}" for k, _ in task.stage_b.named_parameters()}
    task.clear_gradients()


def _held_out_loss(task, images, captions):
    rng = np.random.default_rng(123)
    x = paddle.to_tensor(images)
    lat = task.encode_latents(x)
    eff = task.encode_effnet(x)
    pooled = task.encode_captions(captions)[1]
    losses = []
    for t in (0.2, 0.4, 0.6, 0.8):
        eps = paddle.to_tensor(rng.standard_normal(lat.shape, dtype=np.float32))
        losses.append(task.denoising_loss(lat, eps, paddle.full([lat.shape[0]], t, "float32"), eff, pooled))
    return float(np.mean(losses))


def test_held_out_loss_goes_down(tmp_path):
    from ldm.cascade.components import tiny_components
    from ldm.cascade.stage_b import stage_b_config
    from ldm.data import DatasetSpec, build_dataset
    from ldm.data.transforms import normalize_pixels
    from ldm.weights import assign_state_dict

    train_dir, held_dir = tmp_path / "train", tmp_path / "held"
    train_dir.mkdir(), held_dir.mkdir()
    names = sorted(n[:-4] for n in os.listdir(DEMO) if n.endswith(".jpg"))
    for i, n in enumerate(names):
        for ext in (".jpg", ".txt"):
            shutil.copy(os.path.join(DEMO, n + ext), (held_dir if i >= len(names) - 2 else train_dir) / (n + ext))
    out = tmp_path / "out"
    script.main(tiny_argv(out, "--max_steps", "80", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
                          "--save_steps", "1000", data=train_dir))
    ds = build_dataset(DatasetSpec("folder", str(held_dir), resolution=64, normalize="zero_one", center_crop=True,
                                   random_flip=False, seed=0))
    samples = [ds[i] for i in range(len(ds))]
    images = normalize_pixels(np.stack([s["pixel_values"] for s in samples]), "zero_one")  # uint8 HWC -> [0, 1] CHW
    captions = [s["caption"] for s in samples]
    fresh = train_b.StageBTask(tiny_components(), stage_b_config("tiny"), seed=0)
    before = _held_out_loss(fresh, images, captions)
    assign_state_dict(fresh.stage_b, str(out / train_b.STAGE_B_FILE))
    after = _held_out_loss(fresh, images, captions)
    assert after < 0.95 * before, (before, after)  # 1.052 -> 0.953 (80 steps)


def test_resume_is_bit_exact_and_extract_feeds_inference(tmp_path, monkeypatch):
    from paddlenlp.trainer import TrainerCallback

    from ldm.train import trainer as trainer_mod

    common = ["--max_steps", "4", "--save_steps", "2", "--use_ema", "True", "--ema_decay", "0.5",
              "--adaptive_loss_weight", "True"]
    straight = tmp_path / "straight"
    script.main(tiny_argv(straight, *common, "--report_to", "visualdl", "--image_logging_steps", "2",
                          "--num_inference_steps", "2"))

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    orig_init = trainer_mod.DiffusionTrainer.__init__

    def init_with_stop(self, *a, callbacks=None, **kw):
        orig_init(self, *a, callbacks=list(callbacks) + [StopAt2()], **kw)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(trainer_mod.DiffusionTrainer, "__init__", init_with_stop)
    script.main(tiny_argv(resumed, *common))
    monkeypatch.undo()
    assert (resumed / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert script.main(tiny_argv(resumed, *common)).state.global_step == 4
    for name in (train_b.STAGE_B_FILE, train_b.STAGE_B_EMA_FILE):
        a, b = state(straight / name), state(resumed / name)
        assert sorted(a) == sorted(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), (name, k)
    sa = json.load(open(straight / "checkpoint-4" / "train_b_state_rank0.json"))
    sb = json.load(open(resumed / "checkpoint-4" / "train_b_state_rank0.json"))
    assert sa == sb and "adaptive_loss" in sa
    runs = [f for _, _, fs in os.walk(straight / "runs") for f in fs]
    assert runs, "VisualDL logs"

    # extract -> inference.py --stage_b (tiny) predicts like the trained network
    import inference
    from scripts.extract_unet_weights import main as extract
    from ldm.cascade.loading import load_stage_b

    path = str(tmp_path / "stage_b_ft.safetensors")
    summary = extract(["--checkpoint", str(straight), "--output", path])
    assert summary["stage"] == "b"
    args = inference.parse_args(["--preset", "tiny", "--stage_b", path])
    comps = inference.run_components(inference.dataclasses.replace(inference.C.CASCADE, stage_b=os.path.abspath(path)),
                                     args)
    trained = load_stage_b(str(straight / train_b.STAGE_B_FILE), None)
    got = comps.get("stage_b").state_dict()
    for k, v in trained.state_dict().items():
        assert np.array_equal(got[k].numpy(), v.numpy()), k


def test_preset_tiny_honours_or_refuses_stage_files(tmp_path):
    import inference
    from ldm.cascade.loading import save_network
    from ldm.cascade.stage_c import StageC, stage_c_config

    tiny = StageC(stage_c_config("tiny"))
    path = str(tmp_path / "c_tiny.safetensors")
    save_network(tiny, path)
    args = inference.parse_args(["--preset", "tiny", "--stage_c", path])
    cfg = inference.dataclasses.replace(inference.C.CASCADE, stage_c=path)
    got = inference.run_components(cfg, args).get("stage_c").state_dict()
    for k, v in tiny.state_dict().items():
        assert np.array_equal(got[k].numpy(), v.numpy()), k
    bigger = StageC(stage_c_config("tiny", c_cond=48))
    other = str(tmp_path / "c_other.safetensors")
    save_network(bigger, other)
    args = inference.parse_args(["--preset", "tiny", "--stage_c", other])
    cfg = inference.dataclasses.replace(inference.C.CASCADE, stage_c=other)
    with pytest.raises(ValueError):
        inference.run_components(cfg, args).get("stage_c")


def test_train_sh_stage_b(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("USE_AMP", "fp16_opt_level", "GPUS", "MODEL_VERSION",
                                                            "RESOLUTION", "OUTPUT_DIR", "STAGE")}
    env["PATH"] = str(bin_dir) + os.pathsep + env["PATH"]
    env["PYTHON"] = "python"  # the fake on PATH, not the repository's .venv

    def run(**extra):
        return subprocess.run(["sh", "train.sh"], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True,
                              check=True).stdout.splitlines()

    out = run(STAGE="b")
    assert out[:2] == ["-u", "./scripts/train_stage_b_trainer.py"]
    elsewhere = subprocess.run(["sh", os.path.join(ROOT, "train.sh")], cwd=tmp_path, env={**env, "STAGE": "b"},
                               capture_output=True, text=True, check=True).stdout.splitlines()
    assert elsewhere[:2] == ["-u", os.path.join(ROOT, "scripts", "train_stage_b_trainer.py")]  # from any folder
    m, d, t = train_b.parse_stage_b_args(out[2:])
    assert (m.model_version, d.resolution, m.num_inference_steps, t.output_dir) == ("700M", 1024, 10, "./train_output_b")
    m, d, t = train_b.parse_stage_b_args(run(STAGE="b", MODEL_VERSION="tiny")[2:])
    assert (m.model_version, d.resolution, d.dataset_path) == ("tiny", 128, "./assets/demo_dataset")
    m, _, _ = train_b.parse_stage_b_args(run(STAGE="b", MODEL_VERSION="tiny")[2:] + ["--lora_rank", "4"])
    assert (m.lora_rank, m.lora_alpha, m.lora_targets) == (4, 1.0, "attention")
    assert run()[:2] == ["-u", "./train_stage_c_trainer.py"]
    with pytest.raises(ValueError, match="multiple of 64"):
        train_b.parse_stage_b_args(["--output_dir", str(tmp_path), "--resolution", "96"])


def test_eval_captions_refused_up_front(tmp_path):
    m, d, t = train_b.parse_stage_b_args(tiny_argv(tmp_path, "--eval_steps", "1", "--eval_captions", "c.txt",
                                                   "--eval_reference", "r.npz", "--eval_inception", "i", "--eval_clip_dir", "d"))
    with pytest.raises(ValueError, match="Stage B needs a Stage C latent"):
        train_b.build_stage_b_trainer(m, d, t)
