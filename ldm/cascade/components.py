"""The networks of a Stable Cascade run, built lazily: from the files of a weights folder
(``file_components``), from the offline tiny preset (``ldm.cascade.presets``, random) or from the
shipped demo (``demo_components``: the "demo" presets trained by this project, assets/demo/cascade),
shared between a ModelC and a ModelB of the same settings (``shared_components``).

This is the seam between the sampling code (``ldm.cascade.pipeline``, which only calls
``components.get(name)``) and the weight files: a new way of providing networks (another preset,
networks held in memory by a test) is a new ``Components(builders)``.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import weakref
from typing import Callable, Dict, Optional, Sequence

import paddle

from ldm import clip
from ldm.cascade import loading
from ldm.cascade.pipeline import check_dtype
from ldm.cascade.presets import tiny_builders
from ldm.cascade.settings import DEMO, DEMO_REBUILD, CascadeConfig
from ldm.utils import get_logger, special_file_problem
from ldm.weights import WeightsError

logger = get_logger("ldm.cascade")

COMPONENT_NAMES = ("tokenizer", "text_encoder", "image_encoder", "stage_c", "stage_b", "stage_a",
                   "effnet", "previewer")
WEIGHT_EXTS = (".safetensors", ".pdparams")


# ---------------------------------------------------------------------------- weights on disk
class MissingWeightsError(FileNotFoundError):
    """Raised once, listing every missing file, before anything is loaded."""


def resolve_weight_file(folder: str, name: str) -> Optional[str]:
    """``<folder>/<name>`` if it has an extension, else ``<name>.safetensors`` (preferred) or
    ``<name>.pdparams``; None when absent."""
    base = os.path.join(folder, name)
    if name.endswith(WEIGHT_EXTS):
        return base if os.path.lexists(base) else None
    for ext in WEIGHT_EXTS:  # any kind of file counts as present: resolve_weights refuses special ones
        if os.path.lexists(base + ext):
            return base + ext
    return None


def _file_field(component: str) -> str:
    return {"tokenizer": "clip_text", "text_encoder": "clip_text", "image_encoder": "clip_image"}.get(component, component)


def resolve_weights(cfg: CascadeConfig, components: Sequence[str]) -> Dict[str, str]:
    """Map each needed component to its file or folder; raise ``MissingWeightsError`` naming
    every missing one and the README section that explains how to get them."""
    found, missing, special = {}, [], []
    for comp in components:
        name = getattr(cfg, _file_field(comp))
        if comp in ("tokenizer", "text_encoder", "image_encoder"):
            path = os.path.join(cfg.weights_path, name or "")
            need = ("vocab.json", "merges.txt") if comp == "tokenizer" else ("config.json",)
            absent = [f for f in need if not (name and os.path.lexists(os.path.join(path, f)))]
            special += [os.path.join(path, f) for f in need if name and f not in absent]
            if not absent:
                found[comp] = path
            elif not os.path.isdir(path):
                if f"{path}/" not in [m[1] for m in missing]:
                    missing.append((_file_field(comp), f"{path}/", "a folder with config.json, the weights "
                                    "and, for the text model, the tokenizer files"))
            else:
                missing.append((comp, " and ".join(os.path.join(path, f) for f in absent), ""))
        else:
            path = resolve_weight_file(cfg.weights_path, name)
            if path:
                found[comp] = path
            else:
                alts = name if name.endswith(WEIGHT_EXTS) else f"{name}.safetensors or {name}.pdparams"
                missing.append((comp, os.path.join(cfg.weights_path, alts), ""))
    checked = dict.fromkeys([*special, *found.values()])  # in order, once each; a folder counts
    special = [p for p in (special_file_problem(f, folder=f in found.values()) for f in checked) if p]
    if special:  # a FIFO or device named like a weight file would block the reader (issue 12 item 6)
        raise WeightsError("Stable Cascade weights: not regular files:\n" + "\n".join(f"  - {p}" for p in special))
    if missing:
        lines = [f"  - {comp}: {path}" + (f" ({what})" if what else "") for comp, path, what in missing]
        raise MissingWeightsError(
            f"Stable Cascade weights not found in '{os.path.abspath(cfg.weights_path)}' "
            f"(WEIGHTS_PATH in config.py, the STABLE_CASCADE_WEIGHTS environment variable or "
            f"--weights_path). Missing {len(missing)} file(s):\n" + "\n".join(lines) +
            f"\nSee the README section \"{cfg.readme_section}\" to download the seed's archive or "
            f"convert the official weights. (Or run the demo: `python inference.py --preset demo --caption "
            f"\"a red circle on a blue background\"`, small networks this project trained, shipped in "
            f"assets/demo; `--preset tiny` is a random smoke test.)")
    return found


# ---------------------------------------------------------------------------- components
class Components:
    """Lazily built, cached networks. ``builders[name]()`` returns the network (eval mode);
    ``release(name)`` drops it (low-memory mode frees each stage before the next)."""

    def __init__(self, builders: Dict[str, Callable[[], object]], dtype: str = "float32"):
        unknown = set(builders) - set(COMPONENT_NAMES)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; known: {COMPONENT_NAMES}")
        self.builders = dict(builders)
        self.dtype = dtype
        self._cache: Dict[str, object] = {}

    def has(self, name: str) -> bool:
        return name in self.builders

    def get(self, name: str):
        if name not in self._cache:
            if name not in self.builders:
                raise ValueError(f"component '{name}' is not configured (known: {sorted(self.builders)})")
            logger.info("loading %s", name)
            net = self.builders[name]()
            if hasattr(net, "eval"):
                net.eval()
            self._cache[name] = net
        return self._cache[name]

    def release(self, *names: str) -> None:
        dropped = [n for n in names if self._cache.pop(n, None) is not None]
        if dropped:
            gc.collect()
            if paddle.device.is_compiled_with_cuda():
                paddle.device.cuda.empty_cache()


def file_components(cfg: CascadeConfig, needed: Sequence[str]) -> Components:
    """Components read from ``cfg.weights_path``; checks every needed file up front."""
    dtype = check_dtype(cfg.dtype)
    paths = resolve_weights(cfg, needed)

    def lazy(comp, fn):
        return lambda: fn(paths[comp]) if comp in paths else fn(resolve_weights(cfg, [comp])[comp])

    builders = {
        "tokenizer": lazy("tokenizer", lambda p: clip.load_tokenizer(p, clip.folder_max_length(p))),
        "text_encoder": lazy("text_encoder", lambda p: clip.load_clip_text(p, dtype=dtype)),
        "image_encoder": lazy("image_encoder", lambda p: clip.load_clip_vision(p, dtype=dtype)),
        "stage_c": lazy("stage_c", lambda p: loading.load_stage_c(p, cfg.model_c_version, dtype=dtype)),
        "stage_b": lazy("stage_b", lambda p: loading.load_stage_b(p, cfg.model_b_version, dtype=dtype)),
        "stage_a": lazy("stage_a", lambda p: loading.load_stage_a(p, dtype="float32")),
        "effnet": lazy("effnet", lambda p: loading.load_effnet(p, dtype="float32")),
        "previewer": lazy("previewer", lambda p: loading.load_previewer(p, dtype="float32")),
    }
    return Components(builders, dtype)


# ---------------------------------------------------------------------------- shared components
NEEDED_C = ("tokenizer", "text_encoder", "stage_c", "previewer")
NEEDED_B = ("tokenizer", "text_encoder", "stage_b", "stage_a")
OFFLINE_PRESETS = ("tiny", "demo")
PRESETS = (None, *OFFLINE_PRESETS)
DEMO_NEEDED = ("tokenizer", "text_encoder", "stage_c", "stage_b", "stage_a", "effnet", "previewer")
_SHARED: "weakref.WeakValueDictionary[str, Components]" = weakref.WeakValueDictionary()


def shared_components(cfg: CascadeConfig, preset: Optional[str], needed: Sequence[str]) -> Components:
    """One ``Components`` per (config, preset) while any model uses it, so a ModelC and a ModelB
    built separately (the seed's example) share one CLIP text encoder. Checks ``needed`` files."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    key = f"{preset}|{cfg!r}"
    comps = _SHARED.get(key)
    if comps is None:
        if preset == "tiny":
            comps = tiny_components(check_dtype(cfg.dtype))
        elif preset == "demo":  # a demo config (settings.DEMO, maybe another folder) names its folder
            comps = demo_components(check_dtype(cfg.dtype),
                                    cfg.weights_path if cfg.model_c_version == DEMO.model_c_version else None)
        else:
            comps = file_components(cfg, needed)
        _SHARED[key] = comps
    elif preset is None:
        resolve_weights(cfg, needed)
    return comps


def tiny_components(dtype: str = "float32") -> Components:
    """All eight networks of the offline tiny preset (``ldm.cascade.presets``), built lazily."""
    return Components(tiny_builders(dtype), dtype)


def demo_components(dtype: str = "float32", weights_path: Optional[str] = None,
                    needed: Sequence[str] = DEMO_NEEDED) -> Components:
    """The shipped demo (``settings.DEMO``: the "demo" preset of every network, no image encoder)
    read from ``weights_path`` (default assets/demo/cascade next to the package). Missing files
    raise ``MissingWeightsError`` naming them and the command that rebuilds them."""
    cfg = dataclasses.replace(DEMO, weights_path=weights_path or DEMO.weights_path, dtype=dtype)
    try:
        return file_components(cfg, needed)
    except MissingWeightsError as e:
        listed = str(e).split("\n")[1:-1]
        raise MissingWeightsError(
            f"demo weights not found in '{os.path.abspath(cfg.weights_path)}':\n" + "\n".join(listed) +
            f"\nThey are part of the repository (assets/demo/cascade); `{DEMO_REBUILD}` rebuilds them from scratch "
            f"on a CPU.") from None


def training_components(preset: str, trained: str, trained_file: Optional[str] = None,
                        weights_path: Optional[str] = None) -> Components:
    """The networks of a training run on an offline preset (the trainers' ``--model_version tiny``
    / ``demo``): tiny = all random; demo = the frozen parts from the demo files in ``weights_path``
    (default the shipped folder). The trained network (``trained``: "stage_c" or "stage_b") comes
    from ``trained_file`` (a network of the preset's size) or, without one, is freshly initialised
    from the preset (tiny: its fixed seed; demo: the caller's RNG state, i.e. the run's --seed)."""
    if preset not in OFFLINE_PRESETS:
        raise ValueError(f"preset must be one of {OFFLINE_PRESETS}, got {preset!r}")
    if trained not in ("stage_c", "stage_b"):
        raise ValueError(f"trained must be 'stage_c' or 'stage_b', got {trained!r}")
    load = loading.load_stage_c if trained == "stage_c" else loading.load_stage_b
    if preset == "tiny":
        comps = tiny_components()
    else:
        comps = demo_components(weights_path=weights_path,
                                needed=[n for n in DEMO_NEEDED if n not in ("stage_c", "stage_b")])
        comps.builders[trained] = lambda: load(None, preset)
    if trained_file:
        comps.builders[trained] = lambda: load(trained_file, preset)
    return comps
