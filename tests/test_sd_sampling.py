"""SD sampling: the four schedulers, per-image seeds (image i of a batch == a single image with
seed + i), guidance on/off, PNG metadata."""
import os

import numpy as np
import pytest


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel
    from sd_tiny import TINY_CLIP, TINY_UNET, TINY_VAE, write_tokenizer

    from ldm.sd.loading import load_tokenizer

    paddle.seed(0)
    tok_dir = tmp_path_factory.mktemp("tok")
    write_tokenizer(str(tok_dir))
    mods = [UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE), CLIPTextModel(CLIPTextConfig(**TINY_CLIP))]
    rng = np.random.default_rng(0)
    for p in mods[0].parameters():  # make the UNet output depend on its inputs (conv_out is zero-initialised)
        p.set_value(paddle.to_tensor((p.numpy() + 0.05 * rng.standard_normal(p.shape)).astype("float32")))
    for m in mods:
        m.eval()
    return mods + [load_tokenizer(str(tok_dir))]


@pytest.mark.parametrize("name", ["ddim", "euler", "euler-ancestral", "dpm"])
def test_schedulers_and_per_image_seeds(parts, name):
    from ldm.sd.sampling import generate, make_scheduler

    unet, vae, te, tok = parts
    sched = make_scheduler(name, {"prediction_type": "v_prediction"})
    assert sched.config.prediction_type == "v_prediction"
    batch = generate(unet, vae, te, tok, sched, ["a", "b"], 16, 16, guidance_scale=7.5, num_inference_steps=3, seed=10)
    assert batch.shape == (2, 16, 16, 3) and batch.dtype == np.uint8
    single = generate(unet, vae, te, tok, make_scheduler(name, {"prediction_type": "v_prediction"}), ["b"], 16, 16,
                      guidance_scale=7.5, num_inference_steps=3, seed=11)
    if name != "euler-ancestral":  # ancestral steps draw batch-shaped noise, so only the start noise is per image
        np.testing.assert_array_equal(single[0], batch[1])
    again = generate(unet, vae, te, tok, make_scheduler(name), ["a"], 16, 16, guidance_scale=1.0, num_inference_steps=3,
                     seed=10)
    again2 = generate(unet, vae, te, tok, make_scheduler(name), ["a"], 16, 16, guidance_scale=1.0, num_inference_steps=3,
                      seed=10)
    np.testing.assert_array_equal(again, again2)


def test_bad_arguments(parts):
    from ldm.sd.sampling import generate, make_scheduler

    unet, vae, te, tok = parts
    with pytest.raises(ValueError, match="scheduler"):
        make_scheduler("plms")
    with pytest.raises(ValueError, match="multiples"):
        generate(unet, vae, te, tok, make_scheduler("ddim"), ["a"], 15, 16)


def test_png_metadata(tmp_path):
    from PIL import Image

    from ldm.utils import save_png

    img = np.zeros((8, 8, 3), np.uint8)
    save_png(str(tmp_path / "x.png"), img, {"prompt": "a cat", "seed": 7})
    im = Image.open(tmp_path / "x.png")
    assert im.text == {"prompt": "a cat", "seed": "7"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temp file left


def test_full_save_is_a_pipeline_folder(parts, tmp_path):
    """only_save_updated_model=False: the checkpoint is a StableDiffusionPipeline folder (safetensors
    everywhere) and also feeds generate_sd.py's loader; load_trained restores the UNet exactly."""
    import paddle
    from ppdiffusers import StableDiffusionPipeline

    from ldm.sd.loading import load_for_inference
    from ldm.train.sd import SDTask

    unet, vae, te, tok = parts
    model = SDTask(unet, vae, te, tok, prediction_type="v_prediction")
    model.save_trained(str(tmp_path), only_updated=False)
    assert sorted(os.listdir(tmp_path)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert not any(f.endswith((".pdparams", ".bin")) for _, _, fs in os.walk(tmp_path) for f in fs)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    img = pipe("a", height=16, width=16, num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 16, 16, 3)
    *_, sched_cfg = load_for_inference(str(tmp_path))
    assert sched_cfg["prediction_type"] == "v_prediction"
    key = "conv_in.weight"
    before = unet.state_dict()[key].numpy().copy()
    unet.state_dict()[key].set_value(paddle.zeros_like(unet.state_dict()[key]))
    model.load_trained(str(tmp_path))
    np.testing.assert_array_equal(unet.state_dict()[key].numpy(), before)
