"""SD loading never runs pickle code by default (issue 7 + the project rule "never unpickle by default"):
`.pdparams` goes through the restricted unpickler and loads exactly, a code-executing `.pdparams` is
refused without running, PyTorch `.bin` folders are refused with a message naming the file (and load
only with the explicit opt-in), and safetensors wins over a pickle in the same folder."""
import json
import os
import pickle

import numpy as np
import pytest


class _Payload:
    """Unpickling this creates `marker` (stands in for arbitrary code execution)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"conv_in.weight": _Payload(marker)}, f, protocol=2)


def _tiny_paddle_unet():
    import paddle
    from ppdiffusers import UNet2DConditionModel
    from sd_tiny import TINY_UNET

    paddle.seed(5)
    unet = UNet2DConditionModel(**TINY_UNET)
    rng = np.random.default_rng(0)
    for p in unet.parameters():  # non-zero everywhere (conv_out is zero-initialised)
        p.set_value(paddle.to_tensor((p.numpy() + 0.05 * rng.standard_normal(p.shape)).astype("float32")))
    unet.eval()
    return unet


def _unet_out(unet):
    import paddle

    rng = np.random.default_rng(1)
    x = paddle.to_tensor(rng.standard_normal((2, 4, 8, 8)).astype("float32"))
    ctx = paddle.to_tensor(rng.standard_normal((2, 5, 32)).astype("float32"))
    t = paddle.to_tensor(np.array([10, 900], dtype="int64"))
    with paddle.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample.numpy()


def test_pdparams_unet_loads_through_restricted_unpickler(tmp_path, monkeypatch):
    import paddle

    from ldm.sd.loading import load_unet

    unet = _tiny_paddle_unet()
    folder = tmp_path / "unet"
    unet.save_config(str(folder))
    paddle.save(unet.state_dict(), str(folder / "model_state.pdparams"))
    assert sorted(os.listdir(folder)) == ["config.json", "model_state.pdparams"]
    ref = _unet_out(unet)
    assert np.abs(ref).mean() > 1e-2

    def no_paddle_load(*a, **k):
        raise AssertionError("paddle.load (plain pickle) was called")

    monkeypatch.setattr(paddle, "load", no_paddle_load)
    got = _unet_out(load_unet(str(folder)))
    assert np.abs(got - ref).max() <= 1e-6

    # strict: a missing and an unexpected key are one error listing both
    from ldm.weights import WeightsError

    state = {k: v.numpy() for k, v in unet.state_dict().items()}
    state["extra.weight"] = state.pop("conv_in.bias")
    with open(folder / "model_state.pdparams", "wb") as f:
        pickle.dump(state, f, protocol=4)
    with pytest.raises(WeightsError) as e:
        load_unet(str(folder))
    assert "1 missing" in str(e.value) and "conv_in.bias" in str(e.value)
    assert "1 unexpected" in str(e.value) and "extra.weight" in str(e.value)


def test_code_executing_pdparams_is_refused_and_never_runs(tmp_path):
    from sd_tiny import TINY_UNET

    from ldm.sd.loading import load_unet
    from ldm.weights import WeightsError

    # the payload is live: plain pickle.load runs it
    live = tmp_path / "live.pdparams"
    _evil_pickle(live, tmp_path / "ran_with_plain_pickle")
    with open(live, "rb") as f:
        pickle.load(f)
    assert (tmp_path / "ran_with_plain_pickle").exists()

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(TINY_UNET, _class_name="UNet2DConditionModel")))
    marker = tmp_path / "pwned"
    _evil_pickle(folder / "model_state.pdparams", marker)
    with pytest.raises(WeightsError) as e:
        load_unet(str(folder))
    assert "refusing to unpickle" in str(e.value) and "model_state.pdparams" in str(e.value)
    assert not marker.exists()


def test_safetensors_wins_over_a_pickle_in_the_same_folder(tmp_path):
    from ldm.sd.loading import load_unet

    unet = _tiny_paddle_unet()
    folder = tmp_path / "unet"
    unet.save_pretrained(str(folder))
    assert "diffusion_paddle_model.safetensors" in os.listdir(folder)
    marker = tmp_path / "pwned"
    _evil_pickle(folder / "model_state.pdparams", marker)
    _evil_pickle(folder / "diffusion_pytorch_model.bin", marker)
    got = _unet_out(load_unet(str(folder)))
    assert np.abs(got - _unet_out(unet)).max() <= 1e-6
    assert not marker.exists()


def test_torch_bin_folders_are_refused_with_the_file_named(tmp_path):
    from sd_tiny import TINY_CLIP, TINY_UNET, TINY_VAE

    from ldm.sd.loading import PickleRefusedError, load_text_encoder, load_unet, load_vae

    marker = tmp_path / "pwned"
    cases = [("unet", TINY_UNET, "diffusion_pytorch_model.bin", load_unet, "UNet"),
             ("vae", TINY_VAE, "diffusion_pytorch_model.bin", load_vae, "VAE"),
             ("text_encoder", dict(TINY_CLIP, model_type="clip_text_model"), "pytorch_model.bin", load_text_encoder,
              "text encoder")]
    for sub, cfg, name, loader, what in cases:
        folder = tmp_path / sub
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        _evil_pickle(folder / name, marker)
        with pytest.raises(PickleRefusedError) as e:
            loader(str(folder))
        msg = str(e.value)
        assert os.path.join(str(folder), name) in msg and what in msg, msg
        assert "safetensors" in msg and "--allow_pickle_weights" in msg, msg
    assert not marker.exists()


def test_torch_bin_loads_only_with_the_opt_in(tmp_path):
    """The opt-in path gives the same weights as the safetensors of the same model."""
    import paddle
    import torch
    from diffusers import UNet2DConditionModel
    from sd_tiny import TINY_CLIP, TINY_UNET
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.sd.loading import PickleRefusedError, load_text_encoder, load_unet

    torch.manual_seed(0)
    pairs = [(UNet2DConditionModel(**TINY_UNET), "unet", load_unet),
             (CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), "text_encoder", load_text_encoder)]
    for model, sub, loader in pairs:
        model.save_pretrained(str(tmp_path / "st" / sub))
        model.save_pretrained(str(tmp_path / "bin" / sub), safe_serialization=False)
        assert any(f.endswith(".bin") for f in os.listdir(tmp_path / "bin" / sub))
        with pytest.raises(PickleRefusedError):
            loader(str(tmp_path / "bin" / sub))
        a = loader(str(tmp_path / "st" / sub)).state_dict()
        b = loader(str(tmp_path / "bin" / sub), allow_pickle=True).state_dict()
        assert sorted(a) == sorted(b) and len(a) > 10
        for k in a:
            assert np.array_equal(a[k].numpy(), b[k].numpy()), k
    assert paddle  # imported for the loaders' tensors


def test_generate_sd_pickle_opt_in_is_off_by_default():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("generate_sd", os.path.join(root, "scripts", "generate_sd.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_args(["--pretrained_model_name_or_path", "x", "--prompt", "p"]).allow_pickle_weights is False
    assert mod.parse_args(["--pretrained_model_name_or_path", "x", "--prompt", "p",
                           "--allow_pickle_weights"]).allow_pickle_weights is True


def test_checkpoints_are_safetensors_and_restore_without_pickle(tmp_path, monkeypatch):
    """What save_trained / save_ema write (no pickle anywhere), load_trained restores it exactly, and the
    seed's section 5.2 `UNet2DConditionModel.from_pretrained(checkpoint/unet)` reads it."""
    import paddle
    from ppdiffusers import UNet2DConditionModel
    from sd_tiny import build_tiny_sd

    from ldm.sd.loading import load_text_encoder, load_tokenizer, load_unet, load_vae
    from ldm.train.sd import SDTask

    root = str(tmp_path / "sd")
    build_tiny_sd(root, unet_weights=True)

    def make():
        return SDTask(load_unet(root + "/unet"), load_vae(root + "/vae"),
                                    load_text_encoder(root + "/text_encoder"), load_tokenizer(root + "/tokenizer"),
                                    train_text_encoder=True)

    model = make()
    rng = np.random.default_rng(2)
    for p in list(model.unet.parameters()) + list(model.text_encoder.parameters()):
        p.set_value(paddle.to_tensor(rng.standard_normal(p.shape).astype("float32")))
    ckpt = tmp_path / "checkpoint-5"
    model.save_trained(str(ckpt))
    model.save_ema(str(ckpt), dict(model.ema_parameters()))
    files = sorted(os.path.relpath(os.path.join(d, f), ckpt) for d, _, fs in os.walk(ckpt) for f in fs)
    assert files == ["scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                     "unet/config.json", "unet/diffusion_paddle_model.safetensors",
                     "unet_ema/config.json", "unet_ema/diffusion_paddle_model.safetensors"], files

    def no_paddle_load(*a, **k):
        raise AssertionError("paddle.load (plain pickle) was called")

    monkeypatch.setattr(paddle, "load", no_paddle_load)
    restored = make()
    restored.load_trained(str(ckpt))
    for a, b in ((model.unet, restored.unet), (model.text_encoder, restored.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sorted(sa) == sorted(sb)
        for k in sa:
            assert np.array_equal(sa[k].numpy(), sb[k].numpy()), k
    seed_unet = UNet2DConditionModel.from_pretrained(str(ckpt / "unet"))
    for k, v in model.unet.state_dict().items():
        assert np.array_equal(seed_unet.state_dict()[k].numpy(), v.numpy()), k
