"""Time one Stage C denoising step: this project (Paddle) vs diffusers' StableCascadeUNet (torch),
same weights, same inputs, same process, CPU, fp32.

    OMP_NUM_THREADS=1 python benchmarks/bench_stage_c.py            # mid-size config, 24x24, batch 2
    OMP_NUM_THREADS=2 python benchmarks/bench_stage_c.py --profile  # plus per-block-type times
    OMP_NUM_THREADS=1 python benchmarks/bench_stage_c.py --kernels plain  # without the CPU kernels

The default "mid" network is the 1B layout (two CTA levels, 64-wide heads) at width 768, 12 heads
and depth [[2, 6], [6, 2]] (0.14B parameters), so one step takes seconds on one CPU core;
`--preset 1B` times the real lite prior. Our side runs with the CPU kernels of
`ldm.cascade.cpu_kernels` switched on (what a CPU run uses); `--kernels plain` times the
default path (SDPA attention, reference-shaped GRN). The JSON says which ran.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from ldm.cascade.common import AttnBlock, ResBlock, TimestepBlock  # noqa: E402
from ldm.cascade.cpu_kernels import set_fast_cpu_kernels  # noqa: E402
from ldm.cascade.convert import export_unet_weights  # noqa: E402
from ldm.cascade.stage_c import StageC, stage_c_config  # noqa: E402

MID = dict(c_cond=768, c_hidden=[768, 768], nhead=[12, 12], blocks=[[2, 6], [6, 2]])


def build_pair(preset: str, seed: int = 0):
    config = stage_c_config("1B", **MID) if preset == "mid" else stage_c_config(preset)
    cfg = config.to_dict()  # plain lists, for diffusers
    paddle.seed(seed)
    ours = StageC(config)
    with paddle.no_grad():
        for p in ours.parameters():  # random everywhere (no zero fast paths)
            fan = int(np.prod(p.shape[:-1])) if len(p.shape) == 2 else int(np.prod(p.shape[1:])) or 1
            p.set_value(paddle.randn(p.shape) * (0.5 / np.sqrt(fan)))
    ours.eval()

    import torch
    from diffusers.models import StableCascadeUNet
    from safetensors.torch import load_file

    kinds = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}
    ref = StableCascadeUNet(
        in_channels=cfg["c_in"], out_channels=cfg["c_out"], timestep_ratio_embedding_dim=cfg["c_r"], patch_size=cfg["patch_size"],
        conditioning_dim=cfg["c_cond"], block_out_channels=cfg["c_hidden"], num_attention_heads=cfg["nhead"],
        down_num_layers_per_block=cfg["blocks"][0], up_num_layers_per_block=cfg["blocks"][1],
        down_blocks_repeat_mappers=cfg["block_repeat"][0], up_blocks_repeat_mappers=cfg["block_repeat"][1],
        block_types_per_layer=[[kinds[k] for k in lc] for lc in cfg["level_config"]],
        clip_text_in_channels=cfg["c_clip_text"], clip_text_pooled_in_channels=cfg["c_clip_text_pooled"],
        clip_image_in_channels=cfg["c_clip_img"], clip_seq=cfg["c_clip_seq"], kernel_size=cfg["kernel_size"],
        dropout=cfg["dropout"], self_attn=cfg["self_attn"], timestep_conditioning_type=cfg["t_conds"],
        switch_level=cfg["switch_level"],
    ).eval()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.safetensors")
        export_unet_weights(ours, "c", "diffusers", path)
        missing, unexpected = ref.load_state_dict(load_file(path), strict=True)
        del missing, unexpected
    return cfg, ours, ref


def inputs(cfg, batch, size, seed=1):
    g = np.random.default_rng(seed)
    f = lambda *s: g.standard_normal(s).astype("float32")  # noqa: E731
    return dict(x=f(batch, cfg["c_in"], size, size), r=g.random(batch).astype("float32"), clip_text=f(batch, 77, cfg["c_clip_text"]),
                clip_text_pooled=f(batch, 1, cfg["c_clip_text_pooled"]), clip_img=f(batch, 1, cfg["c_clip_img"]))


def run_ours(model, a):
    t = {k: paddle.to_tensor(v) for k, v in a.items()}
    with paddle.no_grad():
        return model(t["x"], t["r"], t["clip_text"], t["clip_text_pooled"], t["clip_img"]).numpy()


def run_ref(model, a):
    import torch

    t = {k: torch.from_numpy(v) for k, v in a.items()}
    with torch.no_grad():
        return model(t["x"], t["r"], clip_text_pooled=t["clip_text_pooled"], clip_text=t["clip_text"], clip_img=t["clip_img"]).sample.numpy()


def best_of(fn, repeats):
    """(best wall seconds, best process CPU seconds). CPU time is the steadier figure on a
    shared machine; with one thread it is the work done."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def profile_ours(model, a):
    """Seconds spent per block type in one step (forward pre/post hooks)."""
    acc, start = {}, {}

    def pre(layer, _inp):
        start[id(layer)] = time.process_time()

    def post(layer, _inp, _out):
        k = type(layer).__name__
        acc[k] = acc.get(k, 0.0) + time.process_time() - start[id(layer)]

    hs = []
    for layer in model.sublayers():
        if isinstance(layer, (ResBlock, TimestepBlock, AttnBlock)):
            hs += [layer.register_forward_pre_hook(pre), layer.register_forward_post_hook(post)]
    run_ours(model, a)
    for h in hs:
        h.remove()
    return acc


def profile_ref(model, a):
    import torch  # noqa: F401

    acc, start = {}, {}
    hs = []
    for m in model.modules():
        if type(m).__name__ in ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"):
            hs.append(m.register_forward_pre_hook(lambda mod, i: start.__setitem__(id(mod), time.process_time())))
            hs.append(m.register_forward_hook(lambda mod, i, o: acc.__setitem__(type(mod).__name__, acc.get(type(mod).__name__, 0.0) + time.process_time() - start[id(mod)])))
    run_ref(model, a)
    for h in hs:
        h.remove()
    return acc


def main(argv=None):
    p = argparse.ArgumentParser(description="one Stage C step: ours vs diffusers")
    p.add_argument("--preset", default="mid", choices=["mid", "tiny", "1B", "3.6B"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--kernels", choices=["cpu", "plain"], default="cpu",
                   help="cpu: ldm.cascade.cpu_kernels switched on (default); plain: the default network path")
    args = p.parse_args(argv)
    set_fast_cpu_kernels(args.kernels == "cpu")

    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    cfg, ours, ref = build_pair(args.preset)
    a = inputs(cfg, args.batch, args.size)
    diff = float(np.abs(run_ours(ours, a) - run_ref(ref, a)).max())  # also the warm-up run
    ours_best, ours_cpu = best_of(lambda: run_ours(ours, a), args.repeats)
    ref_best, ref_cpu = best_of(lambda: run_ref(ref, a), args.repeats)
    result = {
        "preset": args.preset, "kernels": args.kernels, "batch": args.batch, "latent": [cfg["c_in"], args.size, args.size], "threads": threads,
        "parameters": int(sum(int(np.prod(p.shape)) for p in ours.parameters())),
        "ours_s": round(ours_best, 4), "diffusers_s": round(ref_best, 4), "ratio": round(ours_best / ref_best, 3),
        "ours_cpu_s": round(ours_cpu, 4), "diffusers_cpu_s": round(ref_cpu, 4), "cpu_ratio": round(ours_cpu / ref_cpu, 3),
        "max_abs_diff": diff,
    }
    if args.profile:
        result["ours_by_block_s"] = {k: round(v, 4) for k, v in profile_ours(ours, a).items()}
        result["diffusers_by_block_s"] = {k: round(v, 4) for k, v in profile_ref(ref, a).items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
