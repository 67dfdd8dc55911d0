"""Stage B / C weight layouts: seed manifests, converter errors, dtypes, lazy loading, round trips.

The 1B / 700M manifests in tests/data are the parameter names and shapes of PaddleMIX's Paddle
modules (what the seed's stage_c_lite.pdparams / stage_b_lite.pdparams hold). They are derived
here, independently of ldm.cascade.keys, from diffusers' StableCascadeUNet built on the
meta device (the released prior_lite / decoder_lite configs), renamed back to the original
Stability-AI keys, then put through the rules of PaddleMIX's convert_unet_weight.py (torch Linear
weights transposed, in_proj split into q/k/v_proj).
"""
import json
import os
import pickle
import sys

import numpy as np
import paddle
import pytest

from ldm.cascade.convert import export_unet_weights
from ldm.cascade.loading import build_stage_b, build_stage_c, expected_shapes, load_stage_b, load_stage_c
from ldm.cascade.stage_b import STAGE_B_PRESETS, StageB
from ldm.cascade.stage_c import STAGE_C_PRESETS, StageC
from ldm.weights import (
    SafetensorsReader, WeightSource, WeightsError, bf16_to_fp32, fp32_to_bf16, save_safetensors,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import convert_unet_weight  # noqa: E402

RES, TS, AT = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
# diffusers configs of the released lite checkpoints (prior_lite/config.json, decoder_lite/config.json)
PRIOR_LITE = dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=1536,
                  block_out_channels=[1536, 1536], num_attention_heads=[24, 24], down_num_layers_per_block=[4, 12],
                  up_num_layers_per_block=[12, 4], down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
                  block_types_per_layer=[[RES, TS, AT], [RES, TS, AT]], clip_text_in_channels=1280,
                  clip_text_pooled_in_channels=1280, clip_image_in_channels=768, clip_seq=4, kernel_size=3,
                  dropout=[0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca", "crp"], switch_level=[False])
DECODER_LITE = dict(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=1280,
                    block_out_channels=[320, 576, 1152, 1152], num_attention_heads=[0, 9, 18, 18],
                    down_num_layers_per_block=[2, 4, 14, 4], up_num_layers_per_block=[4, 14, 4, 2],
                    down_blocks_repeat_mappers=[1, 1, 1, 1], up_blocks_repeat_mappers=[2, 2, 2, 2],
                    block_types_per_layer=[[RES, TS], [RES, TS], [RES, TS, AT], [RES, TS, AT]],
                    clip_text_pooled_in_channels=1280, clip_seq=4, effnet_in_channels=16, pixel_mapper_in_channels=3,
                    kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca"])
PRIOR_FULL = dict(PRIOR_LITE, conditioning_dim=2048, block_out_channels=[2048, 2048], num_attention_heads=[32, 32],
                  down_num_layers_per_block=[8, 24], up_num_layers_per_block=[24, 8])
DECODER_FULL = dict(DECODER_LITE, block_out_channels=[320, 640, 1280, 1280], num_attention_heads=[0, 0, 20, 20],
                    down_num_layers_per_block=[2, 6, 28, 6], up_num_layers_per_block=[6, 28, 6, 2],
                    up_blocks_repeat_mappers=[3, 3, 2, 2], block_types_per_layer=[[RES, TS], [RES, TS], [RES, TS, AT], [RES, TS, AT]])

# PaddleMIX examples/stable_cascade/scripts/convert_unet_weight.py: substrings whose weights it transposes
PADDLEMIX_T_LAYERS = ["fc", "channelwise", "mapper_crp", "mapper_sca", ".mapper.", "txt_mapper", "txt_pooled_mapper",
                      "clip_img_mapper", "kv_mapper", "clip_mapper", "out_proj"]


def _reference_manifest(cfg, stage):
    """diffusers (meta) -> original names -> PaddleMIX names/shapes."""
    torch = pytest.importorskip("torch")
    from diffusers.models import StableCascadeUNet

    with torch.device("meta"):
        model = StableCascadeUNet(**cfg)
    out = {}
    for k, v in model.state_dict().items():
        shape = list(v.shape)
        if ".attention.to_q." in k or ".attention.to_k." in k or ".attention.to_v." in k:
            q = k.split(".attention.to_")[1][0]
            field = k.rsplit(".", 1)[1]
            k = k.split(".attention.to_")[0] + f".attention.attn.{q}_proj.{field}"
            out[k] = shape[::-1]  # split from in_proj, transposed
            continue
        k = k.replace(".attention.to_out.0.", ".attention.attn.out_proj.")
        if stage == "b":
            k = k.replace("clip_txt_pooled_mapper.", "clip_mapper.")
        if "channelwise" in k and ("gamma" in k or "beta" in k):
            shape = [int(np.prod(shape)), 1, 1, 1]  # PaddleMIX reshapes GRN params to (-1, 1, 1, 1) first
        if any(t in k for t in PADDLEMIX_T_LAYERS) and "bias" not in k:
            shape = shape[::-1]
        out[k] = shape
    return out


def _manifest_file(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("fname,cls,preset,cfg,stage", [
    ("stage_c_1B_manifest.json", StageC, STAGE_C_PRESETS["1B"], PRIOR_LITE, "c"),
    ("stage_b_700M_manifest.json", StageB, STAGE_B_PRESETS["700M"], DECODER_LITE, "b"),
])
def test_seed_manifest_matches_presets(fname, cls, preset, cfg, stage):
    stored = _manifest_file(fname)
    params = {k: list(v) for k, v in stored["params"].items()}
    ours = {k: list(v) for k, v in expected_shapes(cls, preset).items()}
    assert ours == params
    assert len(params) == stored["count"]
    assert sum(int(np.prod(s)) for s in params.values()) == stored["num_parameters"]
    assert _reference_manifest(cfg, stage) == params


def test_manifest_counts():
    c = _manifest_file("stage_c_1B_manifest.json")
    b = _manifest_file("stage_b_700M_manifest.json")
    assert (c["count"], c["num_parameters"]) == (782, 1030785040)
    assert (b["count"], b["num_parameters"]) == (970, 699471248)


@pytest.mark.parametrize("cls,preset,cfg,stage", [
    (StageC, STAGE_C_PRESETS["3.6B"], PRIOR_FULL, "c"),
    (StageB, STAGE_B_PRESETS["3B"], DECODER_FULL, "b"),
])
def test_full_size_presets_match_reference(cls, preset, cfg, stage):
    assert {k: list(v) for k, v in expected_shapes(cls, preset).items()} == _reference_manifest(cfg, stage)


# ---------------------------------------------------------------------------------------------
def _tiny_c(tmp_path, seed=0):
    paddle.seed(seed)
    model = StageC(STAGE_C_PRESETS["tiny"])
    for p in model.parameters():
        p.set_value(paddle.randn(p.shape) * 0.1)
    path = str(tmp_path / "tiny_c.safetensors")
    save_safetensors(model.state_dict(), path, metadata={"format": "ldm-cascade-paddle", "stage": "c", "config": STAGE_C_PRESETS["tiny"].to_json()})
    return model, path


def _inputs_c(b=2):
    g = np.random.default_rng(0)
    f = lambda *s: paddle.to_tensor(g.standard_normal(s).astype("float32"))  # noqa: E731
    return (f(b, 16, 4, 4), paddle.to_tensor(g.random(b).astype("float32")), f(b, 3, 32), f(b, 1, 32), f(b, 1, 32))


def test_converter_lists_missing_unexpected_and_misshaped(tmp_path):
    model, _ = _tiny_c(tmp_path)
    orig = str(tmp_path / "orig.safetensors")
    export_unet_weights(model, "c", "original", orig)
    with SafetensorsReader(orig) as r:
        state = dict(r.items())
    del state["down_blocks.0.0.depthwise.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["clf.1.bias"] = np.zeros(5, np.float32)
    bad = str(tmp_path / "bad.safetensors")
    save_safetensors(state, bad)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(SystemExit) as e:
        convert_unet_weight.main(["--input", bad, "--output", out, "--preset", "tiny"])
    msg = str(e.value)
    assert "1 missing" in msg and "down_blocks.0.0.depthwise.bias" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "1 wrong shape" in msg and "clf.1.bias" in msg
    assert not os.path.exists(out)
    with pytest.raises(SystemExit, match="matches no Stage C preset"):
        convert_unet_weight.main(["--input", bad, "--output", out])
    with pytest.raises(SystemExit, match="not Stage B"):
        convert_unet_weight.main(["--input", orig, "--output", out, "--stage", "b"])
    with pytest.raises(SystemExit, match="'diffusers' was requested"):
        convert_unet_weight.main(["--input", orig, "--output", out, "--source_format", "diffusers"])
    # the key that tells Stage C from B is missing: without --stage the error names the file and the
    # flag; with --stage c the stage is forced and the missing key is listed like any other
    del state["clip_txt_mapper.weight"]
    state["clf.1.bias"] = np.zeros(model.state_dict()["clf.1.bias"].shape, np.float32)
    del state["extra.weight"]
    save_safetensors(state, bad)
    with pytest.raises(SystemExit, match=r"bad\.safetensors.*pass --stage b or --stage c"):
        convert_unet_weight.main(["--input", bad, "--output", out, "--preset", "tiny"])
    with pytest.raises(SystemExit) as e:
        convert_unet_weight.main(["--input", bad, "--output", out, "--preset", "tiny", "--stage", "c",
                                  "--source_format", "original"])
    msg = str(e.value)
    assert "2 missing" in msg and "clip_txt_mapper.weight" in msg and "down_blocks.0.0.depthwise.bias" in msg
    assert "unexpected" not in msg and "wrong shape" not in msg and not os.path.exists(out)


def test_round_trips_and_bf16_lazy_load(tmp_path):
    model, ours = _tiny_c(tmp_path)
    model.eval()
    args = _inputs_c()
    with paddle.no_grad():
        want = model(*args, sca=args[1] * 0.5).numpy()
    for layout in ("original", "diffusers"):
        exported = str(tmp_path / f"{layout}.safetensors")
        export_unet_weights(model, "c", layout, exported)
        out = str(tmp_path / f"back_{layout}.safetensors")
        convert_unet_weight.main(["--input", exported, "--output", out, "--source_format", layout])
        with SafetensorsReader(out) as a, SafetensorsReader(ours) as b:
            assert a.keys() == b.keys()
            for k in a.keys():
                np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)
    # bf16 storage, then a lazy load straight into bf16 parameters
    out16 = str(tmp_path / "bf16.safetensors")
    summary = convert_unet_weight.main(["--input", ours, "--output", out16, "--dtype", "bfloat16"])
    assert summary["dtype"] == "bfloat16"
    with SafetensorsReader(out16) as r:
        assert {r.dtype(k) for k in r.keys()} == {"BF16"}
    m16 = load_stage_c(out16, preset=None, dtype="bfloat16")
    p = m16.down_blocks[1][2].attention.attn.q_proj.weight
    assert p.dtype == paddle.bfloat16
    ref = model.down_blocks[1][2].attention.attn.q_proj.weight.numpy()
    np.testing.assert_array_equal(bf16_to_fp32(p.numpy()), bf16_to_fp32(fp32_to_bf16(ref)))
    # fp32 lazy build from our file reproduces the eager model exactly
    m32 = build_stage_c("tiny", weights=ours)
    with paddle.no_grad():
        np.testing.assert_array_equal(m32(*args, sca=args[1] * 0.5).numpy(), want)


def test_lazy_build_allocates_nothing_before_streaming(tmp_path, monkeypatch):
    _, ours = _tiny_c(tmp_path)
    import ldm.cascade.loading as loading

    seen = {}
    real = loading.assign_state_dict

    def spy(model, source, plan):
        seen["initialised_before"] = sum(p._is_initialized() for p in model.parameters())
        seen["n"] = len(model.parameters())
        real(model, source, plan=plan)
        seen["initialised_after"] = sum(p._is_initialized() for p in model.parameters())

    monkeypatch.setattr(loading, "assign_state_dict", lambda model, source, plan: spy(model, source, plan))
    build_stage_c("tiny", dtype="float16", weights=ours)
    assert seen["initialised_before"] == 0
    assert seen["initialised_after"] == seen["n"] == 142


def test_seed_style_pdparams_load(tmp_path):
    """PaddleMIX's converter left the unsplit torch in_proj next to q/k/v_proj; those are dropped."""
    model, _ = _tiny_c(tmp_path)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    n_attn = 0
    for k in list(state):
        if k.endswith(".attention.attn.q_proj.weight"):
            pre = k[: -len("q_proj.weight")]
            state[pre + "in_proj_weight"] = np.concatenate([state[pre + f"{q}_proj.weight"].T for q in "qkv"])
            state[pre + "in_proj_bias"] = np.concatenate([state[pre + f"{q}_proj.bias"] for q in "qkv"])
            n_attn += 1
    assert n_attn == 4  # level 1: two down + two up attention blocks
    path = str(tmp_path / "stage_c_tiny.pdparams")
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=2)
    loaded = load_stage_c(path, preset="tiny")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    # a pickle with code in it is refused
    evil = str(tmp_path / "evil.pdparams")
    with open(evil, "wb") as f:
        pickle.dump({"x": os.system}, f)
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        load_stage_c(evil, preset="tiny")


def test_diffusers_folder_without_index_and_stage_b_random(tmp_path):
    m = load_stage_b(None, preset="tiny")
    assert isinstance(m, StageB) and len(m.state_dict()) == len(expected_shapes(StageB, STAGE_B_PRESETS["tiny"]))
    folder = tmp_path / "decoder"
    folder.mkdir()
    export_unet_weights(m, "b", "diffusers", str(folder / "diffusion_pytorch_model.safetensors"))
    with WeightSource(str(folder)) as src:
        assert "clip_txt_pooled_mapper.weight" in src.shapes()
    out = str(tmp_path / "b.safetensors")
    convert_unet_weight.main(["--input", str(folder), "--output", out, "--preset", "tiny"])
    b2 = build_stage_b("tiny", weights=out)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(b2.state_dict()[k].numpy(), v.numpy(), err_msg=k)


@pytest.mark.parametrize("cls,cfg", [(StageC, STAGE_C_PRESETS["1B"]), (StageB, STAGE_B_PRESETS["700M"])])
def test_transpose_table_is_exactly_the_linear_weights(cls, cfg):
    from ldm.cascade.keys import is_linear_weight

    with paddle.LazyGuard():
        model = cls(cfg)
    linear = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)}
    table = {k for k in model.state_dict() if is_linear_weight(k)}
    assert table == linear
    # C/T/A blocks: 1B has 32 of each (2 + 3 linears + 5 linears), 700M 48 C, 48 T, 36 A (levels 2, 3)
    assert len(linear) == (3 + 32 * (2 + 3 + 5) if cls is StageC else 1 + 48 * 2 + 48 * 2 + 36 * 5)
