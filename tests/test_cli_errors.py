"""Entry points (issue 12 items 8, 15): a project error is one `error: ...` line on stderr, exit
status 1, no traceback (`--debug` shows it); runs open without third-party warning spam
(`--verbose` keeps it). Each case runs the script as a user would, in a subprocess (a `--debug`
run, whose error run_main lets through, in this process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ldm.utils import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("ccache", "distutils", "OMP_NUM_THREADS", "DEBUG")


def _run(args, cwd, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="2", **(env_extra or {}))  # > 1: paddle's notice would print
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [i for i, ln in enumerate(proc.stderr.splitlines()) if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return "\n".join(proc.stderr.splitlines()[errors[0]:])  # the message (some list several files)


def test_run_main_unit(capsys, monkeypatch):
    monkeypatch.setattr("ldm.utils._quieted", True)  # keep this test process's warning filters as they are
    def bad(argv):
        assert argv == ["--x"]
        raise FileNotFoundError("no such thing")

    assert run_main(bad, ["--x"]) == 1
    assert capsys.readouterr().err == "error: no such thing\n"
    with pytest.raises(FileNotFoundError):
        run_main(bad, ["--x", "--debug"])
    assert run_main(lambda argv: 3, []) == 3 and run_main(lambda argv: {"a": 1}, []) == 0
    with pytest.raises(RuntimeError):  # not a project error: a bug keeps its traceback
        run_main(lambda argv: (_ for _ in ()).throw(RuntimeError("bug")), [])


def test_extract_unet_weights_bad_checkpoint(tmp_path, monkeypatch):
    script = os.path.join(ROOT, "scripts", "extract_unet_weights.py")
    proc = _run([script, "--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "o.safetensors")], tmp_path)
    assert "is not a folder" in _one_error_line(proc)
    # --debug: the error is not caught (the interpreter prints its traceback); in this process
    from scripts.extract_unet_weights import main

    monkeypatch.setattr("ldm.utils._quieted", True)  # keep this test process's warning filters as they are
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        run_main(main, ["--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "o.safetensors"), "--debug"])


def test_generate_sd_missing_folder(tmp_path):
    proc = _run([os.path.join(ROOT, "scripts", "generate_sd.py"), "--pretrained_model_name_or_path",
                 str(tmp_path / "none"), "--prompt", "x"], tmp_path)
    assert "none" in _one_error_line(proc)


def test_create_pretraining_data_bad_input(tmp_path):
    proc = _run([os.path.join(ROOT, "create_pretraining_data.py"), "--input_path", "/dev/zero",
                 "--output_path", str(tmp_path / "out")], tmp_path)
    assert "/dev/zero is a device" in _one_error_line(proc)
    proc = _run([os.path.join(ROOT, "create_pretraining_data.py"), "--input_path", str(tmp_path / "none.jsonl"),
                 "--output_path", str(tmp_path / "out")], tmp_path)
    assert "does not exist" in _one_error_line(proc)


def test_inference_special_weight_file(tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    os.mkfifo(weights / "stage_c_lite.safetensors")
    proc = _run([os.path.join(ROOT, "inference.py"), "--weights_path", str(weights)], tmp_path)
    assert "is a FIFO" in _one_error_line(proc)


def test_check_data_listing_with_dev_zero(tmp_path):
    listing = tmp_path / "x.filelist"
    listing.write_text("/dev/zero\n")
    proc = _run([os.path.join(ROOT, "scripts", "check_data.py"), "--file_list", str(listing)], tmp_path, timeout=120)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr  # check_data's own status for unusable data
    assert "x.filelist:1: listed /dev/zero is a device" in proc.stderr
    assert json.loads(proc.stdout)["valid"] == 0


def test_inference_tiny_is_quiet(tmp_path):
    few_steps = ["--steps_c", "2", "--steps_b", "2"]  # the start-up output is what is checked, not the images
    proc = _run([os.path.join(ROOT, "inference.py"), "--preset", "tiny", "--no_progress", "--output_dir",
                 str(tmp_path), *few_steps], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert not [ln for ln in lines if any(n in ln for n in NOISE)], proc.stderr
    assert len(lines) < 15, proc.stderr
    assert any("random weights" in ln for ln in lines)  # the project's own warning stays
    verbose = _run([os.path.join(ROOT, "inference.py"), "--preset", "tiny", "--no_progress", "--output_dir",
                    str(tmp_path), *few_steps, "--verbose"], tmp_path)
    assert verbose.returncode == 0 and "ccache" in verbose.stderr


def test_stage_c_training_step_is_quiet(tmp_path):
    proc = _run([os.path.join(ROOT, "train_stage_c_trainer.py"), "--do_train", "--dataset_path",
                 os.path.join(ROOT, "assets", "demo_dataset"), "--output_dir", str(tmp_path / "out"),
                 "--model_version", "tiny", "--resolution", "64", "--max_steps", "1",
                 "--per_device_train_batch_size", "1", "--report_to", "none"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [ln for ln in proc.stderr.splitlines() if any(n in ln for n in NOISE)]
    assert not noisy, "\n".join(noisy[:20])


def test_sd_training_step_is_quiet(tmp_path):
    from sd_tiny import build_tiny_sd, write_images_jsonl

    import create_pretraining_data as prep

    build_tiny_sd(tmp_path / "m")
    jsonl = write_images_jsonl(str(tmp_path / "img"), n=4)
    assert prep.main(["--input_path", jsonl, "--output_path", str(tmp_path / "data"), "--num_workers", "0"]) == 0
    proc = _run([os.path.join(ROOT, "train_txt2img_laion400m_trainer.py"), "--do_train", "--output_dir",
                 str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--max_steps", "1", "--resolution", "16",
                 "--dataloader_num_workers", "0", "--pretrained_model_name_or_path", str(tmp_path / "m"),
                 "--unet_name_or_path", str(tmp_path / "m" / "unet_config.json"), "--file_list",
                 str(tmp_path / "data" / "filelist" / "custom_dataset.filelist.list"), "--model_max_length", "16",
                 "--num_inference_steps", "2", "--image_logging_steps", "1000", "--report_to", "none"],
                tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert not [ln for ln in lines if any(n in ln for n in NOISE)], proc.stderr
    assert len(lines) < 40, proc.stderr  # was ~170 (139 DEBUG lines of arguments)


_TORCH_PROBE = r"""
import json, os, sys
sys.argv = ["probe"] + sys.argv[1:]
from ldm.utils import quiet_third_party
quiet_third_party()
import ppdiffusers.transformers  # noqa: F401  (what inference.py / generate_sd.py import)
print(json.dumps({"torch": "torch" in sys.modules, "USE_TORCH": os.environ.get("USE_TORCH")}))
"""


def test_entry_points_skip_torch_a_run_does_not_use(tmp_path):
    """A real entry-point start: ppdiffusers (and HF datasets under paddlenlp) no longer import
    torch (~3 s on 2 cores) and say nothing about it."""
    pytest.importorskip("torch")  # the dev venv has it; without torch there is nothing to skip
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    proc = subprocess.run([sys.executable, "-c", _TORCH_PROBE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"torch": False, "USE_TORCH": "0"}, proc.stdout
    assert "Disabling PyTorch" not in proc.stderr, proc.stderr  # HF datasets' INFO line is filtered


@pytest.mark.parametrize("argv, env, installed, expected", [
    ([], {}, True, "0"),
    (["--allow_pickle_weights"], {}, True, None),  # ppdiffusers' from_diffusers pickle path needs torch
    (["--backend", "torch"], {}, True, None),  # make_tiny_sd.py's diffusers/transformers writer
    (["--backend=torch"], {}, True, None),
    (["--caption", "a torch"], {}, True, "0"),  # a token, not a substring
    ([], {"USE_TORCH": "1"}, True, "1"),  # the user's own setting wins
    ([], {}, False, None),  # torch not installed: nothing to skip, nothing set
])
def test_torch_is_kept_for_the_runs_that_use_it(monkeypatch, argv, env, installed, expected):
    import importlib.util

    from ldm import utils

    # set, then delete: monkeypatch records nothing for deleting an absent variable, and the value
    # the function sets would leak into this process (ppdiffusers would then refuse torch later)
    monkeypatch.setenv("USE_TORCH", "unset-by-this-test")
    monkeypatch.delenv("USE_TORCH")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "torch" else real_find_spec(name, *a))
    utils.skip_unused_torch()
    assert os.environ.get("USE_TORCH") == expected
