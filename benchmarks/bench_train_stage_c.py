"""Stage C fine-tuning throughput on CPU: the real Trainer loop (train_stage_c_trainer.py's pieces).

    OMP_NUM_THREADS=2 python benchmarks/bench_train_stage_c.py --presets tiny mid --steps 12

For each preset, `--steps` optimiser steps (after `--warmup` steps that are not counted) of the
PaddleNLP Trainer on the demo dataset (or --dataset_path), fp32, with the frozen tiny CLIP text
and image encoders, the real-size EfficientNet encoder and the tiny Previewer (offline weights):
- tiny: the `tiny` Stage C preset (0.4M parameters) at 128 px (latent 4 x 4);
- mid:  a 2-level Stage C with c_hidden 512, 4+8 / 8+4 CTA blocks (89M parameters) at 256 px
  (latent 8 x 8) - the 1B layout scaled down.
Reported per preset: steps/s, samples/s, the share of wall time spent waiting for the next batch
(`ldm.train.callbacks.TimingCallback`), and the share of a step spent in the frozen EfficientNet
forward (timed separately on the same batch). The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MID = dict(c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=512, c_hidden=[512, 512], nhead=[8, 8],
           blocks=[[4, 8], [8, 4]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
           c_clip_text=32, c_clip_text_pooled=32, c_clip_img=32, c_clip_seq=4, kernel_size=3,
           dropout=[0.1, 0.1], self_attn=True, t_conds=["sca", "crp"], switch_level=[False])
PRESETS = {"tiny": (None, 128), "mid": (MID, 256)}


def run(name, args, out_dir):
    import numpy as np
    import paddle

    from ldm.cascade.components import tiny_components
    from ldm.cascade.stage_c import StageC
    from ldm.train.stage_c import build_stage_c_trainer, parse_stage_c_args
    from ldm.train.callbacks import TimingCallback

    config, resolution = PRESETS[name]
    argv = ["--do_train", "--dataset_path", args.dataset_path, "--output_dir", os.path.join(out_dir, name),
            "--model_version", "tiny", "--resolution", str(resolution), "--per_device_train_batch_size",
            str(args.batch_size), "--max_steps", str(args.warmup + args.steps), "--learning_rate", "1e-4",
            "--logging_steps", "1", "--save_steps", "100000", "--report_to", "none", "--disable_tqdm", "True",
            "--image_logging_steps", "0", "--dataloader_num_workers", str(args.num_workers), "--seed", "1"]
    if args.cache:  # --cache_dir: encoder outputs computed once before training (not timed), encoders dropped
        argv += ["--cache_dir", os.path.join(out_dir, f"{name}_cache")]
    m, d, t = parse_stage_c_args(argv)
    comps = tiny_components()
    if config is not None:
        paddle.seed(1)
        comps.builders["stage_c"] = lambda: StageC(config)
    trainer, layer, _ = build_stage_c_trainer(m, d, t, components=comps, config=config)
    timing = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TimingCallback))
    trainer.train()
    hist = timing.history[args.warmup:]
    step_s = float(np.mean([h[1] for h in hist]))
    wait_s = float(np.mean([h[2] for h in hist]))
    effnet_s = 0.0
    if layer.effnet is not None:  # (a cached run has none)
        x = paddle.rand([args.batch_size, 3, resolution, resolution])
        layer.encode_latents(x)
        t0 = time.perf_counter()
        for _ in range(3):
            layer.encode_latents(x)
        effnet_s = (time.perf_counter() - t0) / 3
    n_params = sum(int(np.prod(p.shape)) for p in layer.stage_c.parameters())
    return {"preset": name, "cached": bool(args.cache), "stage_c_params": n_params, "resolution": resolution, "batch_size": args.batch_size,
            "steps_per_s": round(1 / step_s, 3), "samples_per_s": round(args.batch_size / step_s, 3),
            "data_wait_fraction": round(wait_s / step_s, 4), "effnet_fraction": round(min(effnet_s / step_s, 1.0), 4),
            "step_ms": round(step_s * 1000, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "mid"], choices=sorted(PRESETS))
    p.add_argument("--dataset_path", default=os.path.join(ROOT, "assets", "demo_dataset"))
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--cache", action="store_true", help="train from the encoder cache (--cache_dir)")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as out:
        for name in args.presets:
            r = run(name, args, out)
            print(f"{name}: {r['steps_per_s']} steps/s, {r['samples_per_s']} samples/s, data wait "
                  f"{100 * r['data_wait_fraction']:.1f}%, EfficientNet {100 * r['effnet_fraction']:.0f}% of a step "
                  f"({r['stage_c_params'] / 1e6:.1f}M Stage C parameters, {r['resolution']} px)", file=sys.stderr)
            results.append(r)
    print(json.dumps({"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "results": results}))
    return results


if __name__ == "__main__":
    main()
