"""2-process data-parallel Stage B fine-tuning on CPU (gloo) with the tiny model: the one launch of
tests/two_rank_runs.py (session fixture `two_rank_runs`) runs `worker` here on both ranks,
`scripts/train_stage_b_trainer.main` for one epoch of the 8-image demo set
(2 steps of 2 images per rank), recording each rank's captions, then every rank writes its own
Stage B parameters; once fully trained, once as a LoRA run. The test checks that the ranks read
disjoint halves of the data and end with identical parameters that moved from the initial ones.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "demo_dataset")


def worker(out, extra):
    sys.path.insert(0, ROOT)
    import paddle

    from scripts import train_stage_b_trainer as script

    trainer = script.main([
        "--do_train", "--dataset_path", DEMO, "--output_dir", os.path.join(out, "train"), "--model_version", "tiny",
        "--resolution", "64", "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_steps", "100", "--seed", "7", "--report_to", "none", "--disable_tqdm", "True",
        "--image_logging_steps", "0", "--use_ema", "True", "--record_log_dir", os.path.join(out, "captions"), *extra,
    ])
    rank = paddle.distributed.get_rank()
    state = {k: v.numpy() for k, v in trainer.model.stage_b.state_dict().items()}
    np.savez(os.path.join(out, f"params_rank{rank}.npz"), **state)


def prepare_full(folder):  # worker arguments of the two_rank_runs jobs
    return [folder, []]


def prepare_lora(folder):
    return [folder, ["--lora_rank", "4"]]


@pytest.mark.parametrize("extra", [[], ["--lora_rank", "4"]], ids=["full", "lora"])
def test_two_process_gloo_stage_b(two_rank_runs, extra):
    from ldm.cascade.components import tiny_components

    tmp_path = Path(two_rank_runs["stage_b_lora" if extra else "stage_b_full"])
    caps = [open(tmp_path / "captions" / f"rank{r}.txt", encoding="utf-8").read().splitlines() for r in (0, 1)]
    every = sorted(open(os.path.join(DEMO, f), encoding="utf-8").read().strip() for f in os.listdir(DEMO) if f.endswith(".txt"))
    assert len(caps[0]) == len(caps[1]) == 4  # 2 steps x 2 images per rank
    assert not set(caps[0]) & set(caps[1]) and sorted(caps[0] + caps[1]) == every  # disjoint halves of the epoch
    p0, p1 = (np.load(tmp_path / f"params_rank{r}.npz") for r in (0, 1))
    assert sorted(p0.files) == sorted(p1.files) and len(p0.files) > 0
    for k in p0.files:
        assert np.array_equal(p0[k], p1[k]), k
    init = {k: v.numpy() for k, v in tiny_components().get("stage_b").state_dict().items()}
    moved = [k for k in p0.files if k not in init or not np.array_equal(p0[k], init[k])]
    if extra:  # LoRA: only adapters moved, the base is the preset's
        assert moved and all(".lora_" in k for k in moved)
        assert any(k.endswith(".lora_down") and np.abs(p0[k]).max() > 0 for k in moved)
        assert os.path.isfile(tmp_path / "train" / "stage_b_lora.safetensors")
    else:
        assert len(moved) > len(p0.files) // 2
        assert os.path.isfile(tmp_path / "train" / "stage_b.safetensors")
