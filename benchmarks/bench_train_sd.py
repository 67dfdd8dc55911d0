"""Benchmark: SD v1 pretraining throughput on CPU through the real path (LAION part files ->
LaionDataset -> DataLoader -> DiffusionTrainer step), for a tiny and a mid-size UNet.

Reports steps/s, samples/s and the share of wall time the step loop waited for the loader
(TimingCallback: time from the end of one step to the arrival of the next batch).

    OMP_NUM_THREADS=1 python benchmarks/bench_train_sd.py --steps 20 --workers 2

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


def run(name, root, file_list, steps, workers):
    unet_kwargs, resolution, batch = CONFIGS[name]
    cfg = dict(unet_kwargs, _class_name="UNet2DConditionModel", in_channels=4, out_channels=4,
               sample_size=resolution // 4)
    cfg_path = os.path.join(root, f"unet_{name}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_txt2img_laion400m_trainer.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = os.path.join(root, f"out_{name}_{workers}")
    trainer = train.main([
        "--do_train", "--output_dir", out, "--overwrite_output_dir", "--per_device_train_batch_size", str(batch),
        "--learning_rate", "1e-4", "--max_steps", str(steps), "--lr_scheduler_type", "constant",
        "--image_logging_steps", "0", "--logging_steps", str(steps), "--resolution", str(resolution),
        "--save_steps", str(10 * steps), "--seed", "0", "--dataloader_num_workers", str(workers),
        "--pretrained_model_name_or_path", root, "--unet_name_or_path", cfg_path, "--file_list", file_list,
        "--model_max_length", "16", "--max_grad_norm", "-1", "--disable_tqdm", "True", "--report_to", "none",
    ])
    timing = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "TimingCallback"][0]
    hist = timing.history[2:]  # skip warm-up steps (first batch, worker start-up)
    total = sum(h[1] for h in hist)
    wait = sum(h[2] for h in hist)
    params = sum(int(np.prod(p.shape)) for p in trainer.model.unet.parameters())
    return {"unet": name, "unet_params": params, "resolution": resolution, "batch": batch, "workers": workers,
            "timed_steps": len(hist), "steps_per_s": round(len(hist) / total, 3),
            "samples_per_s": round(len(hist) * batch / total, 2), "data_wait_share": round(wait / total, 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--sizes", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        t0 = time.time()
        _build_components(root)
        file_list = _build_data(root)
        results = [run(n, root, file_list, args.steps, w) for n in args.sizes for w in args.workers]
    for r in results:
        print(json.dumps(r))
    print(json.dumps({"total_seconds": round(time.time() - t0, 1)}))
    return results


if __name__ == "__main__":
    main()
