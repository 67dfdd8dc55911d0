"""Learning check: the tiny SD model (SDTask.forward as the training step) lowers
the held-out denoising loss by at least 30% on a small synthetic dataset."""
import time

import numpy as np

STEPS, BATCH = 40, 8


def _images(rng, n, size=16):
    """Two-colour images (a random colour left/right split at a random column) in [-1, 1]."""
    out = np.empty((n, 3, size, size), dtype=np.float32)
    labels = rng.integers(0, 8, size=n)
    for i in range(n):
        a, b = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
        cut = rng.integers(4, size - 4)
        out[i, :, :, :cut] = a[:, None, None]
        out[i, :, :, cut:] = b[:, None, None]
    return out, labels


def test_heldout_denoising_loss_drops(tmp_path):
    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel
    from sd_tiny import TINY_CLIP, TINY_UNET, TINY_VAE, write_tokenizer

    from ldm.sd.diffusion import training_terms, weighted_mse
    from ldm.sd.loading import load_tokenizer
    from ldm.train.sd import SDTask

    write_tokenizer(str(tmp_path))
    t0 = time.time()
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = SDTask(UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE),
                                 CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), load_tokenizer(str(tmp_path), 16),
                                 prediction_type="epsilon")
    train_x, train_y = _images(rng, 64)
    test_x, test_y = _images(rng, 16)
    captions = lambda y: [f"colour pair {int(c)}" for c in y]  # noqa: E731

    # fixed held-out evaluation: same latents, noise and (stratified) timesteps before and after
    with paddle.no_grad():
        z = model.encode_latents(paddle.to_tensor(test_x), sample=False)
        ctx = model.encode_text(model.tokenize(captions(test_y)))
    noise = paddle.to_tensor(rng.standard_normal(z.shape).astype("float32"))
    t = paddle.to_tensor(np.linspace(0, 999, z.shape[0]).astype("int64"))
    terms = training_terms(z, noise, t, model.alphas_cumprod, "epsilon")

    def heldout():
        model.eval()
        with paddle.no_grad():
            pred = model.unet(terms.noisy_latents, t, encoder_hidden_states=ctx).sample
        model.train()
        return float(weighted_mse(pred, terms.target))

    before = heldout()
    params = [p for p in model.parameters() if not p.stop_gradient]
    assert len(params) == len(list(model.unet.parameters()))  # VAE and text encoder frozen
    opt = paddle.optimizer.AdamW(learning_rate=2e-3, parameters=params, weight_decay=0.0)
    for step in range(STEPS):
        idx = rng.integers(0, len(train_x), size=BATCH)
        loss = model(pixel_values=paddle.to_tensor(train_x[idx]), caption=captions(train_y[idx]))
        loss.backward()
        opt.step()
        opt.clear_grad()
    after = heldout()
    trivial = float((terms.target ** 2).mean())  # the loss of always predicting 0
    assert after <= 0.7 * before, (before, after)
    # more than the trivial "predict zero" solution: real denoising was learned
    assert after <= 0.7 * trivial, (trivial, after)
    assert time.time() - t0 < 90, time.time() - t0
