"""CLIP text/vision towers (with projection): transformers 4.x tiny random models saved with
save_pretrained (safetensors), converted by scripts/convert_other_weight.py, loaded by
ldm.clip through ppdiffusers, compared in fp32 on CPU. Also the transformers 5.x layout
(no `text_model.` prefix), a full CLIPModel folder, and loud failures on missing keys."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import paddle  # noqa: E402

from ldm.clip import clip_image_preprocess, load_clip_text, load_clip_vision  # noqa: E402
from ldm.weights import SafetensorsReader, WeightsError, save_safetensors  # noqa: E402
from scripts.convert_other_weight import main as convert_main  # noqa: E402

VOCAB = 99
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=24, hidden_act="gelu", bos_token_id=VOCAB - 2,
            eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=20, hidden_act="quick_gelu")


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _ids():
    ids = np.random.default_rng(0).integers(0, VOCAB - 2, size=(3, 77))
    ids[:, 0] = VOCAB - 2
    for row, end in enumerate((5, 40, 76)):
        ids[row, end:] = VOCAB - 1  # eos then padding with eos
    return ids


def _compare_text(folder, ref):
    ids = _ids()
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids))
    model = load_clip_text(folder)
    with paddle.no_grad():
        got = model(input_ids=paddle.to_tensor(ids))
    assert got.last_hidden_state.shape == [3, 77, 32] and got.text_embeds.shape == [3, 24]
    np.testing.assert_allclose(got.last_hidden_state.numpy(), want.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.text_embeds.numpy(), want.text_embeds.numpy(), atol=1e-4, rtol=0)
    assert np.abs(want.text_embeds.numpy()).max() > 0.1
    # the path Stage C uses: hidden_states[-1] (before the final LayerNorm) with the attention mask
    mask = (np.arange(77)[None, :] <= np.array([5, 40, 76])[:, None]).astype("int64")
    with torch.no_grad():
        want_h = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     output_hidden_states=True).hidden_states[-1].numpy()
    with paddle.no_grad():
        got_h = model(input_ids=paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask),
                      output_hidden_states=True).hidden_states[-1].numpy()
    np.testing.assert_allclose(got_h, want_h, atol=1e-4, rtol=0)
    assert np.abs(want_h - want.last_hidden_state.numpy()).max() > 0.1  # really a different tensor


def _compare_vision(folder, ref):
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x)).image_embeds.numpy()
    model = load_clip_vision(folder)
    with paddle.no_grad():
        got = model(pixel_values=paddle.to_tensor(x)).image_embeds.numpy()
    assert got.shape == (2, 20) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    text = _randomise(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)), 0)
    vision = _randomise(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)), 1)
    text.save_pretrained(str(d / "hf_text"), safe_serialization=True)
    vision.save_pretrained(str(d / "hf_vision"), safe_serialization=True)
    convert_main(["--clip_text_dir", str(d / "hf_text"), "--clip_image_dir", str(d / "hf_vision"),
                  "--output_dir", str(d / "out")])
    return text, vision, d


def test_text_tower_matches_transformers(towers):
    text, _, d = towers
    with SafetensorsReader(d / "out" / "clip_text" / "model.safetensors") as r:
        assert r.metadata["format"] == "np"
        assert len(r.keys()) == 4 + 16 * 2 + 1  # embeddings x2, final LN x2, 16 per layer, projection
        assert r.shape("text_projection.weight") == (32, 24)  # Linear transposed to [in, out]
    _compare_text(d / "out" / "clip_text", text)


def test_vision_tower_matches_transformers(towers):
    _, vision, d = towers
    _compare_vision(d / "out" / "clip_image", vision)


def test_image_preprocess_matches_torchvision():
    """Resize(224, BICUBIC, antialias=True) + CenterCrop(224) + Normalize(CLIP mean/std)."""
    T = pytest.importorskip("torchvision.transforms")
    ref = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(224),
                     T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    rng = np.random.default_rng(3)
    for shape in [(2, 3, 512, 384), (1, 3, 160, 200), (1, 3, 224, 300)]:  # down, up, crop only
        x = rng.random(shape, dtype=np.float32)
        got = clip_image_preprocess(paddle.to_tensor(x)).numpy()
        want = ref(torch.from_numpy(x)).numpy()
        assert got.shape == (shape[0], 3, 224, 224)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        clip_image_preprocess(paddle.rand([1, 4, 8, 8]))


def test_prefixless_layout_transformers5(towers, tmp_path):
    """transformers 5.x writes the towers without `text_model.` / `vision_model.`: same result."""
    text, vision, d = towers
    for part, src, prefix in (("text", "hf_text", "text_model."), ("vision", "hf_vision", "vision_model.")):
        out = tmp_path / f"hf5_{part}"
        out.mkdir()
        with SafetensorsReader(d / src / "model.safetensors") as r:
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in r.items()}
        assert not any(k.startswith(prefix) for k in state)
        save_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text((d / src / "config.json").read_text())
    convert_main(["--clip_text_dir", str(tmp_path / "hf5_text"), "--clip_image_dir", str(tmp_path / "hf5_vision"),
                  "--clip_text_out", str(tmp_path / "t"), "--clip_image_out", str(tmp_path / "v")])
    _compare_text(tmp_path / "t", text)
    _compare_vision(tmp_path / "v", vision)


def test_full_clipmodel_folder(tmp_path):
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    full = _randomise(transformers.CLIPModel(cfg), 2)
    full.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    convert_main(["--clip_text_dir", str(tmp_path / "hf"), "--clip_image_dir", str(tmp_path / "hf"),
                  "--output_dir", str(tmp_path / "out")])
    ids = _ids()
    with torch.no_grad():
        want_t = full.get_text_features(input_ids=torch.from_numpy(ids)).numpy()
        x = torch.randn(1, 3, 32, 32)
        want_v = full.get_image_features(pixel_values=x).numpy()
    with paddle.no_grad():
        got_t = load_clip_text(tmp_path / "out" / "clip_text")(input_ids=paddle.to_tensor(ids)).text_embeds.numpy()
        got_v = load_clip_vision(tmp_path / "out" / "clip_image")(pixel_values=paddle.to_tensor(x.numpy())).image_embeds
    np.testing.assert_allclose(got_t, want_t, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_v.numpy(), want_v, atol=1e-4, rtol=0)


def test_missing_key_fails_loudly(towers, tmp_path):
    _, _, d = towers
    bad = tmp_path / "bad"
    bad.mkdir()
    with SafetensorsReader(d / "hf_text" / "model.safetensors") as r:
        state = dict(r.items())
    state.pop("text_model.encoder.layers.1.mlp.fc2.weight")
    state.pop("text_projection.weight")
    save_safetensors(state, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((d / "hf_text" / "config.json").read_text())
    with pytest.raises(WeightsError) as e:
        convert_main(["--clip_text_dir", str(bad), "--clip_text_out", str(tmp_path / "o")])
    assert "2 missing" in str(e.value) and "text_projection.weight" in str(e.value)
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")
    # an unconverted transformers folder is refused by the loader
    with pytest.raises(WeightsError, match="convert the folder first"):
        load_clip_text(d / "hf_text")
