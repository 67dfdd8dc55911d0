"""Peak host memory (RSS) of one Stage C training step at batch 1, LoRA vs full fine-tuning, CPU fp32.

    OMP_NUM_THREADS=1 python benchmarks/bench_lora_memory.py --mode lora [--preset 1B] [--latent 24]

One process per mode (peak RSS is per process). The network is the preset with random weights
(the memory does not depend on the values); the conditioning is random tensors of the real
shapes (CLIP text [1, 77, 1280], pooled [1, 1, 1280], image [1, 1, 768]), so the frozen encoders
(EfficientNet, CLIP: a few GB more in a real run) are not counted. The step: GDF diffuse, forward,
P2-weighted MSE, backward, AdamW (weight decay 0.01) on the trainable parameters.
"""
import argparse
import json
import resource
import time

import numpy as np
import paddle


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["lora", "full"], required=True)
    p.add_argument("--preset", default="1B")
    p.add_argument("--latent", type=int, default=24, help="Stage C latent side (24 = 768 px training)")
    p.add_argument("--rank", type=int, default=4)
    args = p.parse_args(argv)
    from ldm.cascade.gdf import stable_cascade_gdf
    from ldm.cascade.stage_c import StageC, stage_c_config
    from ldm.lora import LoRASpec, add_lora

    paddle.seed(0)
    net = StageC(stage_c_config(args.preset))
    after_build = rss_gib()
    n_base = sum(int(np.prod(q.shape)) for q in net.parameters())
    if args.mode == "lora":
        for q in net.parameters():
            q.stop_gradient = True
        add_lora(net, LoRASpec(args.rank, 1.0, "attention"))
        params = [q for n, q in net.named_parameters() if ".lora_" in n]
    else:
        params = list(net.parameters())
    n_train = sum(int(np.prod(q.shape)) for q in params)
    opt = paddle.optimizer.AdamW(1e-4, parameters=params, weight_decay=0.01)
    net.train()
    gdf = stable_cascade_gdf()
    rng = np.random.default_rng(0)
    s = args.latent
    lat = paddle.to_tensor(rng.standard_normal([1, 16, s, s], dtype=np.float32))
    cond = dict(clip_text=paddle.to_tensor(rng.standard_normal([1, 77, 1280], dtype=np.float32)),
                clip_text_pooled=paddle.to_tensor(rng.standard_normal([1, 1, 1280], dtype=np.float32)),
                clip_img=paddle.zeros([1, 1, 768], "float32"))
    t0 = time.perf_counter()
    d = gdf.diffuse(lat, t=paddle.to_tensor([0.5], "float32"), shift=1.0, loss_shift=1.0)
    pred = net(d.noised, d.noise_cond, **cond)
    loss = (((pred - d.target) ** 2).mean(axis=[1, 2, 3]) * d.loss_weight).mean()
    loss.backward()
    opt.step()
    opt.clear_grad()
    out = {"mode": args.mode, "preset": args.preset, "latent": s, "parameters": n_base, "trainable": n_train,
           "rss_after_build_gib": round(after_build, 2), "peak_rss_gib": round(rss_gib(), 2),
           "step_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
