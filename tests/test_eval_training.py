"""Training-time FID / CLIP score (issue 13 item 3): `--eval_steps N --eval_captions FILE
--eval_reference STATS --eval_num_images K --eval_guidance_scales ...` on the tiny Stage C recipe
(1 process, CPU) logs eval/fid_g<scale> and eval/clip_score_g<scale> to VisualDL at every N-th
step, leaves training untouched (same weights as a run without evaluation), and the flags are
checked up front. The SD recipe's sampling hook is checked against ldm.sd.sampling.generate."""
import os
import sys

import numpy as np
import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_stage_c_trainer as script  # noqa: E402
from ldm.clip import make_tiny_clip_text, make_tiny_clip_vision  # noqa: E402
from ldm.eval.clip_score import CLIP_TEXT_SUBDIR, CLIP_VISION_SUBDIR  # noqa: E402
from ldm.eval.fid import save_stats  # noqa: E402
from ldm.eval.inception import MODEL_NAME, InceptionV3  # noqa: E402
from ldm.train.callbacks import EvaluationCallback  # noqa: E402
from ldm.weights import load_state_dict, save_safetensors, weights_metadata  # noqa: E402
from test_train_stage_c import tiny_argv  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_eval")
    make_tiny_clip_text(d / "clip" / CLIP_TEXT_SUBDIR)
    make_tiny_clip_vision(d / "clip" / CLIP_VISION_SUBDIR)
    paddle.seed(0)
    save_safetensors(InceptionV3().initialize_weights().state_dict(), str(d / "inception.safetensors"),
                     metadata=weights_metadata(MODEL_NAME))
    feats = np.random.default_rng(0).standard_normal((30, 2048)) + 5.0
    save_stats(d / "ref.npz", feats.mean(0), np.cov(feats, rowvar=False))
    (d / "captions.txt").write_text("a red circle\na blue square\na green triangle\nunused\n", encoding="utf-8")
    return d


def _eval_flags(d, *extra):
    return ["--eval_steps", "2", "--eval_captions", str(d / "captions.txt"), "--eval_reference", str(d / "ref.npz"),
            "--eval_num_images", "3", "--eval_inception", str(d / "inception.safetensors"),
            "--eval_clip_dir", str(d / "clip"), "--per_device_eval_batch_size", "2", *extra]


def _scalars(out):
    from visualdl import LogReader

    found = {}
    for root, _, names in os.walk(out):
        for n in names:
            if n.startswith("vdlrecords"):
                reader = LogReader(file_path=os.path.join(root, n))
                for tag in reader.get_tags().get("scalar", []):
                    if tag.startswith("eval/"):
                        found[tag] = [(s.id, s.value) for s in reader.get_data("scalar", tag)]
    return found


def test_stage_c_training_logs_fid_and_clip_score(eval_files, tmp_path):
    d = eval_files
    common = ["--max_steps", "3", "--num_inference_steps", "2", "--report_to", "visualdl"]
    trainer = script.main(tiny_argv(tmp_path / "eval", *common, *_eval_flags(d, "--eval_guidance_scales", "1", "4")))
    cb = [c for c in trainer.callback_handler.callbacks if isinstance(c, EvaluationCallback)]
    assert len(cb) == 1
    history = cb[0].history
    assert [step for step, _ in history] == [2]  # every 2nd step of 3
    for _, m in history:
        assert sorted(m) == ["eval/clip_score_g1", "eval/clip_score_g4", "eval/fid_g1", "eval/fid_g4"]
        assert all(np.isfinite(v) for v in m.values()) and all(0 <= m[f"eval/clip_score_g{g}"] <= 100 for g in (1, 4))
    assert history[0][1]["eval/fid_g1"] != history[0][1]["eval/fid_g4"]  # the scale reaches the sampler
    logged = _scalars(tmp_path / "eval")
    assert sorted(logged) == sorted(history[0][1])
    for tag, points in logged.items():
        assert [s for s, _ in points] == [2]
        assert [v for _, v in points] == pytest.approx([m[tag] for _, m in history], rel=1e-6)
    # evaluation leaves training alone: the same weights as a run without it
    plain = script.main(tiny_argv(tmp_path / "plain", *common))
    assert not [c for c in plain.callback_handler.callbacks if isinstance(c, EvaluationCallback)]
    a, b = load_state_dict(tmp_path / "eval" / "stage_c.safetensors"), load_state_dict(tmp_path / "plain" / "stage_c.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_flags_are_checked(eval_files, tmp_path):
    d = eval_files
    with pytest.raises(ValueError, match="--eval_captions needs --eval_steps N"):
        script.main(tiny_argv(tmp_path, "--max_steps", "1", "--eval_captions", str(d / "captions.txt")))
    with pytest.raises(ValueError, match="needs --eval_reference, --eval_inception, --eval_clip_dir"):
        script.main(tiny_argv(tmp_path, "--max_steps", "1", "--eval_steps", "1", "--eval_captions", "x.txt"))
    with pytest.raises(ValueError, match="--eval_num_images must be >= 2"):
        script.main(tiny_argv(tmp_path, "--max_steps", "1", *_eval_flags(d, "--eval_num_images", "1")))


def test_sd_sample_images_is_generate(tmp_path):
    """SDTask.sample_images (what the SD recipe evaluates) = ldm.sd.sampling.generate at that scale."""
    pytest.importorskip("diffusers")
    from sd_tiny import build_tiny_sd

    from ldm.sd.loading import load_for_inference
    from ldm.sd.sampling import generate, make_scheduler
    from ldm.train.sd import SDTask

    build_tiny_sd(str(tmp_path / "sd"), unet_weights=True)
    unet, vae, te, tok, sched = load_for_inference(str(tmp_path / "sd"))
    task = SDTask(unet, vae, te, tok, scheduler_config=sched)
    with task.evaluating():
        got = task.sample_images(["a", "b"], 5, 3.0, num_inference_steps=2, resolution=16)
    want = generate(unet, vae, te, tok, make_scheduler("ddim", sched), ["a", "b"], 16, 16, guidance_scale=3.0,
                    num_inference_steps=2, seed=5)
    assert got.shape == (2, 16, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    assert task.default_guidance_scale == 7.5


@pytest.mark.slow
def test_sd_training_logs_fid_and_clip_score(eval_files, tmp_path):
    """The SD recipe with the --eval_* flags (1 process, tiny SD, 2 steps): eval/fid_g<s> and
    eval/clip_score_g<s> at step 2 in VisualDL, equal to scoring the final weights directly with
    SDTask.sample_images at the recipe's sampling settings (--num_inference_steps, --resolution)."""
    pytest.importorskip("diffusers")
    import importlib.util

    from sd_tiny import build_tiny_sd, write_images_jsonl

    from ldm.eval.clip_score import ClipScorer
    from ldm.eval.inception import load_inception
    from ldm.eval.online import OnlineEvaluation

    def load(rel):
        spec = importlib.util.spec_from_file_location(rel[:-3], os.path.join(ROOT, rel))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    d = eval_files
    build_tiny_sd(str(tmp_path / "m"))
    jsonl = write_images_jsonl(str(tmp_path / "img"), n=4)
    assert load("create_pretraining_data.py").main(["--input_path", jsonl, "--output_path", str(tmp_path / "data"),
                                                     "--per_part_file_num", "4", "--num_workers", "0"]) in (0, None)
    out = tmp_path / "out"
    trainer = load("train_txt2img_laion400m_trainer.py").main([
        "--do_train", "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--max_steps", "2", "--lr_scheduler_type", "constant", "--image_logging_steps", "0", "--logging_steps", "1",
        "--resolution", "16", "--save_steps", "100", "--seed", "23", "--dataloader_num_workers", "0",
        "--pretrained_model_name_or_path", str(tmp_path / "m"),
        "--unet_name_or_path", str(tmp_path / "m" / "unet_config.json"),
        "--file_list", str(tmp_path / "data" / "filelist" / "custom_dataset.filelist.list"), "--model_max_length", "16",
        "--disable_tqdm", "True", "--num_inference_steps", "2", "--report_to", "visualdl",
        *_eval_flags(d, "--eval_guidance_scales", "1", "4")])
    (cb,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, EvaluationCallback)]
    assert [step for step, _ in cb.history] == [2]
    metrics = cb.history[0][1]
    assert sorted(metrics) == ["eval/clip_score_g1", "eval/clip_score_g4", "eval/fid_g1", "eval/fid_g4"]
    logged = _scalars(out)
    assert sorted(logged) == sorted(metrics)
    assert all([s for s, _ in p] == [2] and p[0][1] == pytest.approx(metrics[t], rel=1e-6) for t, p in logged.items())
    direct = OnlineEvaluation(str(d / "captions.txt"), str(d / "ref.npz"), load_inception(str(d / "inception.safetensors")),
                              ClipScorer.from_dir(str(d / "clip")), 3, [1.0, 4.0], seed=23, batch_size=3)
    task = trainer.model
    with task.evaluating():
        want = direct.run(lambda c, s, g: task.sample_images(c, s, g, num_inference_steps=2, resolution=16),
                          rank=0, world_size=1)
    assert metrics == pytest.approx(want, rel=1e-5)
