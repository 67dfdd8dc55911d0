"""The README's commands work as written after the set-up command, from any folder (issue 12 item 11).

Every command line of README.md (code blocks and inline code) is collected: the
`.venv/bin/python <script> ...` ones and the `[VAR=value ...] sh train.sh ...` ones. For each
script, `--help` is run by its absolute path from an unrelated folder with the test's Python (the
venv the test command made) and must succeed and list every flag the README passes to it (one
subprocess runs every script in turn as `python <path> --help` would: its own folder first on
sys.path, the repository's top-level modules another script imported forgotten; paddle is imported
once, not once per script);
train.sh must read every variable the README sets and its trainers must accept the flags passed
through. (The commands themselves need downloaded weights or GPUs; the tests that run the offline
ones live next to their features: test_inference.py, test_sd_tiny_recipe.py, test_train_stage_c.py.)
"""
import json
import os
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PY = ".venv/bin/python"


def _readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    commands, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        starts = [m.start() for m in re.finditer(r"`\.venv/bin/python ", line)]
        for s in starts:  # inline code in a paragraph, perhaps wrapped onto the next lines
            text, j = line, i
            while "`" not in text[s + 1:] and j + 1 < len(lines):
                j += 1
                text += " " + lines[j].strip()
            commands.append(text[s + 1:text.index("`", s + 1)])
        if line.startswith(VENV_PY + " ") or re.match(r"^([A-Z_a-z0-9]+=\S+ )*sh train\.sh", line):
            cmd = line
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            commands.append(cmd)
        i += 1
    return [c.split(" #")[0].strip() for c in commands]


def _tokens(cmd):
    return shlex.split(cmd.replace("[", " ").replace("]", " "))


def _flags(tokens):
    return sorted({t.split("=")[0] for t in tokens if t.startswith("--")})


def _lists(help_text, flag):
    return re.search(re.escape(flag) + r"(?![\w-])", help_text) is not None


def _python_commands():
    """(script relative to the repo, flags the README passes to it) for every python command."""
    out = []
    for cmd in _readme_commands():
        if not cmd.startswith(VENV_PY + " "):
            continue
        tokens = _tokens(cmd)[1:]
        if tokens[:1] == ["-u"]:
            tokens = tokens[1:]
        if tokens[:2] == ["-m", "pytest"]:
            continue
        if tokens[:2] == ["-m", "paddle.distributed.launch"]:
            scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
            if not scripts:  # "python -m paddle.distributed.launch --nproc_per_node 2 ...": the launcher's own flags
                continue
            tokens = tokens[scripts[0]:]
        assert tokens and tokens[0].endswith(".py"), cmd
        out.append((tokens[0], _flags(tokens[1:])))
    return out


_HELP_ALL = r"""
import contextlib, io, json, os, runpy, sys, traceback

root, scripts, result_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
kept = (os.path.join(root, "ldm") + os.sep, os.path.join(sys.prefix, ""))  # installed: the package, the venv
base_path, results = list(sys.path[1:]), {}  # sys.path[0] of `python -c` is the working folder: dropped
for script in scripts:
    path = os.path.join(root, script)
    sys.path[:] = [os.path.dirname(path)] + base_path  # what `python <path>` puts first
    sys.argv = [path, "--help"]
    before = set(sys.modules)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    for name in set(sys.modules) - before:  # the repo's top-level modules (config, inference, scripts.*)
        f = getattr(sys.modules[name], "__file__", None) or ""
        if f.startswith(root + os.sep) and not f.startswith(kept):
            del sys.modules[name]
    results[script] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
with open(result_file, "w", encoding="utf-8") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    """{script: its `--help` run (returncode, stdout, stderr)}, run from an unrelated folder."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    scripts = sorted({s for s, _ in _python_commands()} | {"train_stage_c_trainer.py", "scripts/train_stage_b_trainer.py"})
    result_file = str(tmp_path_factory.mktemp("helps") / "helps.json")
    proc = subprocess.run([sys.executable, "-c", _HELP_ALL, ROOT, json.dumps(scripts), result_file], cwd=str(cwd),
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(result_file, encoding="utf-8") as f:
        results = json.load(f)
    assert sorted(results) == scripts
    return {script: SimpleNamespace(**r) for script, r in results.items()}


def test_readme_has_the_commands():
    cmds = _readme_commands()
    scripts = {s for s, _ in _python_commands()}
    assert len(cmds) >= 30, cmds
    assert {"inference.py", "create_pretraining_data.py", "train_txt2img_laion400m_trainer.py",
            "scripts/generate_sd.py", "scripts/extract_unet_weights.py", "scripts/evaluate.py"} <= scripts, scripts
    assert sum(c.startswith("sh train.sh") or " sh train.sh" in c for c in cmds) >= 8
    bare = [c for c in cmds if re.match(r"^python\b", c)]
    assert not bare, bare  # nothing relies on whichever `python` is first on PATH


def test_no_bare_venv_tools():
    """A console script of the venv (visualdl, huggingface-cli, pip, ...) is not on PATH after the
    set-up command: the README calls it as .venv/bin/NAME. (The set-up lines start with python3,
    the interpreter that makes the venv.)"""
    tools = set(os.listdir(os.path.dirname(sys.executable))) - {"python3", "activate"}
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    spans = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    lines = [line for block in spans for line in block.split("\n")]
    lines += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    bare = [line for line in lines if len(line.split()) >= 2 and re.sub(r"^([A-Z_a-z0-9]+=\S+ )*", "", line.strip()).split()[0]
            in tools]
    assert not bare, bare


def test_every_script_runs_help_from_another_folder(helps):
    for script, flags in _python_commands():
        proc = helps[script]
        assert proc.returncode == 0, (script, proc.stdout[-2000:] + proc.stderr[-2000:])
        missing = [f for f in flags if not _lists(proc.stdout, f)]
        assert not missing, (script, missing)


def test_train_sh_commands_use_known_variables_and_flags(helps):
    with open(os.path.join(ROOT, "train.sh"), encoding="utf-8") as f:
        train_sh = f.read()
    for cmd in _readme_commands():
        m = re.match(r"^((?:[A-Z_a-z0-9]+=\S+ )*)sh train\.sh(.*)$", cmd)
        if not m:
            continue
        env = dict(kv.split("=", 1) for kv in m.group(1).split())
        for var in env:
            assert "${" + var in train_sh, (var, cmd)
        trainer = "scripts/train_stage_b_trainer.py" if env.get("STAGE") == "b" else "train_stage_c_trainer.py"
        if env.get("STAGE") == "sd":
            trainer = "train_txt2img_laion400m_trainer.py"
        assert helps[trainer].returncode == 0, helps[trainer].stderr[-2000:]
        missing = [f for f in _flags(_tokens(m.group(2))) if not _lists(helps[trainer].stdout, f)]
        assert not missing, (cmd, missing)
