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
