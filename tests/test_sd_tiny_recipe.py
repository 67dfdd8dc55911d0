"""The offline SD v1 recipe (issue 12 item 12): `STAGE=sd MODEL_VERSION=tiny sh train.sh` from a
folder that is not the repo writes the tiny components, LAION part files from
assets/demo_dataset, pretrains the UNet (here 2 steps) and samples a PNG of the training size."""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_sh_sd_tiny_recipe(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (
        "OUTPUT_DIR", "DATASET_PATH", "RESOLUTION", "SAVE_STEPS", "NUM_INFERENCE_STEPS", "BATCH_SIZE", "GPUS",
        "FLAG_USE_EMA", "FLAG_RECOMPUTE", "FLAG_XFORMERS")}
    env.update(STAGE="sd", MODEL_VERSION="tiny", MAX_STEPS="2", SAVE_STEPS="2", NUM_INFERENCE_STEPS="2",
               RESOLUTION="16", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run(["sh", os.path.join(ROOT, "train.sh")], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = cwd / "train_output_sd"
    assert {"vae", "text_encoder", "tokenizer", "scheduler", "unet_config.json"} <= set(os.listdir(out / "tiny_sd"))
    with open(out / "data.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 8 and all(os.path.isabs(r["image"]) for r in records)
    parts = sorted(glob.glob(str(out / "data" / "laion400m_format_data" / "part-*")))
    assert len(parts) == 2  # 8 demo records, 4 per part
    assert os.path.isfile(out / "data" / "filelist" / "custom_dataset.filelist.list")
    ckpt = out / "pretrain" / "checkpoint-2"
    assert (ckpt / "checkpoint_complete.json").is_file() and (ckpt / "unet").is_dir()
    assert (out / "pretrain" / "unet" / "diffusion_paddle_model.safetensors").is_file()
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"images": ["./train_output_sd/samples/0000_00_seed42.png"]}
    from PIL import Image

    im = Image.open(out / "samples" / "0000_00_seed42.png")
    assert im.size == (16, 16) and im.text["prompt"] == "a red circle on a snowy white background"


def test_train_sh_sd_refuses_other_versions(tmp_path):
    env = {**os.environ, "STAGE": "sd", "MODEL_VERSION": "1B"}
    proc = subprocess.run(["sh", os.path.join(ROOT, "train.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "MODEL_VERSION=tiny" in proc.stderr


_NO_TORCH = '''
import sys
BLOCKED = ("torch", "torchvision", "diffusers", "transformers")  # requirements-dev.txt only


class _Hide:  # as if not installed: find_spec finds nothing, `import torch` raises ModuleNotFoundError
    def __init__(self, finder):
        self._finder = finder

    def __getattr__(self, name):
        return getattr(self._finder, name)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find else None


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''

_PADDLE_BUILD = '''
import json, os, sys
out = sys.argv[1]
from ldm.sd.tiny import write_tiny_sd
write_tiny_sd(out, unet_weights=True, backend="paddle")
from ldm.sd.loading import (is_torch_layout, load_scheduler_config, load_text_encoder, load_tokenizer, load_unet,
                            load_vae)
from ldm.sd.sampling import generate, make_scheduler
layouts = {c: is_torch_layout(os.path.join(out, c)) for c in ("vae", "text_encoder", "unet")}
vae, te = load_vae(os.path.join(out, "vae")), load_text_encoder(os.path.join(out, "text_encoder"))
tok = load_tokenizer(os.path.join(out, "tokenizer"))
shapes = []
for unet in (os.path.join(out, "unet"), os.path.join(out, "unet_config.json")):
    sched = make_scheduler("ddim", load_scheduler_config(os.path.join(out, "scheduler")))
    img = generate(load_unet(unet), vae, te, tok, sched, ["a red circle"], 16, 16, num_inference_steps=2, seed=1)
    shapes.append([list(img.shape), str(img.dtype)])
try:
    import torch  # noqa: F401
    torch_importable = True
except ImportError:
    torch_importable = False
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "diffusers", "transformers"})
print(json.dumps({"layouts": layouts, "shapes": shapes, "torch_importable": torch_importable, "loaded": loaded}))
'''


def test_write_tiny_sd_paddle_backend_without_torch(tmp_path):
    """backend="paddle" (what make_tiny_sd.py / train.sh use) needs only requirements.txt: with
    torch, diffusers and transformers hidden, it writes Paddle-layout folders that ldm.sd.loading
    reads and ldm.sd.sampling.generate turns into an image (UNet weights and UNet config)."""
    out = tmp_path / "tiny_sd"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH + _PADDLE_BUILD, str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch_importable"] is False and result["loaded"] == []
    assert result["layouts"] == {"vae": False, "text_encoder": False, "unet": False}
    assert result["shapes"] == [[[1, 16, 16, 3], "uint8"]] * 2
    assert (out / "vae" / "diffusion_paddle_model.safetensors").is_file()
    assert (out / "unet" / "diffusion_paddle_model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert {"vae", "text_encoder", "tokenizer", "scheduler", "unet", "unet_config.json"} == set(os.listdir(out))
    assert not [f for _, _, files in os.walk(out) for f in files if "pytorch" in f or f.endswith(".bin")]


def test_write_tiny_sd_backend_checked(tmp_path):
    from ldm.sd.tiny import write_tiny_sd

    with pytest.raises(ValueError, match="backend"):
        write_tiny_sd(tmp_path / "x", backend="jax")
