"""SD v1 training loss pieces vs diffusers' DDPMScheduler (torch) on identical random inputs; the
argument parsing contract (env-flag defaults); local-only path handling."""
import itertools
import json
import logging
import os

import numpy as np
import pytest

B, C, H, W = 5, 4, 6, 6
TIMESTEPS = np.array([0, 1, 250, 700, 999], dtype=np.int64)


def _inputs():
    rng = np.random.default_rng(7)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(latents=f(B, C, H, W), noise=f(B, C, H, W), offset=f(B, C, 1, 1), perturb=f(B, C, H, W),
                pred=f(B, C, H, W))


def _reference(x, prediction_type, snr_gamma, noise_offset, input_perturbation):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type=prediction_type)
    t = torch.from_numpy(TIMESTEPS)
    latents, noise = torch.from_numpy(x["latents"]), torch.from_numpy(x["noise"])
    if noise_offset:
        noise = noise + noise_offset * torch.from_numpy(x["offset"])
    model_noise = noise + input_perturbation * torch.from_numpy(x["perturb"]) if input_perturbation else noise
    noisy = sched.add_noise(latents, model_noise, t)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    pred = torch.from_numpy(x["pred"])
    if snr_gamma is None:
        return noisy.numpy(), target.numpy(), None, F.mse_loss(pred, target).item()
    snr = compute_snr(sched, t)
    w = torch.stack([snr, snr_gamma * torch.ones_like(t, dtype=snr.dtype)], dim=1).min(dim=1)[0]
    w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
    per = F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3])
    return noisy.numpy(), target.numpy(), w.numpy(), (per * w).mean().item()


CASES = list(itertools.product(["epsilon", "v_prediction"], [None, 5.0], [0.0, 0.1], [0.0, 0.1]))


def test_loss_terms_match_diffusers_ddpm():
    import paddle

    from ldm.sd.diffusion import DDPMSchedule, training_terms, weighted_mse

    x = _inputs()
    acp = paddle.to_tensor(DDPMSchedule().alphas_cumprod())
    pt = lambda k: paddle.to_tensor(x[k])  # noqa: E731
    checked = 0
    for prediction_type, gamma, offset, perturb in CASES:
        ref_noisy, ref_target, ref_w, ref_loss = _reference(x, prediction_type, gamma, offset, perturb)
        terms = training_terms(pt("latents"), pt("noise"), paddle.to_tensor(TIMESTEPS), acp, prediction_type,
                               offset, pt("offset"), perturb, pt("perturb"), gamma)
        case = (prediction_type, gamma, offset, perturb)
        np.testing.assert_allclose(terms.noisy_latents.numpy(), ref_noisy, atol=2e-6, err_msg=str(case))
        np.testing.assert_allclose(terms.target.numpy(), ref_target, atol=2e-6, err_msg=str(case))
        if gamma is None:
            assert terms.weights is None and ref_w is None
        else:
            np.testing.assert_allclose(terms.weights.numpy(), ref_w, rtol=1e-5, err_msg=str(case))
        loss = weighted_mse(pt("pred"), terms.target, terms.weights).item()
        assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (case, loss, ref_loss)
        checked += 1
    assert checked == 16


def test_min_snr_weights_are_per_sample():
    """Different timesteps in one batch get different weights (PaddleMIX's `.min(axis=1)[0]` gave
    the whole batch the first sample's weight)."""
    import paddle

    from ldm.sd.diffusion import DDPMSchedule, training_terms

    x = _inputs()
    acp = paddle.to_tensor(DDPMSchedule().alphas_cumprod())
    for pred_type in ("epsilon", "v_prediction"):
        w = training_terms(paddle.to_tensor(x["latents"]), paddle.to_tensor(x["noise"]), paddle.to_tensor(TIMESTEPS),
                           acp, pred_type, snr_gamma=5.0).weights.numpy()
        assert w.shape == (B,)
        assert len(np.unique(np.round(w, 6))) >= 3, w  # t=0, t=1 and the SNR<gamma ones differ
        if pred_type == "epsilon":  # low t: SNR >> gamma -> gamma/SNR < 1; high t: SNR < gamma -> 1
            assert w[0] < 0.01 and w[-1] == pytest.approx(1.0)


def test_bad_terms_inputs_raise():
    import paddle

    from ldm.sd.diffusion import DDPMSchedule, training_terms

    acp = paddle.to_tensor(DDPMSchedule().alphas_cumprod())
    z = paddle.zeros([2, 4, 2, 2])
    t = paddle.to_tensor([1, 2], dtype="int64")
    with pytest.raises(ValueError, match="prediction_type"):
        training_terms(z, z, t, acp, "sample")
    with pytest.raises(ValueError, match="offset_noise"):
        training_terms(z, z, t, acp, noise_offset=0.1)
    with pytest.raises(ValueError, match="perturbation_noise"):
        training_terms(z, z, t, acp, input_perturbation=0.1)


BASE = ["--output_dir", "unused_out", "--do_train"]


@pytest.mark.parametrize("env,flags,expect", [
    ({}, [], (False, False, False)),
    ({"FLAG_USE_EMA": "1", "FLAG_RECOMPUTE": "true", "FLAG_XFORMERS": "True"}, [], (True, True, True)),
    ({"FLAG_USE_EMA": "0", "FLAG_RECOMPUTE": "false", "FLAG_XFORMERS": "False"}, [], (False, False, False)),
    ({"FLAG_USE_EMA": "1", "FLAG_RECOMPUTE": "1"}, ["--use_ema", "False", "--recompute", "0"], (False, False, False)),
    ({}, ["--use_ema", "--recompute", "true", "--enable_xformers_memory_efficient_attention", "1"], (True, True, True)),
])
def test_env_flags_are_defaults_of_explicit_flags(monkeypatch, tmp_path, env, flags, expect):
    from ldm.train.sd import parse_sd_args

    for k in ("FLAG_USE_EMA", "FLAG_RECOMPUTE", "FLAG_XFORMERS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _, _, t = parse_sd_args(["--output_dir", str(tmp_path)] + flags)
    assert (t.use_ema, t.recompute, t.enable_xformers_memory_efficient_attention) == expect


def test_bad_env_flag_is_named(monkeypatch, tmp_path):
    from ldm.train.sd import parse_sd_args

    monkeypatch.setenv("FLAG_USE_EMA", "maybe")
    with pytest.raises(ValueError, match="FLAG_USE_EMA"):
        parse_sd_args(["--output_dir", str(tmp_path)])


def test_learning_rates_and_seed_flags(tmp_path):
    from ldm.train.sd import parse_sd_args

    m, d, t = parse_sd_args([
        "--output_dir", str(tmp_path), "--do_train", "--per_device_train_batch_size", "32",
        "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4", "--unet_learning_rate", "2e-4",
        "--train_text_encoder", "True", "--text_encoder_learning_rate", "5e-6", "--weight_decay", "0.01",
        "--max_steps", "200000", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--image_logging_steps", "1000", "--logging_steps", "10", "--resolution", "256", "--save_steps", "10000",
        "--save_total_limit", "20", "--seed", "23", "--dataloader_num_workers", "4",
        "--vae_name_or_path", "CompVis/stable-diffusion-v1-4/vae",
        "--text_encoder_name_or_path", "CompVis/stable-diffusion-v1-4/text_encoder",
        "--unet_name_or_path", "./sd/unet_config.json", "--file_list", "x.filelist.list", "--model_max_length", "77",
        "--max_grad_norm", "-1", "--disable_tqdm", "True", "--bf16", "False", "--fp16", "False",
        "--fp16_opt_level", "O1", "--prediction_type", "v_prediction", "--noise_offset", "0.05",
        "--snr_gamma", "5.0", "--input_perturbation", "0.1", "--num_inference_steps", "25",
        "--tokenizer_name", "tok", "--pretrained_model_name_or_path", "pre", "--only_save_updated_model", "True",
    ])
    assert t.learning_rate == 2e-4 and t.unet_learning_rate == 2e-4 and t.text_encoder_learning_rate == 5e-6
    assert m.train_text_encoder and m.prediction_type == "v_prediction" and m.snr_gamma == 5.0
    assert d.resolution == 256 and t.save_total_limit == 20 and t.image_logging_steps == 1000
    with pytest.raises(ValueError, match="prediction_type"):
        parse_sd_args(["--output_dir", str(tmp_path), "--prediction_type", "sample"])


def test_hub_id_fails_clearly_and_unet_choice_is_logged(tmp_path, caplog):
    from ldm.train.sd import SDModelArguments
    from ldm.sd.loading import load_unet, load_vae, resolve_paths
    from sd_tiny import TINY_UNET

    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_vae("CompVis/stable-diffusion-v1-4/vae")
    cfg = tmp_path / "unet_config.json"

    cfg.write_text(json.dumps(TINY_UNET))
    with pytest.raises(FileNotFoundError, match="VAE"):  # every path is checked before anything loads
        resolve_paths(SDModelArguments(pretrained_model_name_or_path=str(tmp_path / "pipe"), unet_name_or_path=str(cfg)))
    for sub in ("vae", "text_encoder", "tokenizer"):
        (tmp_path / "pipe" / sub).mkdir(parents=True)
    paths = resolve_paths(SDModelArguments(pretrained_model_name_or_path=str(tmp_path / "pipe"),
                                           unet_name_or_path=str(cfg)))
    assert paths.unet == str(cfg) and paths.vae == str(tmp_path / "pipe" / "vae")
    # the seed's multi-GPU command passes ./unet_config.json: the shipped SD v1 config is used
    shipped = resolve_paths(SDModelArguments(pretrained_model_name_or_path=str(tmp_path / "pipe"),
                                             unet_name_or_path=str(tmp_path / "nowhere" / "unet_config.json")))
    assert shipped.unet.endswith(os.path.join("sd", "unet_config.json"))
    with open(shipped.unet) as f:
        sd_v1 = json.load(f)
    assert sd_v1["block_out_channels"] == [320, 640, 1280, 1280] and sd_v1["cross_attention_dim"] == 768
    logging.getLogger("ldm.sd.loading").propagate = True
    with caplog.at_level(logging.INFO, logger="ldm.sd.loading"):
        unet = load_unet(str(cfg))
    assert unet.config.block_out_channels == [32, 64] or tuple(unet.config.block_out_channels) == (32, 64)
    assert any("RANDOM initialisation" in r.getMessage() for r in caplog.records)


def test_model_forward_wiring_matches_reference(tmp_path):
    """SDTask.forward = tokenized captions; VAE sample x scaling factor ->
    noise/offset/perturbation -> timesteps -> UNet(noisy, t, text states) -> Min-SNR weighted MSE,
    checked against the torch reference formula fed with the same random draws (replayed from the
    same paddle seed)."""
    import paddle
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel
    from sd_tiny import TINY_CLIP, TINY_UNET, TINY_VAE, write_tokenizer

    from ldm.sd.loading import load_tokenizer
    from ldm.train.sd import SDTask

    paddle.seed(1)
    vae = AutoencoderKL(**TINY_VAE)
    assert vae.config.scaling_factor == 0.18215
    write_tokenizer(str(tmp_path / "tok"))
    model = SDTask(UNet2DConditionModel(**TINY_UNET), vae, CLIPTextModel(CLIPTextConfig(**TINY_CLIP)),
                                 load_tokenizer(str(tmp_path / "tok"), 16), prediction_type="v_prediction",
                                 noise_offset=0.1, input_perturbation=0.1, snr_gamma=5.0)
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.uniform(-1, 1, (3, 3, 16, 16)).astype("float32"))
    captions = ["a cat", "a dog", ""]
    ids = model.tokenize(captions)  # (3, 16) int64, what forward encodes (no caption dropout here)
    paddle.seed(123)
    loss = float(model(pixel_values=x, caption=captions))

    paddle.seed(123)  # replay the draws in forward's order
    with paddle.no_grad():
        z = model.vae.encode(x).latent_dist.sample() * 0.18215
        noise = paddle.randn(z.shape)
        offset = paddle.randn([3, 4, 1, 1])
        perturb = paddle.randn(z.shape)
        t = paddle.randint(0, 1000, [3], dtype="int64")
        ctx = model.text_encoder(ids)[0]
    T = lambda a: torch.from_numpy(a.numpy())  # noqa: E731
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="v_prediction")
    tt = T(t)
    n = T(noise) + 0.1 * T(offset)
    noisy = sched.add_noise(T(z), n + 0.1 * T(perturb), tt)
    target = sched.get_velocity(T(z), n, tt)
    with paddle.no_grad():
        pred = model.unet(paddle.to_tensor(noisy.numpy()), t, encoder_hidden_states=ctx).sample
    snr = compute_snr(sched, tt)
    w = torch.clamp(snr, max=5.0) / (snr + 1)
    ref = (F.mse_loss(T(pred), target, reduction="none").mean(dim=[1, 2, 3]) * w).mean().item()
    assert abs(loss - ref) <= 1e-5 * max(1.0, abs(ref)), (loss, ref)


def test_fp16_on_cpu_is_refused_up_front(tmp_path):
    import paddle

    from ldm.train.sd import parse_sd_args
    from ldm.train.args import check_precision

    _, _, t = parse_sd_args(["--output_dir", str(tmp_path), "--fp16", "False", "--bf16", "False"])
    check_precision(t)  # fp32: fine anywhere
    if paddle.device.is_compiled_with_cuda():
        pytest.skip("GPU build: fp16 is allowed")
    t.fp16 = True
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        check_precision(t)


def test_weight_layout_detection(tmp_path):
    from ldm.sd.loading import is_torch_layout
    from ldm.weights import save_safetensors

    w = {"a": np.zeros(2, np.float32)}
    te = tmp_path / "te"
    te.mkdir()
    save_safetensors(w, str(te / "model.safetensors"), metadata={"format": "pt"})
    assert is_torch_layout(str(te))
    (te / "model_state.pdparams").write_bytes(b"")  # left behind by PaddleNLP's own conversion
    assert is_torch_layout(str(te))  # the torch file is still what gets loaded (in memory, converted)
    pd = tmp_path / "pd"
    pd.mkdir()
    save_safetensors(w, str(pd / "model.safetensors"), metadata={"format": "np"})
    assert not is_torch_layout(str(pd))
    unet = tmp_path / "unet"
    unet.mkdir()
    save_safetensors(w, str(unet / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    assert is_torch_layout(str(unet))
    save_safetensors(w, str(unet / "diffusion_paddle_model.safetensors"), metadata={"format": "pd"})
    assert not is_torch_layout(str(unet))
