"""The SD family of the demo (issue 14): the word tokenizer, a 2-step run of the whole recipe
(scripts/train_demo_sd.sh) on CPU, and the shipped assets/demo/sd (loads through the normal SD
loaders, config in the metadata, `generate_sd.py --preset demo` writes 128x128 images)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm.demo import sd as demo_sd
from ldm.demo.shapes import caption, combinations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_word_tokenizer_gives_one_token_per_word(tmp_path):
    from ldm.sd.loading import load_tokenizer

    tok = load_tokenizer(demo_sd.write_tokenizer(str(tmp_path / "tok")))
    vocab = tok.get_vocab()
    seen = set()
    for combo in combinations():
        ids = tok(caption(*combo)).input_ids
        assert len(ids) == 9  # bos, 7 words, eos
        assert ids[1:-1] == [vocab[w + "</w>"] for w in caption(*combo).split()]
        seen.add(tuple(ids))
    assert len(seen) == 90
    assert len(vocab) == demo_sd.DEMO_CLIP["vocab_size"]
    assert tok("a purple circle").input_ids[2:-2]  # other words still tokenize (bytes)


def test_text_encoder_tells_the_words_apart(tmp_path):
    """The frozen random text encoder pads to its MAX_LENGTH positions, and one word changed changes
    that position's output by much more than the rest (cosine < 0.9 there, > 0.95 elsewhere)."""
    import paddle

    from ldm.sd.loading import load_tokenizer
    from ldm.sd.sampling import tokenize_prompts

    te = demo_sd.make_text_encoder(0)
    tok = load_tokenizer(demo_sd.write_tokenizer(str(tmp_path / "tok")), te.config.max_position_embeddings)
    ids = tokenize_prompts(tok, [caption("red", "circle", "blue"), caption("green", "circle", "blue"),
                                 caption("red", "circle", "green")])
    assert ids.shape == [3, demo_sd.MAX_LENGTH]
    with paddle.no_grad():
        out = te(ids)[0].numpy()
    cos = (out[0] * out[1:]).sum(-1) / np.linalg.norm(out[0], axis=-1) / np.linalg.norm(out[1:], axis=-1)  # (2, L)
    assert cos[0, 2] < 0.9 and cos[1, 6] < 0.9  # the colour word, the background word
    assert cos[0, :2].min() > 0.999 and cos[1, :6].min() > 0.999  # causal: earlier positions unchanged
    emb = te.text_model.embeddings
    assert abs(float(emb.token_embedding.weight.numpy().std()) - demo_sd.TOKEN_STD) < 0.05


def test_parts_are_deterministic_for_a_seed(tmp_path):
    """Two builds of the parts (text encoder, tokenizer, 2 VAE steps) with seed 0 write the same
    bytes; seed 1 another text encoder."""
    def build(name, seed):
        folder = str(tmp_path / name)
        demo_sd.write_components(folder, seed=seed)
        demo_sd.train_vae(os.path.join(folder, "vae"), steps=2, batch_size=2, seed=seed)
        files = {}
        for root, _, names in os.walk(folder):
            for n in names:
                with open(os.path.join(root, n), "rb") as f:
                    files[os.path.relpath(os.path.join(root, n), folder)] = f.read()
        return files

    a, b, c = build("a", 0), build("b", 0), build("c", 1)
    assert len(a) >= 8 and a == b
    assert a["text_encoder/model.safetensors"] != c["text_encoder/model.safetensors"]


def test_jsonl_lines_are_shuffled(tmp_path):
    """make_demo_sd.py data: every trained record once, in a seeded order that mixes the
    combinations (a batch read in file order holds several captions)."""
    mod = _load_script("make_demo_sd")
    jsonl = tmp_path / "d.jsonl"
    assert mod.main(["data", "--jsonl", str(jsonl), "--per_combination", "2", "--size", "32"]) == 0
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    captions = [json.loads(line)["caption"] for line in lines]
    assert len(captions) == 162 and sorted(set(captions)) == sorted(caption(*c) for c in combinations(held_out=False))
    assert len(set(captions[:16])) >= 12
    again = tmp_path / "e.jsonl"
    mod.main(["data", "--jsonl", str(again), "--per_combination", "2", "--size", "32"])
    assert again.read_text(encoding="utf-8").splitlines() == lines


def test_demo_recipe_two_steps_on_cpu(tmp_path):
    env = dict(os.environ, MAX_STEPS="2", VAE_STEPS="2", PER_COMBINATION="1", BATCH_SIZE="2", THREADS="1",
               WORK_DIR=str(tmp_path / "work"), DEST=str(tmp_path / "sd"), PYTHON=sys.executable)
    proc = subprocess.run(["sh", os.path.join(ROOT, "scripts", "train_demo_sd.sh")], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(tmp_path / "sd" / sub), sub
    for sub in ("unet", "vae", "text_encoder"):  # the build folder's path is not written into the package
        with open(tmp_path / "sd" / sub / "config.json", encoding="utf-8") as f:
            assert str(tmp_path) not in f.read(), sub
    gen = _load_script("generate_sd")
    written = gen.main(["--preset", "demo", "--pretrained_model_name_or_path", str(tmp_path / "sd"),
                        "--prompt", "a red circle on a blue background", "--num_inference_steps", "2",
                        "--output_dir", str(tmp_path / "out")])
    assert Image.open(written[0]).size == (128, 128)


def test_shipped_demo_loads_and_generates(tmp_path):
    from ldm.sd.loading import load_for_inference
    from ldm.weights import opened

    folder = demo_sd.check_folder()
    unet, vae, te, tok, sched = load_for_inference(folder)
    assert tok.model_max_length == te.config.max_position_embeddings == demo_sd.MAX_LENGTH
    assert unet.config.in_channels == vae.config.latent_channels == 4
    assert unet.config.sample_size * 8 == demo_sd.RESOLUTION == 2 ** (len(vae.config.block_out_channels) - 1) * 16
    for sub, name in (("unet", "diffusion_paddle_model.safetensors"), ("vae", "diffusion_paddle_model.safetensors"),
                      ("text_encoder", "model.safetensors")):
        with opened(os.path.join(folder, sub, name)) as src:
            meta = src.metadata
        assert "config" in meta and json.loads(meta["config"]), sub
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    assert size <= 12.5 * 2 ** 20
    gen = _load_script("generate_sd")
    written = gen.main(["--preset", "demo", "--prompt", "a red circle on a blue background",
                        "--num_inference_steps", "3", "--num_images", "2", "--output_dir", str(tmp_path)])
    assert len(written) == 2
    for p in written:
        im = np.asarray(Image.open(p))
        assert im.shape == (128, 128, 3) and im.std() > 0


def test_generate_sd_needs_a_folder_or_the_preset(capsys):
    gen = _load_script("generate_sd")
    with pytest.raises(SystemExit):
        gen.parse_args(["--prompt", "x"])
    assert "--preset demo" in capsys.readouterr().err


def test_shipped_demo_files_name_no_build_folder():
    """No config of assets/demo (config.json files, weight-file metadata) carries the absolute path
    of the folder it was built in (ppdiffusers writes `_name_or_path`); users do not have it."""
    from ldm.weights import WeightSource

    texts = {}
    for root, _, files in os.walk(os.path.join(ROOT, "assets", "demo")):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    texts[path] = f.read()
            elif name.endswith(".safetensors"):
                src = WeightSource(path)
                texts[path] = json.dumps(dict(src.metadata or {}))
                src.close()
    assert len([p for p in texts if p.endswith(".safetensors")]) >= 8, sorted(texts)
    bad = [p for p, t in texts.items() if any(s in t for s in ("/tmp/", "/work/", "/root/", "/home/"))]
    assert not bad, bad


def test_prompt_length_comes_from_the_tokenizer_folder(tmp_path):
    """SD and Stable Cascade read a prompt's padded length from the tokenizer folder
    (`ldm.clip.folder_max_length`): 10 for the demo, 77 without a config; a tokenizer that pads
    beyond the text encoder's positions is refused with one message naming both."""
    import shutil

    from ldm.sd.loading import load_for_inference, load_tokenizer

    src = demo_sd.demo_sd_dir()
    assert load_tokenizer(os.path.join(src, "tokenizer")).model_max_length == 10
    no_config = tmp_path / "tok"
    shutil.copytree(os.path.join(src, "tokenizer"), no_config)
    os.remove(no_config / "tokenizer_config.json")
    assert load_tokenizer(str(no_config)).model_max_length == 77
    bad = tmp_path / "sd"
    shutil.copytree(src, bad)
    cfg = bad / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_max_length": 12}))
    with pytest.raises(ValueError, match="pads prompts to 12 tokens.*10 positions"):
        load_for_inference(str(bad))
