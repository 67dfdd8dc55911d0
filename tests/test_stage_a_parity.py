"""StageA vs diffusers PaellaVQModel on the same random weights, converted through
scripts/convert_other_weight.py (both sources: the diffusers vqgan/ folder and an original-layout
stage_a.safetensors). fp32, CPU, tiny sizes."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paella = pytest.importorskip("diffusers.pipelines.wuerstchen.modeling_paella_vq_model")

import paddle  # noqa: E402

from ldm.cascade.loading import load_stage_a  # noqa: E402
from ldm.cascade.stage_a import SCALE_FACTOR_DIFFUSERS, SCALE_FACTOR_ORIGINAL, StageA  # noqa: E402
from ldm.weights import SafetensorsReader, WeightsError, save_safetensors  # noqa: E402
from scripts.convert_other_weight import main as convert_main  # noqa: E402

TINY = dict(levels=2, bottleneck_blocks=2, embed_dim=32, latent_channels=4, num_vq_embeddings=64)


def _reference(seed=0):
    torch.manual_seed(seed)
    ref = paella.PaellaVQModel(**TINY).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gammas"):
                p.copy_(torch.randn_like(p) * 0.5)  # zero at init: randomise so the blocks matter
            elif "vquantizer" in name:
                p.copy_(torch.randn_like(p))  # codebook on the same scale as the BN-normalised latents
            else:
                scale = 0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1
                p.copy_(torch.randn_like(p) * scale)
        # running stats from data, so the latents are ~N(0, 1) like the real model's
        bn = ref.down_blocks[-1][1]
        h = ref.down_blocks[:-1](ref.in_block(torch.rand(4, 3, 32, 32)))
        h = ref.down_blocks[-1][0](h)
        bn.running_mean.copy_(h.mean((0, 2, 3)))
        bn.running_var.copy_(h.var((0, 2, 3)) * 1.3)
        bn.weight.copy_(1 + 0.1 * torch.randn(4))
        bn.bias.copy_(0.1 * torch.randn(4))
    return ref


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage_a")
    ref = _reference()
    ref.save_pretrained(str(d / "vqgan"), safe_serialization=True)
    convert_main(["--vqgan_dir", str(d / "vqgan"), "--output_dir", str(d / "out")])
    return ref, d


def test_vqgan_dir_conversion_records_config_and_scale(converted):
    ref, d = converted
    with SafetensorsReader(d / "out" / "stage_a.safetensors") as r:
        meta = r.metadata
        assert meta["format"] == "np" and meta["model"] == "stage_a"
        cfg = json.loads(meta["config"])
        assert cfg == dict(levels=2, bottleneck_blocks=2, c_hidden=32, c_latent=4, codebook_size=64,
                           scale_factor=SCALE_FACTOR_DIFFUSERS)
        assert "vquantizer.codebook.weight" in r.keys()
        assert r.shape("down_blocks.0.channelwise.0.weight") == (32 // 2, 32 * 2)  # Linear transposed
        n_ref = len([k for k in ref.state_dict() if not k.endswith("num_batches_tracked")])
        assert len(r.keys()) == n_ref


def test_encode_decode_match_paella(converted):
    ref, d = converted
    model = load_stage_a(d / "out" / "stage_a.safetensors")
    assert model.scale_factor == SCALE_FACTOR_DIFFUSERS
    rng = np.random.default_rng(1)
    x = rng.random((2, 3, 32, 24), dtype=np.float32)
    with torch.no_grad():
        h_ref = ref.encode(torch.from_numpy(x), return_dict=False)[0]
        q_ref, _, (_, _, idx_ref) = ref.vquantizer(h_ref)
        img_ref = ref.decode(h_ref, force_not_quantize=True, return_dict=False)[0]
        img_q_ref = ref.decode(h_ref, force_not_quantize=False, return_dict=False)[0]
    with paddle.no_grad():
        lat, _, _, _ = model.encode(paddle.to_tensor(x))
        q, unq, idx, _ = model.encode(paddle.to_tensor(x), quantize=True)
        img = model.decode(lat)
        img_q = model.decode(q)
    sf = model.scale_factor
    assert lat.shape == [2, 4, 8, 6]
    np.testing.assert_allclose(lat.numpy() * sf, h_ref.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(unq.numpy() * sf, h_ref.numpy(), atol=1e-4, rtol=0)
    idx_ref = idx_ref.numpy().reshape(2, 8, 6)
    assert len(np.unique(idx_ref)) > 4  # the test exercises the codebook
    np.testing.assert_array_equal(idx.numpy(), idx_ref)
    np.testing.assert_allclose(q.numpy() * sf, q_ref.numpy(), atol=1e-4, rtol=0)
    assert np.abs(img_ref.numpy()).max() > 1e-2
    np.testing.assert_allclose(img.numpy(), img_ref.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(img_q.numpy(), img_q_ref.numpy(), atol=1e-4, rtol=0)


def test_original_layout_uses_043(converted, tmp_path):
    ref, _ = converted
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    sd["vquantizer.codebook.weight"] = sd.pop("vquantizer.embedding.weight")  # original (torchtools) name
    save_safetensors(sd, tmp_path / "stage_a.safetensors")
    convert_main(["--stage_a", str(tmp_path / "stage_a.safetensors"), "--stage_a_out", str(tmp_path / "a.safetensors")])
    model = load_stage_a(tmp_path / "a.safetensors")
    assert model.scale_factor == SCALE_FACTOR_ORIGINAL
    x = np.random.default_rng(2).random((1, 3, 16, 16), dtype=np.float32)
    with torch.no_grad():
        img_ref = ref.decode(ref.encode(torch.from_numpy(x), return_dict=False)[0], return_dict=False)[0]
    with paddle.no_grad():
        img = model.decode(model.encode(paddle.to_tensor(x))[0])
    np.testing.assert_allclose(img.numpy(), img_ref.numpy(), atol=1e-4, rtol=0)

    # a .pdparams in PaddleMIX names loads too (scale 0.43 by default, sizes from the shapes)
    with SafetensorsReader(tmp_path / "a.safetensors") as r:
        state = dict(r.items())
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(tmp_path / "stage_a.pdparams"))
    m2 = load_stage_a(tmp_path / "stage_a.pdparams")
    assert m2.scale_factor == SCALE_FACTOR_ORIGINAL and m2.config.bottleneck_blocks == 2
    with paddle.no_grad():
        np.testing.assert_array_equal(m2.decode(m2.encode(paddle.to_tensor(x))[0]).numpy(), img.numpy())

    # PaddleMIX's StageA keeps its quantiser in torch, so its .pdparams may lack the codebook:
    # decoding still works, quantising is refused
    state.pop("vquantizer.codebook.weight")
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(tmp_path / "no_codebook.pdparams"))
    m3 = load_stage_a(tmp_path / "no_codebook.pdparams")
    assert not m3.codebook_loaded and m3.config.codebook_size == 8192
    with paddle.no_grad():
        np.testing.assert_array_equal(m3.decode(m3.encode(paddle.to_tensor(x))[0]).numpy(), img.numpy())
    with pytest.raises(RuntimeError, match="codebook"):
        m3.encode(paddle.to_tensor(x), quantize=True)


def test_conversion_lists_bad_keys(converted, tmp_path):
    ref, _ = converted
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    sd["vquantizer.codebook.weight"] = sd.pop("vquantizer.embedding.weight")
    sd.pop("up_blocks.1.depthwise.1.bias")
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["in_block.1.bias"] = np.zeros(5, np.float32)
    save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as e:
        convert_main(["--stage_a", str(tmp_path / "bad.safetensors"), "--output_dir", str(tmp_path)])
    msg = str(e.value)
    assert "1 missing" in msg and "up_blocks.1.depthwise.1.bias" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "1 wrong shape" in msg and "in_block.1.bias" in msg
    assert not os.path.exists(tmp_path / "stage_a.safetensors")
    # an unconverted torch file is refused by the loader
    with pytest.raises(WeightsError, match="not in Paddle layout"):
        load_stage_a(tmp_path / "bad.safetensors")


def test_tiny_preset_roundtrip_shapes(tmp_path):
    from ldm.cascade.stage_a import StageA_tiny
    from ldm.cascade.loading import save_network

    m = StageA_tiny(scale_factor=0.5)
    m.eval()
    x = paddle.rand([1, 3, 16, 16])
    lat = m.encode(x)[0]
    assert lat.shape == [1, 4, 4, 4] and m.decode(lat).shape == [1, 3, 16, 16]
    save_network(m, tmp_path / "tiny.safetensors")
    m2 = load_stage_a(tmp_path / "tiny.safetensors")
    assert m2.config == m.config and m2.scale_factor == 0.5
    np.testing.assert_array_equal(m2.encode(x)[0].numpy(), lat.numpy())
    with pytest.raises(ValueError):
        m.encode(paddle.rand([1, 3, 10, 16]))
    with pytest.raises(ValueError):
        StageA(scale_factor=0)


def test_full_size_layout_matches_paella():
    """The full StageA has exactly PaellaVQModel()'s tensors (after the key table), ~18M parameters."""
    from ldm.cascade.stage_a import StageA_full
    from ldm.cascade.keys import STAGE_A_DIFFUSERS_RULES
    from ldm.weights import map_key

    ref = paella.PaellaVQModel()
    want = {}
    for k, v in ref.state_dict().items():
        tgt, tf = map_key(k, STAGE_A_DIFFUSERS_RULES)
        if tgt is not None:
            want[tgt] = tuple(v.shape)[::-1] if tf == "transpose" else tuple(v.shape)
    model = StageA_full()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    # in conv, 15 ResBlocks x 7, down 4x4 conv, latent conv + BN(4), codebook, up 1x1 conv, convT, out conv
    assert len(got) == 2 + 15 * 7 + 2 + 1 + 4 + 1 + 2 + 2 + 2 == 121
    n = sum(int(np.prod(s)) for k, s in got.items() if not k.endswith(("_mean", "_variance")))
    assert 18_000_000 < n < 19_000_000
    assert model.scale_factor == SCALE_FACTOR_ORIGINAL and ref.config.scale_factor == SCALE_FACTOR_DIFFUSERS
