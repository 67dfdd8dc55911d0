"""End to end on tiny components: images -> create_pretraining_data.py -> 20 Trainer steps (EMA,
image logging, checkpoints) -> resume (skipping an interrupted checkpoint) -> generate_sd.py PNGs;
the saved unet/ loads in ppdiffusers UNet2DConditionModel + StableDiffusionPipeline (seed §5.2)."""
import glob
import importlib.util
import logging
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECAY = 0.9


def _load_script(rel):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train_argv(tmp, out, max_steps, lr="1e-3"):
    return [
        "--do_train", "--output_dir", str(out), "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--learning_rate", lr, "--weight_decay", "0.0",
        "--max_steps", str(max_steps), "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--image_logging_steps", "10", "--logging_steps", "5", "--resolution", "16", "--save_steps", "10",
        "--save_total_limit", "2", "--seed", "23", "--dataloader_num_workers", "0",
        "--pretrained_model_name_or_path", str(tmp / "m"), "--unet_name_or_path", str(tmp / "m" / "unet_config.json"),
        "--file_list", str(tmp / "data" / "filelist" / "custom_dataset.filelist.list"), "--model_max_length", "16",
        "--max_grad_norm", "1.0", "--disable_tqdm", "True", "--bf16", "False", "--use_ema", "True",
        "--ema_decay", str(DECAY), "--num_inference_steps", "2", "--caption_drop_prob", "0.1", "--recompute", "1",
        "--enable_xformers_memory_efficient_attention", "1", "--noise_offset", "0.05", "--snr_gamma", "5.0",
        "--input_perturbation", "0.1",
    ]


def _unet_state(folder):
    from ldm.weights import load_state_dict

    return load_state_dict(os.path.join(folder, "diffusion_paddle_model.safetensors"))


def _vdl_tags(logdir):
    from visualdl import LogReader

    scalars, images = set(), set()
    for f in glob.glob(os.path.join(logdir, "**", "vdlrecords*"), recursive=True):
        tags = LogReader(file_path=f).get_tags()
        scalars |= set(tags.get("scalar", []))
        images |= set(tags.get("image", []))
    return scalars, images


@pytest.mark.slow
def test_sd_pretraining_end_to_end(tmp_path, monkeypatch):
    from sd_tiny import build_tiny_sd, write_images_jsonl

    monkeypatch.chdir(tmp_path)
    for k in ("FLAG_USE_EMA", "FLAG_RECOMPUTE", "FLAG_XFORMERS"):
        monkeypatch.delenv(k, raising=False)
    build_tiny_sd(tmp_path / "m")
    jsonl = write_images_jsonl(str(tmp_path / "img"), n=12)
    prep = _load_script("create_pretraining_data.py")
    assert prep.main(["--input_path", jsonl, "--output_path", str(tmp_path / "data"), "--per_part_file_num", "5",
                      "--num_workers", "0"]) == 0

    train = _load_script("train_txt2img_laion400m_trainer.py")
    out = tmp_path / "out"
    trainer = train.main(_train_argv(tmp_path, out, 20))
    assert trainer.state.global_step == 20
    assert trainer.model.unet.is_gradient_checkpointing  # --recompute 1
    assert all(p.stop_gradient for p in trainer.model.vae.parameters())
    assert all(p.stop_gradient for p in trainer.model.text_encoder.parameters())  # frozen without --train_text_encoder
    assert not trainer.model.vae.training
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"grad_norm", "samples_per_second", "data_wait_fraction", "learning_rate"} <= set(h) for h in logged)

    ckpts = sorted(os.path.basename(p) for p in glob.glob(str(out / "checkpoint-*")))
    assert ckpts == ["checkpoint-10", "checkpoint-20"]
    c20 = out / "checkpoint-20"
    assert (c20 / "checkpoint_complete.json").is_file()
    # only_save_updated_model: unet/ + unet_ema/ (+ scheduler config), no vae/text_encoder copies
    assert {"unet", "unet_ema", "scheduler"} <= set(os.listdir(c20))
    assert not (c20 / "vae").exists() and not (c20 / "text_encoder").exists()

    from ppdiffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(c20 / "unet"))
    ema_unet = UNet2DConditionModel.from_pretrained(str(c20 / "unet_ema"))
    w20, e20 = _unet_state(c20 / "unet"), _unet_state(c20 / "unet_ema")
    assert len(w20) == len(unet.state_dict()) == len(e20)
    k = "conv_in.weight"
    assert np.abs(w20[k] - e20[k]).max() > 0  # EMA lags the weights
    np.testing.assert_array_equal(unet.state_dict()[k].numpy(), w20[k])
    np.testing.assert_array_equal(ema_unet.state_dict()[k].numpy(), e20[k])

    scalars, images = _vdl_tags(str(out / "runs"))
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/samples_per_second"} <= scalars, scalars
    assert {"samples/guidance_1", "samples/guidance_7.5", "vae/reconstruction"} <= images, images

    # an interrupted save (no completeness marker) must be skipped on resume
    os.makedirs(out / "checkpoint-30" / "unet")
    # resume: weights, optimizer, scheduler and EMA come back from checkpoint-20 (not the fake 30)
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    for name in ("ldm.train.callbacks", "ldm.train.task", "ldm.train.checkpoint", "ldm.train.sd"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        trainer2 = train.main(_train_argv(tmp_path, out, 25))
    finally:
        for name in ("ldm.train.callbacks", "ldm.train.task", "ldm.train.checkpoint", "ldm.train.sd"):
            logging.getLogger(name).removeHandler(handler)
    assert trainer2.state.global_step == 25
    steps = [h["step"] for h in trainer2.state.log_history if "loss" in h]
    assert steps == [5, 10, 15, 20, 25]  # history of checkpoint-20 + the one resumed logging window
    # --enable_xformers_memory_efficient_attention on CPU: a warning, then standard attention
    assert any("memory-efficient attention unavailable" in m for m in records), records
    assert any("skipping incomplete checkpoint" in m and "checkpoint-30" in m for m in records), records
    assert any(m.startswith("restored trained weights from") and m.endswith("checkpoint-20") for m in records), records
    assert any(m.startswith("EMA restored from") and "checkpoint-20" in m for m in records), records
    ema_cb = [c for c in trainer2.callback_handler.callbacks if type(c).__name__ == "EMACallback"][0]
    assert ema_cb.num_updates == 5
    final_w, final_e = _unet_state(out / "unet"), _unet_state(out / "unet_ema")
    assert np.abs(final_w[k] - w20[k]).max() > 0  # trained on after resuming
    assert np.abs(final_e[k] - final_w[k]).max() > 0  # the EMA folder holds the average, not a copy

    # sampling CLI: PNGs with prompt and seed metadata
    gen = _load_script("scripts/generate_sd.py")
    paths = gen.main(["--pretrained_model_name_or_path", str(tmp_path / "m"), "--unet_path", str(c20 / "unet_ema"),
                      "--prompt", "record 001", "--prompt", "a red square", "--height", "16", "--width", "16",
                      "--guidance_scale", "7.5", "--num_inference_steps", "2", "--scheduler", "euler-ancestral",
                      "--seed", "5", "--num_images", "2", "--output_dir", str(tmp_path / "samples")])
    assert len(paths) == 4
    from PIL import Image

    im = Image.open(paths[1])
    assert im.size == (16, 16) and im.text["prompt"] == "record 001" and im.text["seed"] == "6"

    # seed §5.2: UNet2DConditionModel.from_pretrained(checkpoint/unet) into StableDiffusionPipeline
    from ppdiffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm.sd.loading import load_text_encoder, load_tokenizer, load_vae

    pipe_dir = tmp_path / "pipe"
    StableDiffusionPipeline(vae=load_vae(str(tmp_path / "m" / "vae")),
                            text_encoder=load_text_encoder(str(tmp_path / "m" / "text_encoder")),
                            tokenizer=load_tokenizer(str(tmp_path / "m" / "tokenizer")), unet=unet,
                            scheduler=DDIMScheduler.from_pretrained(str(tmp_path / "m" / "scheduler")),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(pipe_dir))
    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), safety_checker=None, unet=unet)
    img = pipe("a photo", guidance_scale=7.5, width=16, height=16, num_inference_steps=2, output_type="np").images[0]
    assert img.shape == (16, 16, 3) and np.isfinite(img).all()
