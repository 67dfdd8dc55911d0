"""Task-agnostic Trainer callbacks: EMA, image logging to VisualDL, timing and gradient norm.

They use only the `ldm.train.task.TrainingTask` API:
- `ema_parameters() -> {name: Parameter}` (EMACallback), `save_ema(checkpoint_dir, shadow)` /
  `load_ema(checkpoint_dir) -> {name: ndarray} | None` (a model without them gets
  `ema.safetensors` in the checkpoint, keyed by the names above);
- `log_images(pixel_values=..., **kwargs) -> {tag: uint8 (H, W, 3)}` (ImageLoggingCallback);
- `sample_images(captions, seed, guidance_scale, **kwargs) -> uint8 (N, H, W, 3)` and
  `evaluating(ema)` (EvaluationCallback: FID and CLIP score through ldm.eval.online).
The checkpoint callbacks (training state, completeness marker) are in `ldm.train.checkpoint`;
`DiffusionTrainer` installs them itself.

Extra scalars reach VisualDL through `pop_logs()`: `ldm.train.trainer.DiffusionTrainer.log` merges
them into the Trainer's own log dict, so they land next to loss and learning_rate.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

import numpy as np
import paddle
from paddlenlp.trainer import TrainerCallback

from ldm.train.checkpoint import step_checkpoint_dir
from ldm.utils import get_logger
from ldm.weights import load_state_dict, save_safetensors

logger = get_logger("ldm.train.callbacks")

__all__ = ["EMACallback", "ImageLoggingCallback", "EvaluationCallback", "TimingCallback", "EMA_FILE"]

EMA_FILE = "ema.safetensors"


class EMACallback(TrainerCallback):
    """Exponential moving average of `model.ema_parameters()`, updated after EVERY optimiser step.

    shadow <- decay * shadow + (1 - decay) * param. Saved into each checkpoint (on_save) and
    restored at train start when resuming (args.resume_from_checkpoint names the checkpoint).
    """

    def __init__(self, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: Dict[str, paddle.Tensor] = {}
        self.num_updates = 0

    def _params(self, model):
        if not hasattr(model, "ema_parameters"):
            raise TypeError(f"{type(model).__name__} has no ema_parameters(): EMACallback needs it")
        return model.ema_parameters()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = self._params(model)
        # float32 shadow even when the weights are fp16/bf16 (AMP O2): with decay 0.9999 the
        # per-step change is ~1e-4 of the difference, below half precision's resolution
        self.shadow = {k: p.detach().astype("float32").clone() for k, p in params.items()}
        resume = getattr(args, "resume_from_checkpoint", None)
        if state.global_step > 0 and resume and os.path.isdir(str(resume)):
            loaded = self.load(model, str(resume))
            if loaded is None:
                logger.warning("no EMA weights in %s: EMA restarts from the current weights", resume)
            else:
                logger.info("EMA restored from %s (%d tensors)", resume, len(loaded))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        w = 1.0 - self.decay
        with paddle.no_grad():
            for k, p in self._params(model).items():  # in place: shadow = decay * shadow + w * param
                self.shadow[k].scale_(self.decay).add_(p.detach().astype("float32") * w)
        self.num_updates += 1

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            self.save(model, step_checkpoint_dir(args, state))

    def restore(self, model, folder: str) -> Optional[Dict[str, np.ndarray]]:
        """Shadow = the EMA weights saved in `folder` (the current weights where there are none)."""
        self.shadow = {k: p.detach().astype("float32").clone() for k, p in self._params(model).items()}
        loaded = self.load(model, folder)
        if loaded is None:
            logger.warning("no EMA weights in %s: the EMA files get the current weights", folder)
        return loaded

    def save(self, model, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        if hasattr(model, "save_ema"):
            model.save_ema(folder, self.shadow)
        else:
            save_safetensors({k: v.numpy() for k, v in self.shadow.items()}, os.path.join(folder, EMA_FILE))

    def load(self, model, folder: str) -> Optional[Dict[str, np.ndarray]]:
        if hasattr(model, "load_ema"):
            state = model.load_ema(folder)
        else:
            f = os.path.join(folder, EMA_FILE)
            state = load_state_dict(f) if os.path.isfile(f) else None
        if state is None:
            return None
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA weights in {folder} lack {len(missing)} tensors, e.g. {missing[:3]}")
        for k, s in self.shadow.items():
            s.set_value(paddle.to_tensor(np.asarray(state[k])).astype(s.dtype))
        return state


class ImageLoggingCallback(TrainerCallback):
    """Every `every` optimiser steps (rank 0): `model.log_images(...)` -> VisualDL images.

    The last training batch's `pixel_values` is passed along (for reconstructions); `log_kwargs`
    go to `log_images` unchanged (prompts, guidance scales, steps...).
    """

    def __init__(self, every: int, log_kwargs: Optional[dict] = None, logdir: Optional[str] = None):
        self.every = int(every)
        self.log_kwargs = dict(log_kwargs or {})
        self.logdir = logdir
        self._writer = None
        self._pixels = None

    def on_load_data_end(self, args, state, control, inputs=None, **kwargs):
        if self.every > 0 and isinstance(inputs, dict) and "pixel_values" in inputs:
            self._pixels = inputs["pixel_values"]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every <= 0 or state.global_step % self.every or not state.is_world_process_zero:
            return
        t0 = time.time()
        kw = self.log_kwargs
        logger.info("step %d: sampling preview images (%s prompt(s), %s step(s) per guidance scale)...",
                    state.global_step, len(kw["prompts"]) if "prompts" in kw else "default",
                    kw.get("num_inference_steps", "default"))
        images = model.log_images(pixel_values=self._pixels, **self.log_kwargs)
        self._writer = self._writer or _visualdl_writer(self.logdir or args.logging_dir)
        for tag, img in images.items():
            self._writer.add_image(tag, img, state.global_step)
        self._writer.flush()
        logger.info("logged %d images at step %d in %.1fs", len(images), state.global_step, time.time() - t0)

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _visualdl_writer(logdir: str):
    from visualdl import LogWriter

    return LogWriter(logdir=logdir)


class EvaluationCallback(TrainerCallback):
    """Every `args.eval_steps` optimiser steps: FID and CLIP score of `model.sample_images` on the
    first `args.eval_num_images` captions of `args.eval_captions`, per guidance scale
    (ldm.eval.online.OnlineEvaluation: every rank samples its share, features are gathered); rank 0
    writes `eval/fid_g<scale>` and `eval/clip_score_g<scale>` to VisualDL at that step.

    The Inception network, the CLIP towers and the reference statistics are loaded at train start
    (a wrong path fails before training). `sample_kwargs` are the recipe's preview settings (steps,
    size); `ema` the EMACallback, whose weights are evaluated when it has them. `history` keeps
    (step, metrics) of every evaluation."""

    def __init__(self, sample_kwargs: Optional[dict] = None, ema=None, logdir: Optional[str] = None):
        self.sample_kwargs = dict(sample_kwargs or {})
        self.ema, self.logdir = ema, logdir
        self.evaluation = None
        self.history = []
        self._writer = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ldm.eval.clip_score import ClipScorer
        from ldm.eval.inception import load_inception
        from ldm.eval.online import OnlineEvaluation

        scales = args.eval_guidance_scales or [model.default_guidance_scale]
        self.evaluation = OnlineEvaluation(
            args.eval_captions, args.eval_reference, load_inception(args.eval_inception),
            ClipScorer.from_dir(args.eval_clip_dir), args.eval_num_images, scales, seed=args.seed,
            batch_size=args.per_device_eval_batch_size)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % args.eval_steps:
            return
        t0 = time.time()
        with model.evaluating(self.ema):
            metrics = self.evaluation.run(
                lambda captions, seed, g: model.sample_images(captions, seed, g, **self.sample_kwargs))
        self.history.append((state.global_step, metrics))
        if state.is_world_process_zero:
            self._writer = self._writer or _visualdl_writer(self.logdir or args.logging_dir)
            for tag, value in metrics.items():
                self._writer.add_scalar(tag, value, state.global_step)
            self._writer.flush()
        logger.info("evaluated at step %d in %.1fs: %s", state.global_step, time.time() - t0,
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TimingCallback(TrainerCallback):
    """samples/s, share of wall time spent waiting for data, and the global gradient norm.

    Data wait = the time the loop waited for batches: the loader's own count when it keeps one
    (`wait_seconds`, ldm.train.trainer.TimedDataLoader), else the time from the end of one step
    (or train start) to the arrival of the next batch (which then includes logging and previews).
    The gradient norm (of the parameters with gradients, before clipping, unscaled) is taken
    just before the optimiser step of each logging step.
    """

    def __init__(self, samples_per_step: int):
        self.samples_per_step = int(samples_per_step)
        self._reset()
        self.grad_norm: Optional[float] = None
        self._mark = None
        self._step_start = time.perf_counter()
        self._wait_step = 0.0
        self._loader_wait = None  # the loader's wait_seconds at its previous batch
        self.history = []  # (global_step, step_seconds, data_wait_seconds) of every step

    def _reset(self):
        self._steps, self._wait, self._t0 = 0, 0.0, time.perf_counter()

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self._reset()
        self._loader_wait = getattr(train_dataloader, "wait_seconds", None)
        self._mark = self._step_start = time.perf_counter()

    def on_load_data_end(self, args, state, control, train_dataloader=None, **kwargs):
        now = time.perf_counter()
        counted = getattr(train_dataloader, "wait_seconds", None)
        if counted is not None:
            wait, self._loader_wait = counted - (self._loader_wait or 0.0), counted
            self._wait_step += wait
            self._wait += wait
        elif self._mark is not None:
            self._wait_step += now - self._mark
            self._wait += now - self._mark
        self._mark = None

    def on_substep_end(self, args, state, control, **kwargs):
        self._mark = time.perf_counter()

    def on_optimizer_begin(self, args, state, control, model=None, scaler=None, **kwargs):
        if args.logging_steps <= 0 or (state.global_step + 1) % args.logging_steps:
            return
        squares = [(p.grad.astype("float32") ** 2).sum() for p in model.parameters()
                   if not p.stop_gradient and p.grad is not None]
        norm = float(paddle.add_n(squares)) ** 0.5 if squares else 0.0  # one host sync
        if scaler is not None:
            norm /= float(scaler._scale)
        self.grad_norm = norm

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._steps += 1
        self.history.append((state.global_step, now - self._step_start, self._wait_step))
        self._wait_step = 0.0
        self._mark = self._step_start = now

    def pop_logs(self) -> Dict[str, float]:
        elapsed = time.perf_counter() - self._t0
        out = {}
        if self._steps:
            out["samples_per_second"] = round(self._steps * self.samples_per_step / max(elapsed, 1e-9), 4)
            out["data_wait_fraction"] = round(self._wait / max(elapsed, 1e-9), 4)
        if self.grad_norm is not None:
            out["grad_norm"] = round(self.grad_norm, 6)
            self.grad_norm = None
        self._reset()
        return out


def standard_callbacks(args, image_kwargs: Optional[dict] = None, extra=(), ema_to_images: bool = False):
    """The callback list both trainers use, in order: timing (samples/s over every data-parallel
    rank), EMA (`args.use_ema`), image logging every `args.image_logging_steps` with
    `image_kwargs` (plus `ema=` the EMA callback when `ema_to_images`), evaluation every
    `args.eval_steps` when `args.eval_captions` (sampling with `image_kwargs` minus the prompts and
    seed, EMA weights when there are any), then `extra` (`DiffusionTrainer` adds the checkpoint
    callbacks around them). Returns (callbacks, ema_callback_or_None)."""
    samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.dataset_world_size, 1)
    callbacks = [TimingCallback(samples)]
    ema = EMACallback(args.ema_decay) if args.use_ema else None
    if ema is not None:
        callbacks.append(ema)
    if args.image_logging_steps > 0:
        kwargs = dict(image_kwargs or {}, **({"ema": ema} if ema_to_images else {}))
        callbacks.append(ImageLoggingCallback(args.image_logging_steps, kwargs))
    if getattr(args, "eval_captions", None):
        sample_kwargs = {k: v for k, v in (image_kwargs or {}).items() if k not in ("prompts", "seed")}
        callbacks.append(EvaluationCallback(sample_kwargs, ema))
    return callbacks + list(extra), ema
