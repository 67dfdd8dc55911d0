"""Previewer: the published key/shape layout converts onto our model exactly, the forward upsamples 8x,
and (tiny) outputs match a torch rebuild of the original layer list on the same weights."""
import json
import os

import numpy as np
import pytest

import paddle

from ldm.cascade.loading import load_previewer
from ldm.cascade.previewer import Previewer, Previewer_tiny
from ldm.weights import SafetensorsReader, save_safetensors
from scripts.convert_other_weight import main as convert_main

MANIFEST = os.path.join(os.path.dirname(__file__), "data", "previewer_manifest.json")


def _manifest():
    with open(MANIFEST, encoding="utf-8") as f:
        return json.load(f)["tensors"]


def test_manifest_matches_model_layout():
    tensors = _manifest()
    assert len(tensors) == 58  # 9 convs x 2 + 8 BatchNorms x 5 (weight, bias, mean, var, count)
    ours = {k: tuple(v.shape) for k, v in Previewer().state_dict().items()}
    assert len(ours) == 58 - 8
    for name, shape in tensors:
        if name.endswith("num_batches_tracked"):
            continue
        name = name.replace(".running_mean", "._mean").replace(".running_var", "._variance")
        assert ours.pop(name) == tuple(shape), name
    assert not ours
    assert sum(int(np.prod(s)) for n, s in tensors if "num_batches" not in n) == 3_983_747


def test_published_layout_converts_and_runs(tmp_path):
    rng = np.random.default_rng(0)
    state = {}
    for name, shape in _manifest():
        if name.endswith("num_batches_tracked"):
            state[name] = np.array(5, dtype=np.int64)
        elif name.endswith("running_var"):
            state[name] = (rng.random(shape) + 0.5).astype(np.float32)
        else:
            state[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    save_safetensors(state, tmp_path / "previewer.safetensors")
    convert_main(["--previewer", str(tmp_path / "previewer.safetensors"), "--output_dir", str(tmp_path / "out"),
                  "--dtype", "float16"])
    with SafetensorsReader(tmp_path / "out" / "previewer.safetensors") as r:
        assert len(r.keys()) == 50 and r.dtype("blocks.0.weight") == "F16"
    model = load_previewer(tmp_path / "out" / "previewer.safetensors")
    assert model.config.to_dict() == dict(c_in=16, c_hidden=512, c_out=3)
    got = model.blocks[2]._variance.numpy()
    np.testing.assert_allclose(got, state["blocks.2.running_var"], rtol=1e-3)
    with paddle.no_grad():
        out = model(paddle.randn([2, 16, 3, 4]))
    assert out.shape == [2, 3, 24, 32]
    with pytest.raises(ValueError):
        model(paddle.randn([1, 4, 3, 3]))


def test_tiny_matches_torch_rebuild(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    h = 32
    layers = []
    for conv in [nn.Conv2d(16, h, 1), nn.Conv2d(h, h, 3, padding=1), nn.ConvTranspose2d(h, h // 2, 2, stride=2),
                 nn.Conv2d(h // 2, h // 2, 3, padding=1), nn.ConvTranspose2d(h // 2, h // 4, 2, stride=2),
                 nn.Conv2d(h // 4, h // 4, 3, padding=1), nn.ConvTranspose2d(h // 4, h // 4, 2, stride=2),
                 nn.Conv2d(h // 4, h // 4, 3, padding=1)]:
        layers += [conv, nn.GELU(), nn.BatchNorm2d(conv.out_channels)]
    layers.append(nn.Conv2d(h // 4, 3, 1))
    ref = nn.Module()
    ref.blocks = nn.Sequential(*layers)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    ref.eval()
    save_safetensors({k: v.numpy() for k, v in ref.state_dict().items()}, tmp_path / "p.safetensors")
    convert_main(["--previewer", str(tmp_path / "p.safetensors"), "--previewer_out", str(tmp_path / "q.safetensors")])
    model = load_previewer(tmp_path / "q.safetensors")
    assert model.config == Previewer_tiny().config
    x = np.random.default_rng(1).standard_normal((2, 16, 3, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref.blocks(torch.from_numpy(x)).numpy()
    with paddle.no_grad():
        got = model(paddle.to_tensor(x)).numpy()
    assert got.shape == (2, 3, 24, 24) and np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
