"""A PaddleNLP `Trainer` for diffusion models whose `forward(**batch)` returns the loss.

Overrides (nothing else is changed):
- `compute_loss`: `loss = model(**inputs)`; with `--record_log_dir` the batch's captions are appended
  to `rank<k>.txt` (the model's `last_captions` when it has them: captions after its dropout).
- `get_train_dataloader`: a paddle DataLoader with the one collator `ldm.data.collate` (numpy
  stacking; PaddleNLP's default collator segfaults with worker processes) and per-worker/per-rank
  seeding. The dataset shards itself by rank (no IterableDatasetShard wrapper).
- `log`: merges the scalars of callbacks that have `pop_logs()` (timing, grad norm).
- `_load_optimizer_and_scheduler`: optimizer state re-keyed by structured parameter names
  (`param_names.json`, written by `_save`), so resume does not depend on paddle's generated names.
- `_load_optimizer_and_scheduler` / `_load_rng_state`: PaddleNLP reads these checkpoint files with
  `paddle.load` (pickle); here they go through the restricted unpickler of `ldm.weights.io`, so a
  foreign `--resume_from_checkpoint` folder cannot run code.
- `_rotate_checkpoints`: a no-op; `ldm.train.checkpoint.CheckpointMarkerCallback` applies
  `save_total_limit` once the new checkpoint is complete.
- `train` / `training_step`: on resume the python/numpy/paddle RNG states of the checkpoint are
  restored right before the first step. PaddleNLP restores them only while skipping already-seen
  batches, i.e. never for a checkpoint on an epoch boundary or with `ignore_data_skip`, which made
  dropout and noise draws of a resumed run differ from an uninterrupted one.
- `_save` / `_load_from_checkpoint`: delegate to `model.save_trained(dir, only_updated)` /
  `model.load_trained(dir)` when the model has them (so checkpoints hold loadable component
  folders such as `unet/`), else the Trainer's own state-dict files.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from typing import Dict

import numpy as np
import paddle
from paddle.io import DataLoader, IterableDataset
from paddlenlp.trainer import Trainer

from ldm.data import collate
from ldm.utils import get_logger
from ldm.weights.io import TRAINER_STATE_GLOBALS, load_pickle_restricted

logger = get_logger("ldm.train.trainer")

__all__ = ["DiffusionTrainer", "worker_init_fn", "rename_optimizer_state", "PARAM_NAMES_FILE"]


class worker_init_fn:  # noqa: N801 - used like a function, picklable for worker processes
    """Seeds python/numpy RNGs of DataLoader worker `worker_id` from (seed, rank, worker_id)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = int(seed), int(rank)

    def __call__(self, worker_id: int) -> None:
        s = (self.seed * 1000003 + self.rank * 1009 + worker_id) % (2**32)
        random.seed(s)
        np.random.seed(s)


PARAM_NAMES_FILE = "param_names.json"


class SeededBatchSampler(paddle.io.DistributedBatchSampler):
    """paddle's DistributedBatchSampler shuffles with `RandomState(epoch)`, the same order for every
    run; this one mixes the run's seed in, so `--seed` changes the sample order too (the Trainer
    still drives it through `set_epoch`)."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        self._seed = int(seed)
        super().__init__(*args, **kwargs)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch((self._seed * 1000003 + int(epoch)) % 2**32)


def _param_name_map(checkpoint: str, model) -> Dict[str, str]:
    """{saved paddle param name: current paddle param name}, only for names that changed."""
    path = os.path.join(str(checkpoint), PARAM_NAMES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    current = {n: p.name for n, p in model.named_parameters()}
    missing = sorted(set(current) - set(saved))
    if missing:
        raise ValueError(f"{path}: {len(missing)} parameters of the model are not in the checkpoint, e.g. {missing[:3]}")
    return {saved[n]: current[n] for n in current if saved[n] != current[n]}


def rename_optimizer_state(state: Dict, mapping: Dict[str, str]) -> Dict:
    """Rename optimizer-state keys `<param name>_<accumulator>` and master-weight keys."""
    if not mapping:
        return state
    out = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):
            out[key] = {mapping.get(k, k): v for k, v in value.items()}
            continue
        new = key
        # the longest saved parameter name that prefixes the key followed by "_"
        cut = key.rfind("_")
        while cut > 0:
            if key[:cut] in mapping:
                new = mapping[key[:cut]] + key[cut:]
                break
            cut = key.rfind("_", 0, cut)
        out[new] = value
    return out


@contextlib.contextmanager
def restricted_paddle_load():
    """Within the block, `paddle.load` (as PaddleNLP calls it for optimizer, scheduler and RNG
    state) reads through the restricted unpickler: arrays, plain containers and Paddle generator
    states only. Paddle accepts numpy arrays wherever it loads these states."""
    original = paddle.load

    def safe_load(path, **kwargs):
        return load_pickle_restricted(path, TRAINER_STATE_GLOBALS)

    paddle.load = safe_load
    try:
        yield
    finally:
        paddle.load = original


class DiffusionTrainer(Trainer):
    """Trainer for `loss = model(**batch)` models; see the module docstring for the hooks."""

    def compute_loss(self, model, inputs, return_outputs=False):
        loss = model(**inputs)
        if getattr(self.args, "record_log_dir", None) and "caption" in inputs:
            # what the step trained on: a model that drops captions itself says so in `last_captions`
            seen = getattr(self.model, "last_captions", None)
            self._record(inputs["caption"] if seen is None else seen)
        return (loss, None) if return_outputs else loss

    def _record(self, captions) -> None:
        os.makedirs(self.args.record_log_dir, exist_ok=True)
        path = os.path.join(self.args.record_log_dir, f"rank{max(self.args.process_index, 0)}.txt")
        with open(path, "a", encoding="utf-8") as f:
            for c in captions:
                f.write(str(c).replace("\n", " ") + "\n")

    def get_train_dataloader(self):
        ds = self.train_dataset
        if ds is None:
            raise ValueError("DiffusionTrainer needs a train_dataset")
        common = dict(
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            worker_init_fn=worker_init_fn(self.args.seed, max(self.args.process_index, 0)),
        )
        if isinstance(ds, IterableDataset):
            return DataLoader(ds, drop_last=True, **common)
        sampler = SeededBatchSampler(
            ds, batch_size=self.args.per_device_train_batch_size, shuffle=True, drop_last=True,
            num_replicas=self.args.dataset_world_size, rank=self.args.dataset_rank, seed=self.args.seed,
        )
        common.pop("batch_size")
        return DataLoader(ds, batch_sampler=sampler, **common)

    def train(self, resume_from_checkpoint=None, **kwargs):
        self._rng_resume = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs):
        ckpt = getattr(self, "_rng_resume", None)
        if ckpt:  # once, before the first step after resume (idempotent if PaddleNLP already did it)
            self._rng_resume = None
            self._load_rng_state(ckpt)
        return super().training_step(model, inputs)

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "loss" in logs:  # training logs only
            for cb in self.callback_handler.callbacks:
                if hasattr(cb, "pop_logs"):
                    logs.update(cb.pop_logs())
        super().log(logs, **kwargs)

    def _save(self, output_dir=None, state_dict=None, merge_tensor_parallel=False):
        model = self.model
        if not hasattr(model, "save_trained"):
            return super()._save(output_dir, state_dict, merge_tensor_parallel)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            logger.info("saving trained components to %s", output_dir)
            model.save_trained(output_dir, only_updated=getattr(self.args, "only_save_updated_model", True))
            names = {n: p.name for n, p in model.named_parameters()}
            with open(os.path.join(output_dir, PARAM_NAMES_FILE), "w", encoding="utf-8") as f:
                json.dump(names, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """As the Trainer's, but optimizer-state keys are re-mapped through `param_names.json`.

        Paddle keys optimizer state by auto-generated parameter names (`conv2d_12.w_0_moment1_0`),
        which change when models are built in another order or a second time in one process; the
        structured names saved next to the checkpoint make resume independent of that.
        """
        mapping = _param_name_map(checkpoint, self.model) if checkpoint else None
        with restricted_paddle_load():
            if not mapping:
                return super()._load_optimizer_and_scheduler(checkpoint)
            original = self.optimizer.set_state_dict
            self.optimizer.set_state_dict = lambda state: original(rename_optimizer_state(state, mapping))
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                del self.optimizer.set_state_dict  # drop the instance override, back to the class method

    def _load_rng_state(self, checkpoint):
        with restricted_paddle_load():
            return super()._load_rng_state(checkpoint)

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        """Disabled: the Trainer's version deletes before the new checkpoint is complete (and never
        runs in single-process jobs, local_rank -1). `CheckpointMarkerCallback` rotates instead."""

    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        model = self.model
        if not resume_from_checkpoint or not hasattr(model, "load_trained"):
            return super()._load_from_checkpoint(resume_from_checkpoint)
        model.load_trained(str(resume_from_checkpoint))
