"""The training task: one paddle Layer per recipe whose `forward(**batch)` is the training step.

A recipe (Stage C, Stable Diffusion, Stage B, a LoRA run of one of them) subclasses
`TrainingTask`, registers its networks and writes its step; everything the Trainer and the
callbacks of `ldm/train` need lives here, once:

- **Frozen parts** (`add_frozen`): parameters without gradients, kept in eval mode whatever
  `.train()` (or a wrapper that sets `training` on every sublayer) does; checked again before
  every forward through a forward pre-hook.
- **Trained parts** (`add_trained`) and the **trainable selection**: `trainable_parameters()`
  are the parameters of the trained parts with `stop_gradient == False`. `select_trainable(pred)`
  freezes the rest (an adapter-only run: the base network frozen, only the adapter sub-layers
  train). The optimiser, the EMA and the saved weights follow this selection: a part whose
  parameters all train is saved whole in its own format (`write_part` / `read_part`), a part
  that trains only some is saved as `<part>_trainable.safetensors` (those tensors only).
- **EMA**: `ema_parameters()` (the trainable ones), `save_ema` / `load_ema` in the same layout
  (`<part>_ema...`).
- **Per-rank RNG**: `self.rng`, a numpy Generator seeded by (seed, rank, `rng_tag`), for the
  random draws of the step; `train_state()` / `set_train_state()` round-trip it (and whatever a
  subclass adds) through the checkpoint file `state_file.format(rank)`.
- **Pixels**: batches arrive as the `ldm.data` sample schema, uint8 [B, H, W, 3] (what DataLoader
  workers hand over); `pixels(pixel_values)` is the step's first line: float32 [B, 3, H, W] in
  the task's `pixel_normalize` range ("minus_one_one" by default, "zero_one" for the Stable
  Cascade recipes), computed by `ldm.data.transforms.normalize_pixels` where the tensor lives
  (the training device). Every recipe's step, previews and encoder-cache builder call it.
- **Previews**: `log_images(pixel_values=..., **kwargs) -> {tag: uint8 [H, W, 3]}` (none by default);
  `evaluating(ema)` runs the trained parts in eval mode, with the EMA weights when given.
- **Recompute**: `enable_recompute()` turns on activation checkpointing of the trained networks
  (each recipe says how its networks offer it).

As in StableCascade's `train/` (which imports `modules/`), the tasks import the networks, never
the reverse: networks know nothing of tasks, Trainers, datasets or checkpoint files.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from ldm.data.transforms import NORMALIZE_MODES, normalize_pixels
from ldm.utils import get_logger
from ldm.weights import assign_state_dict, load_state_dict, save_safetensors

logger = get_logger("ldm.train.task")

__all__ = ["TrainingTask", "TRAINABLE_SUFFIX"]

TRAINABLE_SUFFIX = "_trainable"  # <part>_trainable[_ema].safetensors: the trained tensors of a partly trained part


def _set_eval(layer: nn.Layer) -> None:
    """Eval mode for `layer` and its sublayers, without switching paddle's global tracer mode
    (which `Layer.eval()` also does, while the trained parts keep training)."""
    for m in (layer, *layer.sublayers()):
        m.training = False


def _keep_frozen_in_eval(task: "TrainingTask", inputs):
    for m in task.frozen:
        if m.training:
            _set_eval(m)


class TrainingTask(nn.Layer):
    """Base Layer of a training recipe; see the module docstring. Subclasses call
    `add_frozen` / `add_trained` in `__init__` and implement `forward` (the step)."""

    state_file = "train_state_rank{}.json"  # per-rank task state inside a checkpoint
    rng_tag = 0  # mixed into the generator seed, so two recipes do not share a stream
    pixel_normalize = "minus_one_one"  # the range the task's image networks take (NORMALIZE_MODES)

    def __init__(self, seed: int = 0, rank: int = 0):
        super().__init__()
        if int(rank) < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if self.pixel_normalize not in NORMALIZE_MODES:
            raise ValueError(f"{type(self).__name__}.pixel_normalize must be one of {NORMALIZE_MODES}, "
                             f"got {self.pixel_normalize!r}")
        self.seed, self.rank = int(seed), int(rank)
        self.rng = np.random.default_rng([self.seed, self.rank, int(self.rng_tag)])
        self._frozen_names: List[str] = []
        self._trained_names: List[str] = []
        self.register_forward_pre_hook(_keep_frozen_in_eval)

    # ------------------------------------------------------------------------------ pixels
    def pixels(self, pixel_values):
        """The images of a batch as the task's networks take them: uint8 [B, H, W, 3] (the
        `ldm.data` schema, collated; a paddle Tensor or a numpy array) -> float32 paddle Tensor
        [B, 3, H, W] in the `pixel_normalize` range, normalised where the tensor lives (the
        training device). A floating-point input is taken as already normalised [B, 3, H, W]
        (a caller that builds its own inputs) and returned as a Tensor unchanged; None stays None."""
        if pixel_values is None:
            return None
        if not isinstance(pixel_values, paddle.Tensor):
            pixel_values = paddle.to_tensor(pixel_values)
        if pixel_values.dtype != paddle.uint8:
            return pixel_values
        return normalize_pixels(pixel_values, self.pixel_normalize)

    # ------------------------------------------------------------------------------ parts
    def add_frozen(self, name: str, layer: Optional[nn.Layer]) -> Optional[nn.Layer]:
        """Register `layer` as sublayer `name`: no gradients, eval mode for good. None is allowed
        (an optional part that is not configured)."""
        self._check_new(name)
        setattr(self, name, layer)
        if layer is not None:
            for p in layer.parameters():
                p.stop_gradient = True
            _set_eval(layer)
            self._frozen_names.append(name)
        return layer

    def add_trained(self, name: str, layer: nn.Layer) -> nn.Layer:
        """Register `layer` as trained part `name`; all its parameters train until
        `select_trainable` says otherwise."""
        if layer is None:
            raise ValueError(f"trained part {name!r} is None")
        self._check_new(name)
        setattr(self, name, layer)
        for p in layer.parameters():
            p.stop_gradient = False
        self._trained_names.append(name)
        return layer

    def _check_new(self, name: str) -> None:
        if not name.isidentifier() or name in self._frozen_names or name in self._trained_names:
            raise ValueError(f"part name {name!r} is not a new identifier")

    @property
    def frozen(self) -> List[nn.Layer]:
        return [m for m in (getattr(self, n) for n in self._frozen_names) if m is not None]

    def trained_parts(self) -> Dict[str, nn.Layer]:
        return {n: getattr(self, n) for n in self._trained_names}

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen:
            _set_eval(m)
        return self

    # ------------------------------------------------------------------------------ trainable selection
    def select_trainable(self, predicate: Callable[[str, paddle.Tensor], bool]) -> int:
        """Only the parameters of the trained parts for which `predicate(name, param)` holds train
        (names as in `trainable_parameters`); returns how many do. An adapter-only run adds its
        adapter sub-layers to a trained part, then selects them."""
        n = 0
        for part, layer in self.trained_parts().items():
            for k, p in layer.named_parameters():
                p.stop_gradient = not predicate(f"{part}.{k}", p)
                n += not p.stop_gradient
        if n == 0:
            raise ValueError("select_trainable: the predicate selects no parameter")
        return n

    def trainable_parameters(self) -> Dict[str, paddle.Tensor]:
        """{"<part>.<name>": parameter} of every trained parameter (stop_gradient False)."""
        return {f"{part}.{k}": p for part, layer in self.trained_parts().items()
                for k, p in layer.named_parameters() if not p.stop_gradient}

    def _fully_trained(self, part: str) -> bool:
        return all(not p.stop_gradient for p in getattr(self, part).parameters())

    def param_groups(self) -> Dict[str, List[Tuple[str, paddle.Tensor]]]:
        """{part: [(name, parameter)]} of the trainable parameters (for `ldm.train.optim`)."""
        groups: Dict[str, List[Tuple[str, paddle.Tensor]]] = {}
        for name, p in self.trainable_parameters().items():
            groups.setdefault(name.split(".", 1)[0], []).append((name, p))
        return groups

    def ema_parameters(self) -> Dict[str, paddle.Tensor]:
        """The parameters an EMA follows: the trainable ones."""
        return self.trainable_parameters()

    def enable_recompute(self) -> None:
        """Activation checkpointing of the trained networks (`--recompute`)."""
        raise NotImplementedError(f"{type(self).__name__} does not support --recompute")

    # ------------------------------------------------------------------------------ weights on disk
    def write_part(self, name: str, folder: str, state: Dict[str, object], ema: bool) -> None:
        """Write the full state of trained part `name` (its EMA when `ema`) into `folder`.
        Default: `<name>[_ema].safetensors`; a recipe overrides it for its own format."""
        save_safetensors(state, os.path.join(folder, f"{name}{'_ema' if ema else ''}.safetensors"))

    def read_part(self, name: str, folder: str, ema: bool):
        """What `write_part` wrote, as `ldm.weights.assign_state_dict` takes it (a file or folder
        path, or a {key: array} mapping), or None if `folder` has none."""
        path = os.path.join(folder, f"{name}{'_ema' if ema else ''}.safetensors")
        return path if os.path.isfile(path) else None

    def _trainable_path(self, name: str, folder: str, ema: bool) -> str:
        return os.path.join(folder, f"{name}{TRAINABLE_SUFFIX}{'_ema' if ema else ''}.safetensors")

    def _part_states(self, values: Optional[Dict[str, object]] = None, ema: bool = False
                     ) -> Iterator[Tuple[str, bool, Dict[str, object]]]:
        """(part, whole, state) per trained part (with `ema`: per part that has EMA parameters):
        the full state dict when the part trains whole, else only its trainable tensors;
        `values` ({"<part>.<name>": tensor}) replace the weights."""
        values = values or {}
        ema_keys = set(self.ema_parameters()) if ema else None
        for part, layer in self.trained_parts().items():
            if ema_keys is not None and not any(k.startswith(part + ".") for k in ema_keys):
                continue
            whole = self._fully_trained(part)
            if whole:
                state = dict(layer.state_dict())
            else:
                state = {k: p for k, p in layer.named_parameters() if not p.stop_gradient}
            yield part, whole, {k: values.get(f"{part}.{k}", v) for k, v in state.items()}

    def save_trained(self, folder: str, only_updated: bool = True) -> None:
        """The trained weights (what a checkpoint and the final output hold)."""
        os.makedirs(folder, exist_ok=True)
        for part, whole, state in self._part_states():
            if whole:
                self.write_part(part, folder, state, ema=False)
            else:
                save_safetensors(state, self._trainable_path(part, folder, ema=False))

    def load_trained(self, folder: str) -> None:
        """Restore what `save_trained` wrote (strict: every tensor of the selection, nothing else)."""
        for part, whole, _ in self._part_states():
            weights = self._read(part, folder, whole, ema=False)
            if weights is None:
                raise FileNotFoundError(f"{folder} has no trained weights of {part!r} "
                                        f"({'the full part' if whole else 'its trainable tensors'})")
            layer = getattr(self, part)
            where = f"{folder} ({part})"
            if whole:
                assign_state_dict(layer, weights, where=where)
            else:  # exactly the trainable tensors; the frozen rest stays as built
                trainable = {k for k, p in layer.named_parameters() if not p.stop_gradient}
                assign_state_dict(layer, weights, where=where, ignore_missing=lambda k: k not in trainable)
        logger.info("restored trained weights from %s", folder)

    def save_ema(self, folder: str, shadow: Dict[str, paddle.Tensor]) -> None:
        """The EMA weights in the layout of `save_trained` (`shadow` keyed like `ema_parameters`)."""
        os.makedirs(folder, exist_ok=True)
        for part, whole, state in self._part_states(shadow, ema=True):
            if whole:
                self.write_part(part, folder, state, ema=True)
            else:
                save_safetensors(state, self._trainable_path(part, folder, ema=True))

    def load_ema(self, folder: str) -> Optional[Dict[str, np.ndarray]]:
        """{"<part>.<name>": array} of the EMA weights in `folder`, or None if it has none."""
        out = {}
        for part, whole, _ in self._part_states(ema=True):
            weights = self._read(part, folder, whole, ema=True)
            if weights is None:
                return None
            state = weights if isinstance(weights, Mapping) else load_state_dict(weights)
            out.update({f"{part}.{k}": v for k, v in state.items()})
        return out

    def _read(self, part, folder, whole, ema):
        if whole:
            return self.read_part(part, folder, ema)
        path = self._trainable_path(part, folder, ema)
        return path if os.path.isfile(path) else None

    # ------------------------------------------------------------------------------ per-rank state
    def train_state(self) -> dict:
        """JSON-able state of the step's own randomness (subclasses add theirs)."""
        return {"rng": self.rng.bit_generator.state}

    def set_train_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    # ------------------------------------------------------------------------------ previews
    default_guidance_scale = 1.0  # of sample_images when the run names none (--eval_guidance_scales)

    def log_images(self, pixel_values: Optional[paddle.Tensor] = None, **kwargs) -> Dict[str, np.ndarray]:
        """{tag: uint8 [H, W, 3]} preview images; none by default."""
        return {}

    def sample_images(self, captions, seed: int, guidance_scale: float, **kwargs) -> np.ndarray:
        """uint8 (N, H, W, 3) images of `captions`, image i from seed + i (the generator signature of
        ldm.eval.generators, used by the training-time evaluation); kwargs: the preview settings."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample images (no sample_images)")

    @contextlib.contextmanager
    def evaluating(self, ema=None):
        """Within the block the trained parts are in eval mode and, when `ema` (an EMA callback,
        or anything with a `shadow` {name: tensor} like `ema_parameters`) has weights, hold them;
        the weights and modes are restored afterwards."""
        shadow = getattr(ema, "shadow", None) or {}
        params = self.ema_parameters()
        modes = {n: m.training for n, m in self.trained_parts().items()}
        backup = {}
        try:
            for m in self.trained_parts().values():
                _set_eval(m)
            for k, v in shadow.items():
                if k in params:
                    p = params[k]
                    backup[k] = p.clone().cpu()  # host copy, one tensor at a time
                    v = v if isinstance(v, paddle.Tensor) else paddle.to_tensor(v)
                    p.set_value(v.astype(p.dtype))
            yield bool(backup)
        finally:
            for k, v in backup.items():
                params[k].set_value(v.to(params[k].place))
            for n, was in modes.items():
                if was:
                    getattr(self, n).train()
