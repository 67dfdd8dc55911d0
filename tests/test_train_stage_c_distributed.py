"""2-process data-parallel Stage C fine-tuning on CPU (gloo) with the tiny model:

    python -m paddle.distributed.launch --nproc_per_node 2 tests/test_train_stage_c_distributed.py <out>

runs this file as a worker: `train_stage_c_trainer.main` for one epoch of the 8-image demo set
(2 steps of 2 images per rank), recording each rank's captions, then every rank writes its own
Stage C parameters; once as plain data parallel (in the shared launch of tests/two_rank_runs.py),
once with ZeRO stage 1 (`--sharding stage1`, optimiser state split over the ranks) and recompute.
Stage 2 needs a GPU. The test checks that the ranks read disjoint halves of the data and end with
identical parameters that differ from the initial ones. A third case stops a ZeRO-1 + recompute run
at a checkpoint and resumes it in new processes: every rank restores its own optimizer shard and RNG
states, and the end equals the uninterrupted run bit for bit. (The 2-step ZeRO-1 + recompute case
is that run before its resume, copied as it was; it and the uninterrupted run share one launch.)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "demo_dataset")


def worker(out, extra):
    sys.path.insert(0, ROOT)
    import paddle

    import train_stage_c_trainer as script

    trainer = script.main([
        "--do_train", "--dataset_path", DEMO, "--output_dir", os.path.join(out, "train"), "--model_version", "tiny",
        "--resolution", "64", "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_steps", "100", "--seed", "7", "--report_to", "none", "--disable_tqdm", "True",
        "--image_logging_steps", "0", "--use_ema", "True", "--record_log_dir", os.path.join(out, "captions"),
        "--multi_aspect_ratio", "1", *extra,  # square crops: the 8 demo images split 4 + 4 as before buckets
    ])
    rank = paddle.distributed.get_rank()
    state = {k: v.numpy() for k, v in trainer.model.stage_c.state_dict().items()}
    np.savez(os.path.join(out, f"params_rank{rank}.npz"), **state)


def launch(out, extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    log = os.path.join(out, "log")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", log,
           os.path.abspath(__file__), str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(open(os.path.join(log, f)).read()[-3000:] for f in sorted(os.listdir(log)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs


def prepare_dp(folder):  # worker arguments of the two_rank_runs job
    return [folder, []]


ZERO1 = ["--sharding", "stage1", "--recompute", "True", "--lr_scheduler_type", "constant", "--save_steps", "2"]


def prepare_zero1_straight(folder):  # worker arguments of the ZeRO-1 launch's jobs
    return [folder, ZERO1 + ["--max_steps", "4"]]


def prepare_zero1_first_half(folder):
    return [folder, ZERO1 + ["--max_steps", "2"]]


@pytest.fixture(scope="module")
def zero1_runs(tmp_path_factory):
    """ZeRO-1 + recompute: 4 straight steps and 2 steps, one launch (tests/two_rank_runs.py); the
    2-step run copied to zero1_2steps as it is, then resumed to 4 by new processes."""
    from two_rank_runs import launch_all

    root = tmp_path_factory.mktemp("zero1")
    here = "test_train_stage_c_distributed."
    launch_all(root, {"straight": (here + "prepare_zero1_straight", here + "worker"),
                      "resumed": (here + "prepare_zero1_first_half", here + "worker")})
    shutil.copytree(root / "resumed", root / "zero1_2steps")
    launch(root / "resumed", ZERO1 + ["--max_steps", "4"])  # resumes from its checkpoint-2
    return root


@pytest.mark.parametrize("run", ["dp", "zero1_recompute"])
def test_two_process_gloo(request, run):
    from ldm.cascade.components import tiny_components

    if run == "dp":
        tmp_path = Path(request.getfixturevalue("two_rank_runs")["stage_c_dp"])
    else:
        tmp_path = request.getfixturevalue("zero1_runs") / "zero1_2steps"
    caps = [open(tmp_path / "captions" / f"rank{r}.txt", encoding="utf-8").read().splitlines() for r in (0, 1)]
    every = sorted(open(os.path.join(DEMO, f), encoding="utf-8").read().strip() for f in os.listdir(DEMO) if f.endswith(".txt"))
    assert len(caps[0]) == len(caps[1]) == 4  # 2 steps x 2 images per rank
    assert not set(caps[0]) & set(caps[1]) and sorted(caps[0] + caps[1]) == every  # disjoint halves of the epoch
    p0, p1 = (np.load(tmp_path / f"params_rank{r}.npz") for r in (0, 1))
    assert sorted(p0.files) == sorted(p1.files) and len(p0.files) > 0
    for k in p0.files:
        assert np.array_equal(p0[k], p1[k]), k
    init = tiny_components().get("stage_c").state_dict()
    assert sum(not np.array_equal(p0[k], init[k].numpy()) for k in p0.files) > len(p0.files) // 2  # it trained
    assert os.path.isfile(tmp_path / "train" / "stage_c.safetensors")
    assert os.path.isfile(tmp_path / "train" / "stage_c_ema.safetensors")


def test_two_process_zero1_resume_is_exact(zero1_runs):
    from ldm.weights import load_state_dict

    tmp_path = zero1_runs
    ck2 = set(os.listdir(tmp_path / "resumed" / "train" / "checkpoint-2"))
    assert {"optimizer.shard00.safetensors", "optimizer.shard01.safetensors", "rng_state_rank0.json",
            "rng_state_rank1.json", "train_c_state_rank1.json"} <= ck2
    assert not [n for n in ck2 if n.endswith((".pdopt", ".pdparams", ".pth"))], ck2
    for r in (0, 1):
        a, b = (np.load(tmp_path / run / f"params_rank{r}.npz") for run in ("straight", "resumed"))
        for k in a.files:
            assert np.array_equal(a[k], b[k]), (r, k)
    for name in ("stage_c_ema.safetensors", "checkpoint-4/optimizer.shard00.safetensors",
                 "checkpoint-4/optimizer.shard01.safetensors"):
        a, b = (load_state_dict(tmp_path / run / "train" / name) for run in ("straight", "resumed"))
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a), name


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from ldm.utils import skip_unused_torch

    skip_unused_torch()  # as every entry point does: the ranks import ppdiffusers
    worker(sys.argv[1], sys.argv[2:])
