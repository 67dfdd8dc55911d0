"""The Stage C training step learns: on a small synthetic dataset (coloured shapes with captions)
the held-out denoising loss at fixed noise and times drops by >= 30% within 120 CPU steps of the
tiny model (AdamW 1e-3, weight decay 0.01, clip 1.0 - the optimiser setup of the Trainer).

The EfficientNet encoder is frozen and deterministic, so its latents are computed once per image
and looked up during the loop (the rest of `StageCTask.forward` runs unchanged every step).
"""
import numpy as np
import paddle

import ldm.train.stage_c as train_c

COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("square", "circle", "stripe", "dot")
R = 64  # -> Stage C latent 2 x 2
STEPS = 120


def draw(color, shape):
    yy, xx = np.mgrid[0:R, 0:R] / R
    mask = {"square": (abs(xx - 0.5) < 0.25) & (abs(yy - 0.5) < 0.25),
            "circle": (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.09,
            "stripe": abs(yy - 0.5) < 0.12,
            "dot": (xx - 0.3) ** 2 + (yy - 0.3) ** 2 < 0.01}[shape]
    img = np.full([3, R, R], 0.85, np.float32)
    img[:, mask] = np.array(COLORS[color], np.float32)[:, None]
    return img, f"a {color} {shape} on a white background"


def test_heldout_denoising_loss_drops():
    from ldm.cascade.components import tiny_components

    paddle.seed(0)
    layer = train_c.StageCTask(tiny_components(), train_c.stage_c_config_of("tiny"), seed=0)
    pairs = [draw(c, s) for c in COLORS for s in SHAPES]
    held = [pairs.pop(i) for i in (15, 10, 5, 0)]  # 4 unseen (colour, shape) combinations
    with paddle.no_grad():
        lat_train = layer.encode_latents(paddle.to_tensor(np.stack([p[0] for p in pairs])))  # (12, 16, 2, 2)
        lat_held = layer.encode_latents(paddle.to_tensor(np.stack([p[0] for p in held])))
    current = {}
    layer.encode_latents = lambda pixel_values: current["latents"]  # cached frozen-encoder output

    # held-out evaluation: 4 images x 8 times, fixed noise
    n_t = 8
    t = paddle.to_tensor(np.repeat(np.linspace(0.1, 0.9, n_t, dtype=np.float32)[None], 4, 0).reshape(-1))
    eps = paddle.to_tensor(np.random.default_rng(123).standard_normal([4 * n_t, 16, 2, 2], dtype=np.float32))
    lat_eval = paddle.repeat_interleave(lat_held, n_t, axis=0)
    text, pooled = layer.encode_captions([c for _, c in held for _ in range(n_t)])
    img = paddle.zeros([4 * n_t, 1, layer.c_clip_img])

    def heldout():
        return layer.denoising_loss(lat_eval, eps, t, text, pooled, img)

    before = heldout()
    opt = paddle.optimizer.AdamW(1e-3, parameters=layer.stage_c.parameters(), weight_decay=0.01,
                                 grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    rng = np.random.default_rng(0)
    dummy = paddle.zeros([4, 3, R, R])
    train_losses = []
    for _ in range(STEPS):
        idx = rng.choice(len(pairs), 4, replace=False)
        current["latents"] = paddle.gather(lat_train, paddle.to_tensor(idx))
        loss = layer(dummy, [pairs[i][1] for i in idx])
        loss.backward()
        opt.step()
        opt.clear_grad()
        train_losses.append(float(loss))
    after = heldout()
    assert np.isfinite(train_losses).all()
    assert after <= 0.7 * before, (before, after)
