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
