"""Issue 12 (training side): nothing lost, nothing hung.

- item 1: a data set without a valid record stops the DataLoader with its LaionDataError within
  seconds for 0, 1 and 2 workers (paddle reads an IterableDataset in a thread, which died and left
  the main loop waiting forever with 0 workers); the SD script prints one `error:` line, exit 1;
- item 2: re-running a finished run changes nothing (both trainers); without the final marker
  (killed during the final save) the final files are written again from the last checkpoint;
- item 3: SD resume continues the LAION stream at its exact position: killed + resumed == straight,
  bit for bit (workers 0 and 2 here; 2 ranks in test_sd_resume_two_ranks, slow);
- item 4: a rank exits when its launcher dies; a live run's --output_dir is locked;
- item 9: a corrupt trainer_state.json is skipped on auto-resume (warning naming it), an error
  naming it when given explicitly;
- item 10: `.tmp` files of a killed save are removed when that checkpoint is written again;
- item 14: data_wait_fraction counts data waiting only (<= 1), previews are cheap by default.
"""
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from laion_fixtures import make_parts, write_filelist  # noqa: E402


# ------------------------------------------------------------------------------------------ helpers
class _Task:
    """A tiny TrainingTask class (built lazily: ldm.train imports paddlenlp)."""

    @staticmethod
    def make():
        from ldm.train.task import TrainingTask

        class Task(TrainingTask):
            def __init__(self):
                super().__init__()
                self.add_trained("net", paddle.nn.Linear(1, 1))

            def forward(self, pixel_values, caption):
                return self.net(pixel_values.mean().reshape([1, 1])).sum()

        return Task()


def _trainer(tmp_path, ds, workers=0, **kw):
    from paddlenlp.trainer import TrainingArguments

    from ldm.train.trainer import DiffusionTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                             dataloader_num_workers=workers, seed=1, report_to="none", **kw)
    return DiffusionTrainer(model=_Task.make(), args=args, train_dataset=ds)


def _capture(*names):
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    for name in names:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    return records, lambda: [logging.getLogger(n).removeHandler(handler) for n in names]


def _snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (os.stat(p).st_mtime_ns, hashlib.sha1(fh.read()).hexdigest())
    return out


# ------------------------------------------------------------------------------------------ item 1
def _drain(loader, workers, timeout=30):
    """Iterate `loader` to its end; {"error": the exception it raised}. With 0 workers it hung:
    consume in a thread the test can give up on; worker processes need the main thread (signal
    handlers), where they raised paddle's unrelated SystemError."""
    result = {}

    def consume():
        try:
            for _ in loader:
                pass
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    if workers == 0:
        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        thread.join(timeout=timeout)
        assert not thread.is_alive(), f"the loader hangs ({workers} workers)"
    else:
        consume()
    return result


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("bad", ["empty_part", "random_bytes"])
def test_no_valid_record_stops_the_loader(tmp_path, workers, bad):
    from ldm.data import DatasetSpec, build_dataset
    from ldm.data.laion import LaionDataError

    part = tmp_path / "bad.part"
    part.write_bytes(b"" if bad == "empty_part" else np.random.default_rng(0).bytes(4000))
    listing = write_filelist(tmp_path / "x.filelist", [str(part)])
    ds = build_dataset(DatasetSpec("laion", listing, resolution=8, options={"infinite": True}), rank=0, world_size=1)
    t0 = time.time()
    result = _drain(_trainer(tmp_path, ds, workers).get_train_dataloader(), workers)
    assert isinstance(result.get("error"), LaionDataError), result
    assert "bad.part" in str(result["error"]) or "x.filelist" in str(result["error"])
    assert time.time() - t0 < 30


class _RaisingItems(paddle.io.Dataset):
    """A map-style data set whose items (or their collation) fail: a bug in a data set or collator."""

    def __init__(self, where):
        self.where = where

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if self.where == "item":
            raise RuntimeError("item 3 is broken")
        pixels = np.zeros((4, 4, 3), np.uint8)
        return {"pixel_values": pixels} if i == 3 else {"pixel_values": pixels, "caption": "a caption"}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("where", ["item", "collate"])
def test_a_failing_item_or_collation_stops_the_loader(tmp_path, workers, where):
    """It hung with 0 workers (paddle's loader thread died with the error) for map-style data sets
    and for collation errors of streams too (a sample without its caption here)."""
    result = _drain(_trainer(tmp_path, _RaisingItems(where), workers).get_train_dataloader(), workers)
    assert result.get("error") is not None, result
    assert ("item 3 is broken" if where == "item" else "has keys ['pixel_values']") in str(result["error"]), \
        result["error"]


@pytest.mark.slow
def test_sd_script_without_valid_record_prints_one_error_line(sd_env):
    bad = sd_env / "random.part"
    bad.write_bytes(np.random.default_rng(1).bytes(4000))
    t0 = time.time()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train_txt2img_laion400m_trainer.py"),
                          *_sd_argv(sd_env, sd_env / "o_bad", 2, file_list=bad)],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "gave no valid sample" in errors[0], res.stderr[-3000:]
    assert time.time() - t0 < 90


# ------------------------------------------------------------------------------------------ SD runs
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("FLAG_USE_EMA", "FLAG_RECOMPUTE", "FLAG_XFORMERS"):
        env.pop(k, None)
    return env


def _make_sd_env(root):
    """Tiny SD components (root/m) and 12 records in LAION part files of 4 (root/data)."""
    import create_pretraining_data as prep
    from sd_tiny import build_tiny_sd, write_images_jsonl

    build_tiny_sd(root / "m")
    jsonl = write_images_jsonl(str(root / "img"), n=12)
    assert prep.main(["--input_path", jsonl, "--output_path", str(root / "data"), "--per_part_file_num", "4",
                      "--num_workers", "0"]) == 0
    return root


@pytest.fixture(scope="module")
def sd_env(tmp_path_factory):
    return _make_sd_env(tmp_path_factory.mktemp("sd"))


def _sd_argv(root, out, max_steps, workers=0, file_list=None, *extra):
    file_list = file_list or root / "data" / "filelist" / "custom_dataset.filelist.list"
    return ["--do_train", "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--max_steps", str(max_steps), "--lr_scheduler_type", "constant", "--image_logging_steps", "0",
            "--logging_steps", "1", "--resolution", "16", "--save_steps", "2", "--seed", "23",
            "--dataloader_num_workers", str(workers), "--pretrained_model_name_or_path", str(root / "m"),
            "--unet_name_or_path", str(root / "m" / "unet_config.json"), "--file_list", str(file_list),
            "--model_max_length", "16", "--disable_tqdm", "True", "--report_to", "none", *extra]


def _sd_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sd_train_script", os.path.join(ROOT, "train_txt2img_laion400m_trainer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _unet(folder, part="unet"):
    from ldm.weights import load_state_dict

    return load_state_dict(os.path.join(str(folder), part, "diffusion_paddle_model.safetensors"))


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------------------ item 2
def test_sd_finished_run_is_left_as_is(sd_env, monkeypatch):
    monkeypatch.setattr(os, "environ", _env())
    main, out = _sd_main(), sd_env / "o_done"
    argv = _sd_argv(sd_env, out, 2, 0, None, "--use_ema", "True", "--ema_decay", "0.5")
    assert main(argv).state.global_step == 2
    assert json.loads((out / "training_complete.json").read_text()) == {"global_step": 2}
    before = _snapshot(out)
    records, undo = _capture("ldm.train.trainer")
    try:
        trainer = main(argv)
    finally:
        undo()
    assert trainer.state.global_step == 2
    assert _snapshot(out) == before  # nothing rewritten, no step 3
    assert any("training already finished" in m and "nothing to do" in m for m in records), records

    # killed during the final save: no final marker, the final weights half written
    os.remove(out / "training_complete.json")
    (out / "unet" / "diffusion_paddle_model.safetensors").write_bytes(b"partial")
    os.remove(out / "unet_ema" / "diffusion_paddle_model.safetensors")
    trainer = main(argv)
    assert trainer.state.global_step == 2
    _assert_same(_unet(out), _unet(out / "checkpoint-2"))
    ema = _unet(out, "unet_ema")
    _assert_same(ema, _unet(out / "checkpoint-2", "unet_ema"))
    assert any(np.abs(ema[k] - _unet(out)[k]).max() > 0 for k in ema)  # the average, not the weights
    assert json.loads((out / "training_complete.json").read_text()) == {"global_step": 2}
    assert not (out / "checkpoint-3").exists()


def test_stage_c_finished_run_is_left_as_is(tmp_path):
    from test_train_stage_c import script, tiny_argv

    argv = tiny_argv(tmp_path / "c", "--max_steps", "2", "--save_steps", "2")
    assert script.main(argv).state.global_step == 2
    before = _snapshot(tmp_path / "c")
    assert script.main(argv).state.global_step == 2
    assert _snapshot(tmp_path / "c") == before


def test_finished_run_without_a_last_checkpoint_is_left_as_is(tmp_path):
    """The seed's train.sh saves every 5000 steps and stops at 1000: no checkpoint at --max_steps.
    Re-running it retrained from scratch and rewrote the final files; the final marker says the
    run is finished. --overwrite_output_dir still trains again."""
    from test_train_stage_c import script, tiny_argv

    argv = tiny_argv(tmp_path / "c", "--max_steps", "2", "--save_steps", "100")
    assert script.main(argv).state.global_step == 2
    assert not [d for d in os.listdir(tmp_path / "c") if d.startswith("checkpoint-")]
    before = _snapshot(tmp_path / "c")
    assert script.main(argv).state.global_step == 2
    assert _snapshot(tmp_path / "c") == before
    assert script.main(argv + ["--overwrite_output_dir", "True"]).state.global_step == 2
    assert _snapshot(tmp_path / "c") != before  # trained and written again


# ------------------------------------------------------------------------------------------ items 3, 10
@pytest.mark.parametrize("workers", [0, 2])
def test_sd_resume_replays_the_stream_exactly(sd_env, monkeypatch, workers):
    monkeypatch.setattr(os, "environ", _env())
    main = _sd_main()
    straight, resumed = sd_env / f"o_straight{workers}", sd_env / f"o_resumed{workers}"
    records = sd_env / f"records{workers}"
    # 3 steps x batch 2 = 6 records before the stop, 12 records in all (a pass boundary is crossed)
    main(_sd_argv(sd_env, straight, 6, workers, None, "--save_steps", "3", "--record_log_dir", str(records / "a")))
    main(_sd_argv(sd_env, resumed, 3, workers, None, "--save_steps", "3", "--record_log_dir", str(records / "b")))
    # a save of step 6 killed earlier: its leftovers must go when checkpoint-6 is written again
    stale = resumed / "checkpoint-6" / "unet"
    os.makedirs(stale)
    (stale / ".diffusion_paddle_model.safetensors.x1y2.tmp").write_bytes(b"half")
    (resumed / "checkpoint-6" / ".optimizer.safetensors.abcd.tmp").write_bytes(b"half")
    trainer = main(_sd_argv(sd_env, resumed, 6, workers, None, "--save_steps", "3",
                            "--record_log_dir", str(records / "b")))
    assert trainer.state.global_step == 6
    seen_a = (records / "a" / "rank0.txt").read_text().splitlines()
    seen_b = (records / "b" / "rank0.txt").read_text().splitlines()
    assert seen_a == seen_b and len(seen_a) == 12
    _assert_same(_unet(straight), _unet(resumed))
    _assert_same(_unet(straight / "checkpoint-6"), _unet(resumed / "checkpoint-6"))
    leftovers = [f for _, _, fs in os.walk(resumed) for f in fs if f.endswith(".tmp")]
    assert leftovers == []


def _two_rank_argv(root, out, max_steps):
    return _sd_argv(root, out, max_steps, 0, None, "--save_steps", "2", "--record_log_dir", str(out) + "_rec")


def prepare_sd_resume(folder):  # the two_rank_runs job of test_sd_resume_two_ranks
    _make_sd_env(Path(folder))
    return [folder]


def sd_resume_worker(folder):
    """The uninterrupted 4 steps, and the run to resume stopped at 2 (one rank of the shared launch)."""
    from sd_dist_worker import run

    run(_two_rank_argv(Path(folder), Path(folder) / "d_straight", 4))
    run(_two_rank_argv(Path(folder), Path(folder) / "d_resumed", 2))


@pytest.mark.slow
def test_sd_resume_two_ranks(two_rank_runs):
    """4 steps straight and the first 2 ran in the shared launch (tests/two_rank_runs.py); the
    resume to 4 runs here in new processes."""
    sd_env = Path(two_rank_runs["sd_resume"])
    straight, resumed, logs = sd_env / "d_straight", sd_env / "d_resumed", sd_env / "l3"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(logs),
           os.path.join(ROOT, "tests", "sd_dist_worker.py"), *_two_rank_argv(sd_env, resumed, 4)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=str(sd_env))
    text = "".join(f.read_text()[-2000:] for f in sorted(logs.glob("workerlog.*")))
    assert res.returncode == 0, text + res.stderr[-2000:]
    assert (resumed / "checkpoint-2" / "checkpoint_complete.json").is_file()
    for rank in (0, 1):
        a = (sd_env / "d_straight_rec" / f"rank{rank}.txt").read_text().splitlines()
        b = (sd_env / "d_resumed_rec" / f"rank{rank}.txt").read_text().splitlines()
        assert a == b and len(a) == 8
        wa, wb = np.load(straight / f"final_rank{rank}.npz"), np.load(resumed / f"final_rank{rank}.npz")
        for k in wa.files:
            np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


# ------------------------------------------------------------------------------------------ item 4
def test_process_exits_when_its_parent_is_killed(tmp_path):
    pidfile = tmp_path / "child.pid"
    child = ("import os, sys, time; sys.path.insert(0, %r); from ldm.utils import exit_with_parent; "
             "exit_with_parent(poll_seconds=0.2); open(%r, 'w').write(str(os.getpid())); time.sleep(60)"
             % (ROOT, str(pidfile)))
    parent = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', %r]); time.sleep(60)" % child)
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.time()
        while time.time() - t0 < 10:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the child outlived its killed parent by 10 s")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_output_dir_lock(tmp_path):
    import socket

    from ldm.train.checkpoint import LOCK_FILE, OutputDirLock, OutputDirLockedError

    out = tmp_path / "out"
    with OutputDirLock(str(out)):
        held = json.loads((out / LOCK_FILE).read_text())
        assert held == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(OutputDirLockedError, match=f"pid {os.getpid()} on host"):
            OutputDirLock(str(out)).acquire()
    assert not (out / LOCK_FILE).exists()
    # a live process of this host holds it: refused; a dead one: taken over; another host: refused
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(OutputDirLockedError, match=str(out)):
            OutputDirLock(str(out)).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputDirLock(str(out)):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(OutputDirLockedError, match="elsewhere"):
        OutputDirLock(str(out)).acquire()


def test_second_run_into_a_locked_output_dir_refuses(tmp_path):
    import socket

    from ldm.train.checkpoint import LOCK_FILE, OutputDirLockedError
    from test_train_stage_c import script, tiny_argv

    out = tmp_path / "c"
    os.makedirs(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(OutputDirLockedError):
            script.main(tiny_argv(out, "--max_steps", "1", "--save_steps", "1"))
        assert not (out / "checkpoint-1").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------------ items 9, 10
def _fake_checkpoint(out, step, state_text):
    ckpt = out / f"checkpoint-{step}"
    os.makedirs(ckpt)
    (ckpt / "trainer_state.json").write_text(state_text)
    (ckpt / "checkpoint_complete.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def test_corrupt_trainer_state_is_named(tmp_path):
    from ldm.train.checkpoint import checkpoint_global_step, resolve_resume

    out = tmp_path / "out"
    good = _fake_checkpoint(out, 2, json.dumps({"global_step": 2}))
    bad = _fake_checkpoint(out, 4, '{"global_step": 4,')
    records, undo = _capture("ldm.train.checkpoint")
    try:
        assert resolve_resume(str(out), None) == str(good)
    finally:
        undo()
    assert any("skipping checkpoint" in m and str(bad) in m for m in records), records
    with pytest.raises(ValueError, match="trainer_state.json: not a readable trainer state"):
        checkpoint_global_step(resolve_resume(str(out), str(bad)))


def test_marker_callback_removes_temp_files_of_a_killed_save(tmp_path):
    from types import SimpleNamespace

    from ldm.train.checkpoint import CheckpointMarkerCallback, is_complete

    out = tmp_path / "out"
    ckpt = out / "checkpoint-3"
    os.makedirs(ckpt / "unet")
    (ckpt / "unet" / ".w.safetensors.abc.tmp").write_bytes(b"x")
    (ckpt / ".scheduler.json.def.tmp").write_bytes(b"x")
    (ckpt / "keep.json").write_text("{}")
    args = SimpleNamespace(should_save=True, output_dir=str(out), save_total_limit=None)
    CheckpointMarkerCallback().on_save(args, SimpleNamespace(global_step=3), None)
    assert sorted(os.listdir(ckpt)) == ["checkpoint_complete.json", "keep.json", "unet"]
    assert os.listdir(ckpt / "unet") == [] and is_complete(str(ckpt))


# ------------------------------------------------------------------------------------------ item 14
def test_data_wait_fraction_counts_data_waiting_only(tmp_path):
    from types import SimpleNamespace

    from ldm.train.callbacks import TimingCallback

    class Slow(paddle.io.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            time.sleep(0.01)
            return {"pixel_values": np.zeros((3, 2, 2), np.float32), "caption": str(i)}

    loader = _trainer(tmp_path, Slow()).get_train_dataloader()
    timing, args, state = TimingCallback(2), SimpleNamespace(logging_steps=1), SimpleNamespace(global_step=0)
    timing.on_train_begin(args, state, None, train_dataloader=loader)
    fractions = []
    for _ in loader:
        timing.on_load_data_end(args, state, None, train_dataloader=loader)
        time.sleep(0.02)  # the step
        timing.on_step_end(args, state, None)
        time.sleep(0.2)  # a preview / checkpoint save after the step, before the log
        fractions.append(timing.pop_logs()["data_wait_fraction"])
    assert len(fractions) == 4 and max(fractions) <= 1.0, fractions
    assert np.mean(fractions[1:]) < 0.5, fractions


def test_sd_previews_are_cheap_by_default():
    from ldm.train.sd import DEFAULT_VALIDATION_PROMPTS, parse_sd_args

    m, _, t = parse_sd_args(["--output_dir", "x"])
    assert m.num_inference_steps <= 20 and len(DEFAULT_VALIDATION_PROMPTS) <= 2
    assert not t.ignore_data_skip  # resume continues the stream exactly


@pytest.mark.slow
def test_ranks_exit_when_the_launcher_is_killed(sd_env):
    out, logs = sd_env / "orphans", sd_env / "orphan_logs"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(logs),
           os.path.join(ROOT, "train_txt2img_laion400m_trainer.py"), *_sd_argv(sd_env, out, 100000),
           "--save_steps", "100000"]
    launcher = subprocess.Popen(cmd, env=_env(), cwd=str(sd_env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        t0 = time.time()
        while time.time() - t0 < 180:  # until rank 0 trains
            log = logs / "workerlog.0"
            if log.exists() and "global_step" in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        ranks = [int(p) for p in subprocess.run(["ps", "--ppid", str(launcher.pid), "-o", "pid="],
                                                capture_output=True, text=True).stdout.split()]
        assert len(ranks) == 2, ranks
        launcher.kill()
        launcher.wait()
        t0 = time.time()
        while time.time() - t0 < 15 and any(_alive(p) for p in ranks):
            time.sleep(0.2)
        assert not any(_alive(p) for p in ranks), "ranks outlived their killed launcher by 15 s"
    finally:
        for p in ranks:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its new parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_stage_c_script_error_is_one_line(tmp_path, monkeypatch):
    from test_train_stage_c import tiny_argv

    argv = tiny_argv(tmp_path / "c", "--max_steps", "1")
    argv[argv.index("--dataset_path") + 1] = str(tmp_path / "no_such_folder")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train_stage_c_trainer.py"), *argv],
                         capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "no_such_folder" in res.stderr, res.stderr[-3000:]
    assert [line for line in res.stderr.splitlines() if line.startswith("error: ")], res.stderr[-3000:]
    # --debug: the error is not caught, so the interpreter prints its traceback (in this process:
    # run_main lets it through; the script's `raise SystemExit(run_main(main))` is the line above's)
    from ldm.utils import _PROJECT_ERRORS, run_main
    from test_train_stage_c import script

    monkeypatch.setattr("ldm.utils._quieted", True)  # keep this test process's warning filters as they are
    with pytest.raises(_PROJECT_ERRORS, match="no_such_folder"):
        run_main(script.main, [*argv, "--debug"])
