"""inference.py / ModelC / ModelB on the offline tiny preset (CPU, 128 px).

- `python inference.py --preset tiny` writes result_0.png and result_1.png with the metadata;
  the same seed in another process gives byte-identical files; image i of a batch equals
  image 0 of a batch of one with seed + i; a different seed differs.
- missing weights: one error naming every missing file and the README section;
- bad sizes, dtypes and batch arguments: clear errors before anything is loaded;
- latent shapes, low-memory mode (same images, nothing left loaded), img2img and image variation.
"""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

from ldm.cascade import settings as C
import inference
from ldm.cascade import components as cp
from ldm.cascade import pipeline as pl
from ldm.model_b import ModelB
from ldm.model_c import ModelC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--height", "128", "--width", "128", "--no_progress"]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_cli_tiny_files_metadata_and_reproducibility(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # (the child inherits this process's OMP_NUM_THREADS, so both runs use the same kernels)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), *TINY, "--output_dir", str(a)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(a)) == ["result_0.png", "result_1.png"]  # the seed's defaults: batch 2
    im = Image.open(a / "result_0.png")
    assert im.size == (128, 128) and im.mode == "RGB"
    assert im.text["prompt"] == C.CAPTION and im.text["seed"] == "1" and im.text["batch_index"] == "0"
    assert im.text["steps"] == "C 20, B 10" and im.text["cfg"] == "C 4.0, B 1.1"
    assert Image.open(a / "result_1.png").text["seed"] == "2"

    # same arguments in this process: byte-identical PNGs
    written = inference.main([*TINY, "--output_dir", str(b)])
    assert [os.path.basename(p) for p in written] == ["result_0.png", "result_1.png"]
    for name in ("result_0.png", "result_1.png"):
        assert _read(a / name) == _read(b / name)
    assert _read(a / "result_0.png") != _read(a / "result_1.png")  # each image has its own noise

    # seed 2, batch 1 reproduces image 1 of the seed-1 batch (image i uses seed + i; up to one
    # grey level: batched kernels round differently) and differs from image 0 (another seed)
    inference.main([*TINY, "--output_dir", str(c), "--seed", "2", "--batch_size", "1"])
    px = lambda p: np.asarray(Image.open(p)).astype(int)  # noqa: E731
    assert np.abs(px(c / "result_0.png") - px(a / "result_1.png")).max() <= 1
    assert (np.abs(px(c / "result_0.png") - px(a / "result_0.png")) > 1).mean() > 0.1


def test_missing_weights_one_error_lists_every_file(tmp_path):
    (tmp_path / "stage_c_lite.pdparams").write_bytes(b"")  # present: must not be listed
    with pytest.raises(cp.MissingWeightsError) as e:
        inference.main(["--weights_path", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    msg = str(e.value)
    for missing in ("previewer.safetensors or previewer.pdparams", "stage_b_lite.safetensors",
                    "stage_a.safetensors", os.path.join(str(tmp_path), "clip_text") + "/"):
        assert missing in msg, msg
    assert "stage_c" not in msg.replace("stage_c:", "")  # only the component label would mention it
    assert "Missing 4 file(s)" in msg and '"Weights: download and convert"' in msg
    assert "STABLE_CASCADE_WEIGHTS" in msg
    assert not (tmp_path / "o").exists()  # failed before writing anything

    # a CLIP folder without its tokenizer files
    (tmp_path / "clip_text").mkdir()
    (tmp_path / "clip_text" / "config.json").write_text("{}")
    with pytest.raises(cp.MissingWeightsError) as e:
        inference.main(["--weights_path", str(tmp_path)])
    assert "- tokenizer: " + os.path.join(str(tmp_path), "clip_text", "vocab.json") + " and " in str(e.value)
    assert "- clip_text:" not in str(e.value)

    # the full-size versions look for their own files
    with pytest.raises(cp.MissingWeightsError) as e:
        inference.main(["--weights_path", str(tmp_path), "--model_c_version", "3.6B", "--model_b_version", "3B"])
    assert "- stage_c: " + os.path.join(str(tmp_path), "stage_c.safetensors or stage_c.pdparams") in str(e.value)
    assert "- stage_b: " + os.path.join(str(tmp_path), "stage_b.safetensors or stage_b.pdparams") in str(e.value)

    # --stage_c names its own file (e.g. a fine-tuned one), relative to the working directory
    with pytest.raises(cp.MissingWeightsError) as e:
        inference.main(["--weights_path", str(tmp_path), "--stage_c", "tuned/stage_c_ft.safetensors"])
    assert "- stage_c: " + os.path.abspath("tuned/stage_c_ft.safetensors") in str(e.value)

    # on the command line: the message without a traceback, exit status 1
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), "--weights_path", str(tmp_path / "no")],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: Stable Cascade weights not found" in proc.stderr and "Missing 5 file(s)" in proc.stderr

    # the seed's API: ModelC() lists only what Stage C needs
    cfg = C.CascadeConfig(weights_path=str(tmp_path / "empty"))
    with pytest.raises(cp.MissingWeightsError, match=r"Missing 3 file\(s\)") as e:
        ModelC(cfg)
    assert "stage_c_lite.safetensors or stage_c_lite.pdparams" in str(e.value) and "- clip_text: " in str(e.value)
    with pytest.raises(cp.MissingWeightsError, match="stage_b_lite"):
        ModelB(cfg)


def test_bad_sizes_and_arguments(tmp_path, caplog):
    with pytest.raises(ValueError, match="height must be between 64 and 4096 pixels, got 30"):
        inference.main([*TINY, "--height", "30", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="width must be between 64 and 4096 pixels, got 5000"):
        pl.check_size(1024, 5000)
    with pytest.raises(ValueError, match="height must be a number of pixels"):
        pl.check_size("big", 128)
    assert pl.check_size(1000, 1024) == (1024, 1024)
    assert pl.check_size(100, 130) == (128, 128)
    with pytest.raises(SystemExit):
        inference.parse_args(["--strength", "1.5"])
    with pytest.raises(ValueError, match="float16 is not supported.*overflow.*use --dtype bfloat16"):
        inference.main([*TINY, "--dtype", "float16", "--output_dir", str(tmp_path)])  # on any device
    if not paddle.device.is_compiled_with_cuda():
        with pytest.raises(ValueError, match="needs a GPU.*bfloat16 on a GPU"):
            inference.main([*TINY, "--dtype", "bfloat16", "--output_dir", str(tmp_path)])


def test_size_rules():
    assert pl.stage_c_latent_size(1024, 1024) == (24, 24) and pl.stage_b_latent_size(1024, 1024) == (256, 256)
    for h in range(C.MIN_SIZE, C.MAX_SIZE + 1, C.SIZE_MULTIPLE):  # ModelB recovers ModelC's size
        assert pl.size_from_stage_c(*pl.stage_c_latent_size(h, h)) == (h, h)


def test_models_shapes_low_memory_img2img_variation():
    model, model_b = ModelC(preset="tiny", progress=False).eval(), ModelB(preset="tiny", progress=False).eval()
    assert model.components is model_b.components  # one shared text encoder
    prev, lat_c = model.log_image("a cat", height=128, width=192, batch_size=1, seed=3, steps=3)
    assert prev.dtype == np.uint8 and prev.shape == (1, 24, 40, 3)
    assert lat_c.shape == [1, 16, 3, 5]
    img, lat_b = model_b.log_image(lat_c, "a cat", seed=3, steps=2)
    assert img.dtype == np.uint8 and img.shape == (1, 128, 192, 3) and lat_b.shape == [1, 4, 32, 48]
    # the seed's (PaddleMIX) positional order: latent, caption, height, width, batch_size, seed, steps
    img_pos, _ = model_b.log_image(lat_c, "a cat", 128, 192, 1, 3, 2)
    assert np.array_equal(img_pos, img)

    low = ModelC(preset="tiny", low_memory=True, progress=False,
                 components=cp.Components(model.components.builders))
    prev2, lat_c2 = low.log_image("a cat", height=128, width=192, batch_size=1, seed=3, steps=3)
    assert np.array_equal(lat_c2.numpy(), lat_c.numpy()) and np.array_equal(prev2, prev)
    assert low.components._cache == {}  # every network freed after its stage

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8))
    _, lat_var = model.log_image("a cat", height=128, width=192, seed=3, steps=3, image=rgb)
    assert not np.allclose(lat_var.numpy(), lat_c.numpy())  # the CLIP image embedding conditions
    _, lat_i2i = model.log_image("a cat", height=128, width=192, seed=3, steps=3, init_image=rgb, strength=0.5)
    assert lat_i2i.shape == [1, 16, 3, 5] and not np.allclose(lat_i2i.numpy(), lat_c.numpy())
    with pytest.raises(ValueError, match="strength must be in"):
        model.log_image("a cat", height=128, width=128, steps=1, init_image=rgb, strength=0.0)
    with pytest.raises(ValueError, match="batch_size 3 but latent_c holds 1"):
        model_b.log_image(lat_c, "a cat", batch_size=3)
