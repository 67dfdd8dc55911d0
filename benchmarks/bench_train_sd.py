"""Benchmark: SD v1 pretraining throughput on CPU through the real path (LAION part files ->
LaionDataset -> DataLoader -> DiffusionTrainer step), for a tiny and a mid-size UNet.

Reports steps/s, samples/s and the share of wall time the step loop waited for the loader
(TimingCallback: time from the end of one step to the arrival of the next batch).

    OMP_NUM_THREADS=1 python benchmarks/bench_train_sd.py --steps 20 --workers 2

With --latents, each size is trained from the part files (centre crop) and from their
precomputed latents (scripts/precompute_latents.py's pass, `--latents_path`: no VAE, no text
encoder in the step), --repeat times alternately; per run the median CPU seconds (process time:
the step plus the in-process loader) and wall seconds per step after warm-up, then the medians
over the runs and the ratio images / latents:

    OMP_NUM_THREADS=1 python benchmarks/bench_train_sd.py --latents --steps 12 --workers 0 --repeat 3

Components are random (ppdiffusers layout, built here); nothing is downloaded.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

CONFIGS = {
    # name: (unet kwargs, resolution, batch size)
    "tiny": (dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                  attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]), 32, 4),
    "mid": (dict(block_out_channels=[64, 128, 256], layers_per_block=2, cross_attention_dim=32, norm_num_groups=32,
                 attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]), 64, 4),
}
# the mid UNet on the latents of SD v1's VAE architecture (factor 8, random weights) at 128 px: the same
# 16 x 16 latents as "mid", with a VAE whose encoder costs what SD's does per pixel
CONFIGS["mid_sdvae"] = (CONFIGS["mid"][0], 128, 4)
SD_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)  # SD v1 vae/config.json
VAE_FACTOR = {"mid_sdvae": 8}  # else the toy VAE's 4


def _root(root, name):
    """The components folder of a size: the toy VAE's, or the one with SD v1's VAE architecture."""
    return os.path.join(root, "sdvae") if name in VAE_FACTOR else root


def _build_components(root):
    """Random VAE (factor 4), CLIP text encoder (hidden 32) and byte-level tokenizer, ppdiffusers layout."""
    import paddle
    from ppdiffusers import AutoencoderKL
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from sd_tiny import TINY_CLIP, write_tokenizer

    paddle.seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], layers_per_block=1,
                  latent_channels=4, norm_num_groups=8).save_pretrained(os.path.join(root, "vae"))
    CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).save_pretrained(os.path.join(root, "text_encoder"))
    write_tokenizer(os.path.join(root, "tokenizer"), model_max_length=16)


def _build_sd_vae(root):
    """<root>/sdvae: SD v1's VAE architecture (random) beside the same text encoder and tokenizer."""
    import paddle
    from ppdiffusers import AutoencoderKL

    sd = _root(root, "mid_sdvae")
    os.makedirs(sd, exist_ok=True)
    for part in ("text_encoder", "tokenizer"):
        os.symlink(os.path.join(root, part), os.path.join(sd, part))
    paddle.seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **SD_VAE).save_pretrained(os.path.join(sd, "vae"))


def _build_data(root, n=64, size=96):
    from PIL import Image

    from ldm.data.prepare import create_pretraining_data

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    with open(os.path.join(root, "img", "data.jsonl"), "w") as f:
        for i in range(n):
            img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(root, "img", f"{i}.jpg"), quality=90)
            f.write(json.dumps({"caption": f"image {i}", "image": f"{i}.jpg"}) + "\n")
    res = create_pretraining_data(os.path.join(root, "img", "data.jsonl"), os.path.join(root, "data"),
                                  per_part_file_num=16, save_gzip_file=True, progress=False)
    return res.filelist_list


class _StepClock:
    """A TrainerCallback (duck-typed) recording process and wall time at the end of every step."""

    def __init__(self):
        self.marks = []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **kw: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.process_time(), time.perf_counter()))


def _precompute(root, file_list, resolution):
    from ldm.train.sd import parse_precompute_args, precompute_latents

    out = os.path.join(root, f"latents_{resolution}")
    m, d, _ = parse_precompute_args(["--pretrained_model_name_or_path", root, "--model_max_length", "16",
                                     "--file_list", file_list, "--resolution", str(resolution),
                                     "--latents_path", out])
    t0, c0 = time.perf_counter(), time.process_time()
    precompute_latents(m, d, batch_size=8)
    return out, time.perf_counter() - t0, time.process_time() - c0


def run(name, root, file_list, steps, workers, latents_path=None, tag="", center_crop=False):
    unet_kwargs, resolution, batch = CONFIGS[name]
    cfg = dict(unet_kwargs, _class_name="UNet2DConditionModel", in_channels=4, out_channels=4,
               sample_size=resolution // VAE_FACTOR.get(name, 4))
    cfg_path = os.path.join(root, f"unet_{name}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_txt2img_laion400m_trainer.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = os.path.join(root, f"out_{name}_{workers}{tag}")
    extra = ["--latents_path", latents_path] if latents_path else ["--center_crop", str(center_crop)]
    clock = _StepClock()
    from ldm.train import sd as sd_recipe

    build = sd_recipe.build_sd_trainer

    def build_with_clock(*a, **kw):
        trainer, task, ema = build(*a, **kw)
        trainer.add_callback(clock)
        return trainer, task, ema

    sd_recipe.build_sd_trainer = build_with_clock
    try:
        trainer = train.main([
        "--do_train", "--output_dir", out, "--overwrite_output_dir", "--per_device_train_batch_size", str(batch),
        "--learning_rate", "1e-4", "--max_steps", str(steps), "--lr_scheduler_type", "constant",
        "--image_logging_steps", "0", "--logging_steps", str(steps), "--resolution", str(resolution),
        "--save_steps", str(10 * steps), "--seed", "0", "--dataloader_num_workers", str(workers),
        "--pretrained_model_name_or_path", _root(root, name), "--unet_name_or_path", cfg_path, "--file_list", file_list,
        "--model_max_length", "16", "--max_grad_norm", "-1", "--disable_tqdm", "True", "--report_to", "none",
        *extra])
    finally:
        sd_recipe.build_sd_trainer = build
    cpu = np.diff([m[0] for m in clock.marks])[2:]  # after warm-up, as below
    wall = np.diff([m[1] for m in clock.marks])[2:]
    timing = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "TimingCallback"][0]
    hist = timing.history[2:]  # skip warm-up steps (first batch, worker start-up)
    total = sum(h[1] for h in hist)
    wait = sum(h[2] for h in hist)
    params = sum(int(np.prod(p.shape)) for p in trainer.model.unet.parameters())
    return {"unet": name, "unet_params": params, "resolution": resolution, "batch": batch, "workers": workers,
            "timed_steps": len(hist), "steps_per_s": round(len(hist) / total, 3),
            "samples_per_s": round(len(hist) * batch / total, 2), "data_wait_share": round(wait / total, 4),
            "cpu_s_per_step": round(float(np.median(cpu)), 4), "wall_s_per_step": round(float(np.median(wall)), 4),
            "from": "latents" if latents_path else "images"}


def _encoder_cost(root, resolution, batch, repeat=5):
    """Median CPU seconds of what the latents replace in one step: VAE moments + text encoder of a batch."""
    from ldm.sd.loading import load_text_encoder, load_tokenizer, load_vae
    from ldm.train.sd import SDEncoders

    enc = SDEncoders(load_vae(os.path.join(root, "vae")), load_text_encoder(os.path.join(root, "text_encoder")),
                     load_tokenizer(os.path.join(root, "tokenizer"), 16))
    pixels = np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    times = []
    for _ in range(repeat):
        c0 = time.process_time()
        enc.cache_images(pixels)
        enc.cache_captions([f"image {i}" for i in range(batch)])
        times.append(time.process_time() - c0)
    return float(np.median(times))


def compare(name, root, file_list, steps, workers, repeat):
    """Images (centre crop) vs precomputed latents, alternately `repeat` times: medians and ratios."""
    resolution = CONFIGS[name][1]
    latents, pre_wall, pre_cpu = _precompute(_root(root, name), file_list, resolution)
    encoders_cpu = _encoder_cost(_root(root, name), resolution, CONFIGS[name][2])
    runs = {"images": [], "latents": []}
    for i in range(repeat):
        runs["images"].append(run(name, root, file_list, steps, workers, tag=f"_img{i}", center_crop=True))
        runs["latents"].append(run(name, root, file_list, steps, workers, latents_path=latents, tag=f"_lat{i}"))
    med = {k: {m: float(np.median([r[m] for r in v])) for m in ("cpu_s_per_step", "wall_s_per_step")}
           for k, v in runs.items()}
    return {"unet": name, "resolution": resolution, "batch": CONFIGS[name][2], "workers": workers, "repeat": repeat,
            "images": med["images"], "latents": med["latents"],
            "cpu_ratio": round(med["images"]["cpu_s_per_step"] / med["latents"]["cpu_s_per_step"], 3),
            "wall_ratio": round(med["images"]["wall_s_per_step"] / med["latents"]["wall_s_per_step"], 3),
            "precompute_wall_s": round(pre_wall, 2), "precompute_cpu_s": round(pre_cpu, 2),
            "encoders_cpu_s_per_batch": round(encoders_cpu, 4),
            "runs": {k: [(r["cpu_s_per_step"], r["wall_s_per_step"]) for r in v] for k, v in runs.items()},
            "load_before": os.getloadavg()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(CONFIGS))
    p.add_argument("--latents", action="store_true", help="images vs precomputed latents (--latents_path)")
    p.add_argument("--repeat", type=int, default=3, help="with --latents: alternating runs per mode")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        t0 = time.time()
        _build_components(root)
        if any(n in VAE_FACTOR for n in args.sizes):
            _build_sd_vae(root)
        file_list = _build_data(root)
        if args.latents:
            results = [compare(n, root, file_list, args.steps, w, args.repeat) for n in args.sizes for w in args.workers]
        else:
            results = [run(n, root, file_list, args.steps, w) for n in args.sizes for w in args.workers]
    for r in results:
        print(json.dumps(r))
    print(json.dumps({"total_seconds": round(time.time() - t0, 1)}))
    return results


if __name__ == "__main__":
    main()
