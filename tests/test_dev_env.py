"""The environments the README's two set-up commands build work outside pytest too: `ldm` imports
from any folder (the project is installed, not found through the working directory), and in the
dev venv the reference stack (diffusers -> torchvision beside the CPU torch) imports without
the test suite's own shim."""
import os
import subprocess
import sys


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=300)


def test_ldm_imports_from_any_folder(tmp_path):
    r = _run("import ldm, ldm.cascade.settings, os; print(os.path.dirname(ldm.__file__))", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.samefile(r.stdout.strip().splitlines()[-1], os.path.join(root, "ldm"))


def test_reference_stack_imports_outside_pytest(tmp_path):
    r = _run("import torchvision; from diffusers import UNet2DConditionModel; print('ok')", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "ok"
