"""The Stable Cascade half of the shipped demo (issue 14).

- the "demo" presets build (and the V2-S EfficientNet metadata stays `{"c_latent": 16}`);
- a 2-step run of every Cascade demo recipe on CPU: scripts/demo_cascade_parts.py (CLIP text,
  Stage A, EfficientNet + Previewer), scripts/train_stage_b_trainer.py and train_stage_c_trainer.py
  with --model_version demo (as scripts/train_demo.sh calls them), and the results load through the
  normal loaders;
- the shipped files in assets/demo/cascade load through the normal loaders (config from the
  metadata), and `inference.py --preset demo` writes 256 x 256 images from another folder;
- the missing-weights errors point to `--preset demo` / the rebuild command.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldm.cascade import components as cp  # noqa: E402
from ldm.cascade import settings as st  # noqa: E402

SHIPPED = st.DEMO_WEIGHTS_PATH
SHIPPED_FILES = ("stage_a", "effnet_encoder", "previewer", "stage_b", "stage_c")
needs_shipped = pytest.mark.skipif(not all(os.path.isfile(os.path.join(SHIPPED, f + ".safetensors"))
                                           for f in SHIPPED_FILES), reason="assets/demo/cascade not built yet")


def test_demo_presets_build():
    import paddle

    from ldm.cascade.effnet import EFFNET_PRESETS, EfficientNetConfig, EfficientNetEncoder
    from ldm.cascade.previewer import PREVIEWER_PRESETS, Previewer
    from ldm.cascade.stage_a import STAGE_A_PRESETS, StageA

    assert EFFNET_PRESETS["full"].to_dict() == {"c_latent": 16}  # V2-S files keep their metadata
    demo = EFFNET_PRESETS["demo"]
    assert EfficientNetConfig.from_dict(json.loads(json.dumps(demo.to_dict()))) == demo
    with paddle.no_grad():
        x = paddle.rand([1, 3, 192, 192])
        z = EfficientNetEncoder(demo)(x)
        assert z.shape == [1, 16, 6, 6]  # the Stage C latent of a 256 px image
        assert Previewer(PREVIEWER_PRESETS["demo"])(z).shape == [1, 3, 48, 48]
        assert StageA(STAGE_A_PRESETS["demo"]).encode(paddle.rand([1, 3, 256, 256]))[0].shape == [1, 4, 64, 64]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A weights folder of the demo's parts after 2 steps each (scripts/demo_cascade_parts.py)."""
    import importlib

    out = tmp_path_factory.mktemp("demo_parts")
    script = importlib.import_module("scripts.demo_cascade_parts")
    written = script.main(["--output_dir", str(out), "--stage_a_steps", "2", "--stage_a_batch_size", "2",
                           "--encoder_steps", "2", "--encoder_batch_size", "2"])
    assert len(written) == 4
    return out


def test_parts_load_through_the_normal_loaders(parts):
    from ldm import clip
    from ldm.cascade import loading

    a = loading.load_stage_a(str(parts / "stage_a.safetensors"))
    assert a.config.levels == 2 and a.scale_factor > 0 and a.scale_factor != 1.0  # measured latent std
    e = loading.load_effnet(str(parts / "effnet_encoder.safetensors"))
    assert e.config.stages == e.config.__class__.from_dict(e.config.to_dict()).stages
    p = loading.load_previewer(str(parts / "previewer.safetensors"))
    assert p.config.c_hidden == 64
    tok = clip.load_tokenizer(str(parts / "clip_text"))
    ids = tok("a red circle on a blue background")["input_ids"]
    assert len(ids) == 9  # bos + 7 word tokens + eos
    text = clip.load_clip_text(str(parts / "clip_text"))
    assert text.config.projection_dim == 64
    # the loaders pad captions to the folder's length (ldm.demo.cascade.MAX_LENGTH), not CLIP's 77
    cfg = dataclasses.replace(st.DEMO, weights_path=str(parts))
    assert cp.file_components(cfg, ["tokenizer"]).get("tokenizer").model_max_length == 10


def test_folder_max_length(tmp_path):
    from ldm import clip
    from ldm.weights import WeightsError

    assert clip.folder_max_length(str(tmp_path)) == 77  # no tokenizer_config.json: CLIP's
    for value, expected in ((10, 10), (77, 77), (10**30, 77)):  # a "no limit" value: CLIP's 77
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": value}))
        assert clip.folder_max_length(str(tmp_path)) == expected
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": "ten"}))
    with pytest.raises(WeightsError, match="model_max_length"):
        clip.folder_max_length(str(tmp_path))


def test_clip_text_tells_the_words_apart(parts):
    """The random CLIP's hidden states keep each word: two captions that differ in one word are far
    apart at that position (embeddings at std 1; at CLIP's 0.02 they came out at cosine 0.93-0.98)."""
    import paddle

    from ldm import clip
    from ldm.cascade.pipeline import encode_text

    folder = str(parts / "clip_text")
    tok, text = clip.load_tokenizer(folder, clip.folder_max_length(folder)), clip.load_clip_text(folder)
    caps = ["a red circle on a blue background", "a green circle on a blue background",
            "a red square on a blue background", "a red circle on a white background"]
    with paddle.no_grad():
        hidden = encode_text(tok, text, caps)[0].numpy()
    assert hidden.shape == (4, 10, 64)  # padded to the folder's model_max_length

    def cos(a, b):
        return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))

    for other, pos in ((1, 2), (2, 3), (3, 6)):  # colour, shape, background word (after bos)
        assert cos(hidden[0, pos], hidden[other, pos]) < 0.8
        assert cos(hidden[0, 1], hidden[other, 1]) > 0.99  # "a" before any difference: the same


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    from ldm.demo.shapes import write_caption_folder

    folder = tmp_path_factory.mktemp("demo_captions")
    write_caption_folder(str(folder), per_combination=1, size=256, seed=0)
    return folder


TRAINER_FLAGS = ["--do_train", "--model_version", "demo", "--model_max_length", "10", "--multi_aspect_ratio", "1", "--use_ema", "True",
                 "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--image_logging_steps", "1000000",
                 "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--seed", "0", "--overwrite_output_dir"]


def test_stage_b_and_stage_c_trainers_two_steps(parts, captions, tmp_path):
    """The demo recipes of scripts/train_demo.sh through the project's own trainers (2 steps each)."""
    import importlib

    import train_stage_c_trainer
    from ldm.cascade import loading

    stage_b = importlib.import_module("scripts.train_stage_b_trainer")
    common = TRAINER_FLAGS + ["--weights_path", str(parts), "--dataset_path", str(captions)]
    stage_b.main(common + ["--output_dir", str(tmp_path / "b"), "--cache_dir", str(tmp_path / "cache_b"),
                           "--resolution", "256", "--per_device_train_batch_size", "2"])
    b = loading.load_stage_b(str(tmp_path / "b" / "stage_b_ema.safetensors"), "demo")
    assert b.config == loading.STAGE_B_PRESETS["demo"]
    train_stage_c_trainer.main(common + ["--output_dir", str(tmp_path / "c"), "--cache_dir", str(tmp_path / "cache_c"),
                                         "--clip_image", "none", "--resolution", "192",
                                         "--per_device_train_batch_size", "2"])
    c = loading.load_stage_c(str(tmp_path / "c" / "stage_c_ema.safetensors"), None)  # config from the metadata
    assert c.config == loading.STAGE_C_PRESETS["demo"]

    # the trained files make a demo folder that inference.py --preset demo --weights_path reads
    import shutil

    import inference

    shutil.copy(tmp_path / "b" / "stage_b_ema.safetensors", parts / "stage_b.safetensors")
    shutil.copy(tmp_path / "c" / "stage_c_ema.safetensors", parts / "stage_c.safetensors")
    written = inference.main(["--preset", "demo", "--weights_path", str(parts), "--batch_size", "1", "--steps_c", "2",
                              "--steps_b", "2", "--output_dir", str(tmp_path / "o"), "--no_progress"])
    from PIL import Image

    assert Image.open(written[0]).size == (256, 256)


def test_missing_weights_errors_point_to_the_demo(tmp_path):
    with pytest.raises(cp.MissingWeightsError) as e:
        cp.resolve_weights(st.CascadeConfig(weights_path=str(tmp_path)), cp.NEEDED_C)
    assert "--preset demo" in str(e.value)
    with pytest.raises(cp.MissingWeightsError) as e:
        cp.demo_components(weights_path=str(tmp_path))
    msg = str(e.value)
    assert st.DEMO_REBUILD in msg and "stage_c.safetensors" in msg and "clip_text" in msg


@needs_shipped
def test_shipped_files_load_through_the_normal_loaders():
    from ldm.cascade import loading

    comps = cp.demo_components()
    for name in cp.DEMO_NEEDED:
        assert comps.get(name) is not None
    assert comps.get("tokenizer").model_max_length == 10  # the shipped tokenizer_config.json
    for name, load, cls_presets in ((
            "stage_c", loading.load_stage_c, loading.STAGE_C_PRESETS), ("stage_b", loading.load_stage_b,
                                                                        loading.STAGE_B_PRESETS)):
        net = load(os.path.join(SHIPPED, name + ".safetensors"), None)  # the config from the metadata
        assert net.config == cls_presets["demo"]
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED) for f in fs)
    assert total <= 12.5 * 2**20, total


@needs_shipped
def test_inference_preset_demo_from_another_folder(tmp_path):
    from PIL import Image

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), "--preset", "demo", "--caption",
                           "a red circle on a blue background", "--batch_size", "1", "--no_progress"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = Image.open(tmp_path / "result_0.png")
    assert img.size == (256, 256) and img.text["model"] == "demo"
    assert np.asarray(img).std() > 5  # not a flat image


@needs_shipped
def test_generate_matches_inference(tmp_path):
    """ldm.demo.cascade.generate (for scripts and the score) gives what inference.py --preset demo writes."""
    import inference
    from PIL import Image

    from ldm.demo.cascade import generate

    images = generate("a red circle on a blue background", n=2, seed=3, steps_c=3, steps_b=2)
    assert len(images) == 2 and images[0].shape == (256, 256, 3) and images[0].dtype == np.uint8
    written = inference.main(["--preset", "demo", "--caption", "a red circle on a blue background", "--seed", "3",
                              "--batch_size", "2", "--steps_c", "3", "--steps_b", "2", "--output_dir", str(tmp_path),
                              "--no_progress"])
    assert len(written) == 2  # a batch of K, as scripts/demo_score.py asks for
    for path, image in zip(written, images):
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), image)
