"""EfficientNetEncoder vs torchvision efficientnet_v2_s().features (+ the original mapper) on the same
random weights with randomised BatchNorm running statistics, eval mode, fp32, CPU. Weights go
through scripts/convert_other_weight.py."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tvm = pytest.importorskip("torchvision.models")

import paddle  # noqa: E402

from ldm.cascade.effnet import EfficientNetEncoder, imagenet_normalize  # noqa: E402
from ldm.cascade.loading import load_effnet  # noqa: E402
from ldm.weights import SafetensorsReader, save_safetensors  # noqa: E402
from scripts.convert_other_weight import main as convert_main  # noqa: E402


class _Reference(torch.nn.Module):
    """The original EfficientNetEncoder layout: backbone = features, mapper = conv + non-affine BN."""

    def __init__(self):
        super().__init__()
        self.backbone = tvm.efficientnet_v2_s().features
        self.mapper = torch.nn.Sequential(torch.nn.Conv2d(1280, 16, 1, bias=False),
                                          torch.nn.BatchNorm2d(16, affine=False))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("effnet")
    torch.manual_seed(0)
    ref = _Reference().eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                if m.affine:
                    m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
                    m.bias.copy_(0.1 * torch.randn_like(m.bias))
                m.num_batches_tracked.fill_(7)
    save_safetensors({k: v.numpy() for k, v in ref.state_dict().items()}, d / "effnet_encoder.safetensors")
    convert_main(["--effnet", str(d / "effnet_encoder.safetensors"), "--output_dir", str(d / "out")])
    return ref, load_effnet(d / "out" / "effnet_encoder.safetensors"), d


def test_keys_follow_paddle_batchnorm_names(pair):
    ref, model, d = pair
    n_ref = len([k for k in ref.state_dict() if not k.endswith("num_batches_tracked")])
    with SafetensorsReader(d / "out" / "effnet_encoder.safetensors") as r:
        keys = r.keys()
    assert len(keys) == n_ref == len(model.state_dict())
    assert "backbone.0.1._mean" in keys and "backbone.0.1._variance" in keys
    assert "mapper.1._mean" in keys and "mapper.1.weight" not in keys
    assert "backbone.6.0.block.2.fc1.weight" in keys  # SE 1x1 conv, kept 4-D (no transpose)
    assert not any("running" in k or "num_batches" in k for k in keys)


def test_backbone_and_mapper_match_torchvision(pair):
    ref, model, _ = pair
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 64, 96), dtype=np.float32)
    xt = torch.from_numpy(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feat_ref = ref.backbone((xt - mean) / std)
        out_ref = ref.mapper(feat_ref)
    model.train()  # frozen encoder: BatchNorm uses running stats in either mode
    with paddle.no_grad():
        xp = imagenet_normalize(paddle.to_tensor(x))
        feat = model.backbone(xp)
        out = model(xp)
    assert feat.shape == [2, 1280, 2, 3] and out.shape == [2, 16, 2, 3]
    assert np.abs(out_ref.numpy()).max() > 0.1
    np.testing.assert_allclose(feat.numpy(), feat_ref.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.numpy(), out_ref.numpy(), atol=1e-4, rtol=0)


def test_pdparams_with_torch_batchnorm_names_loads(pair, tmp_path):
    """A .pdparams that kept torch's BatchNorm names (running_mean/var, num_batches_tracked) is
    normalised on load."""
    ref, model, _ = pair
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(tmp_path / "e.pdparams"))
    m2 = load_effnet(tmp_path / "e.pdparams")
    x = paddle.rand([1, 3, 64, 64])
    with paddle.no_grad():
        np.testing.assert_array_equal(m2(x).numpy(), model(x).numpy())


def test_pdparams_from_paddlemix_converter_with_reversed_se_weights(pair, tmp_path):
    """PaddleMIX's converter reversed all axes of every key containing "fc" (the SE 1x1 convs), so
    a seed effnet_encoder.pdparams made by it holds (1, 1, in, out) SE weights: they are undone."""
    ref, model, _ = pair
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    reversed_keys = [k for k in state if "fc" in k and state[k].ndim == 4]
    assert len(reversed_keys) > 10  # every SE block has fc1 and fc2
    state = {k: (v.transpose() if "fc" in k else v) for k, v in state.items()}
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(tmp_path / "pm.pdparams"))
    m2 = load_effnet(tmp_path / "pm.pdparams")
    x = paddle.rand([1, 3, 64, 64])
    with paddle.no_grad():
        np.testing.assert_array_equal(m2(x).numpy(), model(x).numpy())


def test_input_check():
    with pytest.raises(ValueError):
        EfficientNetEncoder(c_latent=0)
