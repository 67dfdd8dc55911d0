"""Stage C / Stage B parity with diffusers' StableCascadeUNet (fp32, CPU, random weights).

Each test builds the torch reference in the layout of our `tiny` preset, re-randomises every
parameter (the reference init leaves many at zero), writes the weights (a) as diffusers'
save_pretrained does (sharded safetensors + index + config.json) and (b) in the original
Stability-AI key layout (in_proj_weight, out_proj, clip_mapper), converts both with
scripts/convert_unet_weight.py, loads them into StageC / StageB and compares outputs.

Weights are drawn at half the fan-in scale: the r embedding is sin/cos of r * 10000, which fp32
represents to only ~5e-4, so at full scale even torch fp32 vs fp64 differs by ~3e-4 at the
output; at this scale our fp32 output is within ~1e-5 of diffusers' fp32 output.
"""
import json
import os
import sys

import numpy as np
import paddle
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.models import StableCascadeUNet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import convert_unet_weight  # noqa: E402

from ldm.cascade.loading import load_stage_b, load_stage_c  # noqa: E402
from ldm.cascade.stage_b import STAGE_B_PRESETS  # noqa: E402
from ldm.cascade.stage_c import STAGE_C_PRESETS  # noqa: E402
from ldm.weights import save_safetensors  # noqa: E402

TOL = 1e-4
RES, TS, AT = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"

# diffusers configs of our tiny presets (two levels: CT + CTA, repeat mappers, self-attention)
PRIOR_TINY = dict(
    in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=32,
    block_out_channels=[32, 64], num_attention_heads=[2, 4], down_num_layers_per_block=[1, 2],
    up_num_layers_per_block=[2, 1], down_blocks_repeat_mappers=[2, 1], up_blocks_repeat_mappers=[1, 2],
    block_types_per_layer=[[RES, TS], [RES, TS, AT]], clip_text_in_channels=32, clip_text_pooled_in_channels=32,
    clip_image_in_channels=32, clip_seq=4, kernel_size=3, dropout=[0.0, 0.0], self_attn=True,
    timestep_conditioning_type=["sca", "crp"], switch_level=[False],
)
DECODER_TINY = dict(
    in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=32,
    block_out_channels=[16, 32], num_attention_heads=[0, 2], down_num_layers_per_block=[1, 2],
    up_num_layers_per_block=[2, 1], down_blocks_repeat_mappers=[2, 1], up_blocks_repeat_mappers=[1, 2],
    block_types_per_layer=[[RES, TS], [RES, TS, AT]], clip_text_pooled_in_channels=32, clip_seq=4,
    effnet_in_channels=16, pixel_mapper_in_channels=3, kernel_size=3, dropout=[0.0, 0.0], self_attn=True,
    timestep_conditioning_type=["sca"], switch_level=None,
)


def _randomised_reference(cfg, seed):
    torch.manual_seed(seed)
    model = StableCascadeUNet(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) * 0.5 / float(np.sqrt(np.prod(p.shape[1:]))))
            else:
                p.copy_(torch.randn_like(p) * 0.1)
    zero = [n for n, p in model.named_parameters() if not bool(p.abs().gt(0).all())]
    assert zero == []
    return model


def _original_layout(state, stage):
    """diffusers state dict -> original Stability-AI names (the reverse of diffusers'
    scripts/convert_stable_cascade.py), written independently of our key tables."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().numpy()
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            field = k.rsplit(".", 1)[1]
            pre = k.split(".attention.to_q.")[0]
            parts = [state[f"{pre}.attention.to_{q}.{field}"].detach().cpu().numpy() for q in "qkv"]
            out[f"{pre}.attention.attn.in_proj_{field}"] = np.concatenate(parts, axis=0)
        elif ".attention.to_out.0." in k:
            out[k.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = v
        elif stage == "b" and k.startswith("clip_txt_pooled_mapper."):
            out[k.replace("clip_txt_pooled_mapper.", "clip_mapper.")] = v
        else:
            out[k] = v
    return out


def _convert(tmp_path, name, inputs, *extra):
    out = str(tmp_path / f"{name}.safetensors")
    summary = convert_unet_weight.main(["--input", *inputs, "--output", out, *extra])
    assert summary["output"] == out
    return out, summary


def _max_diff(a, b):
    return float(np.abs(a - b).max())


def _t(x):
    return paddle.to_tensor(x.numpy())


def test_stage_c_matches_diffusers_and_original(tmp_path):
    ref = _randomised_reference(PRIOR_TINY, seed=0)
    folder = tmp_path / "prior"
    ref.save_pretrained(str(folder), safe_serialization=True, max_shard_size="100KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    n_ref = len(ref.state_dict())

    torch.manual_seed(1)
    b = 2
    x = torch.randn(b, 16, 6, 8)
    r = torch.rand(b)
    clip_text = torch.randn(b, 5, 32)
    pooled = torch.randn(b, 1, 32)
    clip_img = torch.randn(b, 1, 32)
    sca, crp = torch.rand(b), torch.rand(b)
    with torch.no_grad():  # diffusers' `cond or zeros` needs one sample per call
        want = torch.cat([ref(x[i:i + 1], r[i:i + 1], clip_text_pooled=pooled[i:i + 1], clip_text=clip_text[i:i + 1],
                              clip_img=clip_img[i:i + 1], sca=sca[i:i + 1], crp=crp[i:i + 1]).sample for i in range(b)]).numpy()
        want_no_cond = ref(x[:1], r[:1], clip_text_pooled=pooled[:1], clip_text=clip_text[:1], clip_img=clip_img[:1]).sample.numpy()
    assert np.abs(want).mean() > 1e-2

    # (a) diffusers layout, config read from config.json
    path_d, summary = _convert(tmp_path, "c_from_diffusers", [str(folder)], "--stage", "c")
    assert summary["source_layout"] == "diffusers" and summary["stage"] == "c"
    assert summary["tensors"] == n_ref  # to_q/to_k/to_v/to_out.0 -> q/k/v/out_proj, one to one
    # (b) original layout, preset resolved by matching shapes
    orig = _original_layout(ref.state_dict(), "c")
    orig_path = str(tmp_path / "stage_c_tiny_original.safetensors")
    save_safetensors(orig, orig_path, dtype="float32")
    path_o, summary_o = _convert(tmp_path, "c_from_original", [orig_path], "--source_format", "original")
    assert summary_o["source_layout"] == "original"

    for path in (path_d, path_o):
        model = load_stage_c(path, preset=None)
        with paddle.no_grad():
            got = model(_t(x), _t(r), _t(clip_text), _t(pooled), _t(clip_img), sca=_t(sca), crp=_t(crp)).numpy()
            got_no_cond = model(_t(x[:1]), _t(r[:1]), _t(clip_text[:1]), _t(pooled[:1]), _t(clip_img[:1])).numpy()
        assert got.shape == want.shape
        assert _max_diff(got, want) <= TOL, _max_diff(got, want)
        assert _max_diff(got_no_cond, want_no_cond) <= TOL
    # negative control: one missed transpose (a square attention weight) must break the comparison
    w = model.up_blocks[0][2].attention.attn.v_proj.weight
    w.set_value(w.T)
    with paddle.no_grad():
        bad = model(_t(x), _t(r), _t(clip_text), _t(pooled), _t(clip_img), sca=_t(sca), crp=_t(crp)).numpy()
    assert _max_diff(bad, want) > 10 * TOL
    # the converted config is exactly our tiny preset
    with open(folder / "config.json") as f:
        assert json.load(f)["block_out_channels"] == list(STAGE_C_PRESETS["tiny"].c_hidden)
    assert load_stage_c(path_o, preset="tiny") is not None


def test_stage_b_matches_diffusers_and_original(tmp_path):
    ref = _randomised_reference(DECODER_TINY, seed=2)
    folder = tmp_path / "decoder"
    ref.save_pretrained(str(folder), safe_serialization=True)

    torch.manual_seed(3)
    b = 2
    x = torch.randn(b, 4, 12, 16)
    r = torch.rand(b)
    effnet = torch.randn(b, 16, 3, 4)
    pooled = torch.randn(b, 1, 32)
    pixels = torch.randn(b, 3, 8, 8)
    sca = torch.rand(b)
    with torch.no_grad():
        want = torch.cat([ref(x[i:i + 1], r[i:i + 1], clip_text_pooled=pooled[i:i + 1], effnet=effnet[i:i + 1],
                              pixels=pixels[i:i + 1], sca=sca[i:i + 1]).sample for i in range(b)]).numpy()
        want_default = ref(x[:1], r[:1], clip_text_pooled=pooled[:1], effnet=effnet[:1]).sample.numpy()
    assert np.abs(want).mean() > 1e-2

    path_d, summary = _convert(tmp_path, "b_from_diffusers", [str(folder)])
    assert summary["stage"] == "b" and summary["source_layout"] == "diffusers"
    orig = _original_layout(ref.state_dict(), "b")
    assert "clip_mapper.weight" in orig
    orig_path = str(tmp_path / "stage_b_tiny_original.safetensors")
    save_safetensors(orig, orig_path, dtype="float32")
    path_o, _ = _convert(tmp_path, "b_from_original", [orig_path], "--stage", "b", "--preset", "tiny")

    for path in (path_d, path_o):
        model = load_stage_b(path, preset=None)
        with paddle.no_grad():
            got = model(_t(x), _t(r), _t(effnet), _t(pooled), pixels=_t(pixels), sca=_t(sca)).numpy()
            got_default = model(_t(x[:1]), _t(r[:1]), _t(effnet[:1]), _t(pooled[:1])).numpy()
        assert _max_diff(got, want) <= TOL, _max_diff(got, want)
        assert _max_diff(got_default, want_default) <= TOL
    assert list(STAGE_B_PRESETS["tiny"].c_hidden) == DECODER_TINY["block_out_channels"]
