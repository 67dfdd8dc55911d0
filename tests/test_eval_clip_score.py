"""CLIP score = the torchmetrics definition (100 * max(cos(image_embeds, text_embeds), 0), averaged)
computed independently with transformers + torchvision on a tiny random CLIP: transformers towers
saved with save_pretrained, converted by scripts/convert_other_weight.py, scored by ClipScorer."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
T = pytest.importorskip("torchvision.transforms")

from ldm.clip import CLIP_MEAN, CLIP_STD, write_tiny_clip_tokenizer  # noqa: E402
from ldm.eval.clip_score import ClipScorer, clip_score_from_embeds  # noqa: E402
from scripts.convert_other_weight import main as convert_main  # noqa: E402
from test_clip_parity import _randomise  # noqa: E402  (tests/ is on sys.path under pytest)

VOCAB = 514  # the tiny tokenizer's
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=24, hidden_act="gelu", bos_token_id=VOCAB - 2,
            eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=24, hidden_act="quick_gelu")
CAPTIONS = ["a red bus", "two cats on a sofa", "a bowl of fruit", "snow on a mountain at dusk", "x",
            "a very long caption " * 12, "the sea", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_score")
    text = _randomise(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)), 0)
    vision = _randomise(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)), 1)
    text.save_pretrained(str(d / "hf_text"), safe_serialization=True)
    write_tiny_clip_tokenizer(d / "hf_text")
    vision.save_pretrained(str(d / "hf_vision"), safe_serialization=True)
    convert_main(["--clip_text_dir", str(d / "hf_text"), "--clip_image_dir", str(d / "hf_vision"),
                  "--output_dir", str(d / "out")])
    return text, vision, d


def _images():
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (32, 32), (64, 90), (50, 50), (33, 70), (40, 48), (80, 64), (36, 36)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _reference_scores(text, vision, folder, images, captions):
    """torchmetrics' definition with transformers: CLIP tokenizer (transformers) + text_embeds,
    torchvision Resize(bicubic, antialias) + CenterCrop + Normalize + image_embeds."""
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pre = T.Compose([T.Resize(VISION["image_size"], interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                     T.CenterCrop(VISION["image_size"]), T.Normalize(CLIP_MEAN, CLIP_STD)])
    pix = torch.stack([pre(torch.from_numpy(im).permute(2, 0, 1).float() / 255.0) for im in images])
    with torch.no_grad():
        t = text(input_ids=ids).text_embeds
        v = vision(pixel_values=pix).image_embeds
    cos = torch.nn.functional.cosine_similarity(v, t, dim=-1)
    return (100.0 * cos.clamp(min=0)).numpy().astype(np.float64), ids.numpy()


def test_clip_score_matches_transformers(clip):
    text, vision, d = clip
    scorer = ClipScorer.from_dir(d / "out")
    images = _images()
    want, ids = _reference_scores(text, vision, d / "out" / "clip_text", images, CAPTIONS)
    ours_ids = scorer.tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                return_tensors="np").input_ids
    np.testing.assert_array_equal(np.asarray(ours_ids), ids)  # the same tokens, truncation included
    got = scorer.scores(images, CAPTIONS)
    assert (want == 0).any() and (want > 0).any()  # the max(cos, 0) clamp is exercised
    print(f"CLIP score: ours {got.mean():.8f}, transformers {want.mean():.8f}, "
          f"max per-pair diff {np.abs(got - want).max():.2e}")
    assert abs(got.mean() - want.mean()) <= 1e-5 * max(abs(want.mean()), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_clip_score_definition():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(clip_score_from_embeds(a, b), [100.0, 0.0, 100.0 / np.sqrt(2)])
    with pytest.raises(ValueError):
        clip_score_from_embeds(a, b[:2])


def test_clip_score_checks_its_inputs(clip):
    scorer = ClipScorer.from_dir(clip[2] / "out")
    with pytest.raises(ValueError, match="2 images for 1 captions"):
        scorer.scores(_images()[:2], ["one"])
    with pytest.raises(ValueError, match="uint8"):
        scorer.scores([np.zeros((8, 8, 3), np.float32)], ["one"])
