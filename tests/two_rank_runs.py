"""The 2-rank runs whose outputs the distributed tests read, made by one launch:

    python -m paddle.distributed.launch --nproc_per_node 2 tests/two_rank_runs.py <root>/jobs.json

Each job is a test module's worker function (its own output folder, its own seed and flags), run in
turn by the same two rank processes (gloo on CPU), so the launcher, paddle's import and the process
group are paid once (about 13 s a launch on 2 cores) instead of once per test. The tests' assertions
stay in their modules (session fixture `two_rank_runs` in conftest.py). Runs that resume in a new
process keep their own launch for that part: test_train_robust's SD run (its uninterrupted run and
its first 2 steps are a job here) and test_train_stage_c_distributed's ZeRO-1 run (whose two first
runs share a launch of their own: sharding cannot follow a plain data-parallel run in one process).
"""
import importlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

# name -> (prepare: module.function of tests/, run in the test process with the job's folder, returning
#          the worker's arguments; worker: module.function the two ranks run with them)
JOBS = {
    "stage_b_full": ("test_stage_b_distributed.prepare_full", "test_stage_b_distributed.worker"),
    "stage_b_lora": ("test_stage_b_distributed.prepare_lora", "test_stage_b_distributed.worker"),
    "stage_c_dp": ("test_train_stage_c_distributed.prepare_dp", "test_train_stage_c_distributed.worker"),
    "stage_c_buckets": ("test_buckets.prepare_two_process", "test_buckets._worker"),
    "sd_dp": ("test_sd_distributed.prepare", "test_sd_distributed.worker"),
    "sd_resume": ("test_train_robust.prepare_sd_resume", "test_train_robust.sd_resume_worker"),
    "eval_online": ("test_eval_online.prepare_two_ranks", "eval_dist_worker.main"),
    "eval_training": ("test_eval_training_distributed.prepare", "test_eval_training_distributed.worker"),
}


def _function(dotted):
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def launch_all(root, jobs_by_name=None):
    """Prepare every job's folder (root/<name>), run them all in one 2-rank launch; {name: folder}.
    `jobs_by_name`: as JOBS (the default)."""
    root = str(root)
    jobs, folders = [], {}
    for name, (prepare, worker) in (jobs_by_name or JOBS).items():
        folder = os.path.join(root, name)
        os.makedirs(folder)
        jobs.append({"name": name, "worker": worker, "args": _function(prepare)(folder)})
        folders[name] = folder
    spec = os.path.join(root, "jobs.json")
    with open(spec, "w", encoding="utf-8") as f:
        json.dump(jobs, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for k in ("FLAG_USE_EMA", "FLAG_RECOMPUTE", "FLAG_XFORMERS"):
        env.pop(k, None)
    log = os.path.join(root, "log")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", log,
           os.path.abspath(__file__), spec]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        logs = "".join(f"--- {f}\n" + open(os.path.join(log, f), errors="replace").read()[-4000:]
                       for f in sorted(os.listdir(log)) if f.startswith("workerlog"))
        raise AssertionError("the 2-rank launch failed:\n" + logs + proc.stderr[-2000:])
    return folders


def main(spec):
    sys.path.insert(0, ROOT)
    with open(spec, encoding="utf-8") as f:
        jobs = json.load(f)
    for job in jobs:
        print(f"two_rank_runs: job {job['name']}", flush=True)
        _function(job["worker"])(*job["args"])


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from ldm.utils import skip_unused_torch

    skip_unused_torch()  # as every entry point does: the ranks import ppdiffusers
    main(sys.argv[1])
