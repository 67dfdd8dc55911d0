"""A trained (Paddle) UNet exported with scripts/export_diffusers.py loads in diffusers (torch) and
predicts the same noise as in paddle; the torch -> paddle loading path round-trips too."""
import ast
import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_paddle_unet(tmp_path):
    import paddle
    from ppdiffusers import UNet2DConditionModel
    from sd_tiny import TINY_UNET

    paddle.seed(3)
    unet = UNet2DConditionModel(**TINY_UNET)
    # perturb every parameter so that zero-initialised ones (e.g. conv_out) are exercised too
    rng = np.random.default_rng(0)
    for p in unet.parameters():
        p.set_value(paddle.to_tensor((p.numpy() + 0.05 * rng.standard_normal(p.shape)).astype("float32")))
    unet.save_pretrained(str(tmp_path / "trained_unet"))
    return unet


def _imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_export_code_does_not_import_torch():
    weights = sorted(os.path.join("ldm", "weights", f) for f in os.listdir(os.path.join(ROOT, "ldm", "weights"))
                     if f.endswith(".py"))
    files = ["scripts/export_diffusers.py", "ldm/sd/export.py", "ldm/sd/loading.py"] + weights
    for f in files:
        mods = _imported_modules(os.path.join(ROOT, f))
        assert "torch" not in mods and "diffusers" not in mods and "transformers" not in mods, (f, mods)


def test_exported_unet_matches_in_diffusers(tmp_path):
    import paddle
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    unet = _random_paddle_unet(tmp_path)
    out = tmp_path / "exported"
    spec = importlib.util.spec_from_file_location("export_diffusers", os.path.join(ROOT, "scripts", "export_diffusers.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    weights = cli.main(["--unet_path", str(tmp_path / "trained_unet"), "--output_dir", str(out)])
    assert weights.endswith("diffusion_pytorch_model.safetensors")
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]

    tunet = TorchUNet.from_pretrained(str(out)).eval()
    assert sum(p.numel() for p in tunet.parameters()) == sum(int(np.prod(p.shape)) for p in unet.parameters())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8)).astype("float32")
    ctx = rng.standard_normal((2, 5, 32)).astype("float32")
    t = np.array([10, 900], dtype="int64")
    unet.eval()
    with paddle.no_grad():
        pd_out = unet(paddle.to_tensor(x), paddle.to_tensor(t), encoder_hidden_states=paddle.to_tensor(ctx)).sample.numpy()
    with torch.no_grad():
        pt_out = tunet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    assert np.abs(pd_out).mean() > 1e-2  # a real, non-trivial output
    diff = np.abs(pd_out - pt_out).max()
    assert diff <= 1e-4, diff

    # and back: the exported folder is a diffusers layout our loader reads (from_diffusers)
    from ldm.sd.loading import is_torch_layout, load_unet

    assert is_torch_layout(str(out))
    back = load_unet(str(out))
    back.eval()
    with paddle.no_grad():
        back_out = back(paddle.to_tensor(x), paddle.to_tensor(t), encoder_hidden_states=paddle.to_tensor(ctx)).sample.numpy()
    assert np.abs(back_out - pd_out).max() <= 1e-5
