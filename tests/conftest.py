"""Shared test setup: repo root on sys.path, quiet CPU threads, the torchvision CPU shim."""
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# torchvision 0.28 has no CPU wheel; its pure-Python models run on CPU torch once the
# meta-registration module (which needs its C++ ops) is stubbed out before the first import.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

# ppdiffusers (utils/load_utils.py) patches globals at import: `np.bool = bool` (numpy.testing's
# scalar comparisons then fail with "'bool' object has no attribute 'any'") and, when torch is
# present, `torch.uint16 = torch.bfloat16`. Import it once up front and undo both, so every test
# sees the real numpy/torch whatever the test order.
import numpy as _np  # noqa: E402

_real_np_bool = _np.bool
try:
    import torch as _torch  # noqa: E402

    _real_torch_uint16 = _torch.uint16
except ImportError:  # torch is a test-only reference; data tests run without it
    _torch = None
import ppdiffusers.utils.load_utils  # noqa: E402,F401

_np.bool = _real_np_bool
if _torch is not None:
    _torch.uint16 = _real_torch_uint16

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def two_rank_runs(tmp_path_factory):
    """{job: folder} of the one 2-rank launch of tests/two_rank_runs.py (the distributed tests that
    only read a run's outputs share it)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from two_rank_runs import launch_all

    return launch_all(tmp_path_factory.mktemp("two_rank"))
