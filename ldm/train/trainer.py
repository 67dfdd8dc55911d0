"""A PaddleNLP `Trainer` for training tasks (`ldm.train.task.TrainingTask`): `loss = task(**batch)`.

Only PaddleNLP's public extension points are used; nothing of PaddleNLP or paddle is replaced at
run time:
- `__init__`: installs the checkpoint callbacks (`ldm.train.checkpoint`): `CheckpointStateCallback`
  first, `CheckpointMarkerCallback` (with `save_total_limit`) last. The Trainer gets its own copy
  of the arguments with `ignore_save_lr_and_optim` / `ignore_load_lr_and_optim` set (its optimizer,
  scheduler and RNG files are pickles; the state callback writes safetensors/JSON instead) and no
  `save_total_limit` (its rotation would delete before the new checkpoint is complete).
- `compute_loss`: `loss = model(**inputs)`; with `--record_log_dir` the batch's captions are appended
  to `rank<k>.txt` (the model's `last_captions` when it has them: captions after its dropout).
- `get_train_dataloader`: a paddle DataLoader with the one collator `ldm.data.collate` (numpy
  stacking; PaddleNLP's default collator segfaults with worker processes) and per-worker/per-rank
  seeding. The dataset shards itself by rank (no IterableDatasetShard wrapper). On resume the
  map-style sampler starts at the checkpoint's position (no batch is loaded to be skipped). The
  loader (`TimedDataLoader`) sets up its worker processes and reuses shared-memory batch
  buffers: paddle's own `FLAGS_use_shm_cache` pool, sized through the core call paddle's
  DataLoader itself makes (paddle sizes it for map-style data sets only).
- `log`: merges the scalars of callbacks that have `pop_logs()` (timing, grad norm).
- `_save` / `_load_from_checkpoint` (the Trainer's save / load hooks): the task's
  `save_trained(dir, only_updated)` / `load_trained(dir)`, so checkpoints hold loadable component
  files (`stage_c.safetensors`, `unet/`) and nothing pickled.
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import random
import time
from typing import Dict

import numpy as np
import paddle
from paddle.io import DataLoader, Dataset, IterableDataset
from paddlenlp.trainer import Trainer

from ldm.data import collate
from ldm.data.buckets import BucketBatchSampler, ResumableSampler
from ldm.train.checkpoint import (CheckpointMarkerCallback, CheckpointStateCallback, OutputDirLock,
                                  checkpoint_global_step, read_final_marker, read_trainer_state,
                                  remove_stale_temp_files, resume_position, write_final_marker)
from ldm.train.task import TrainingTask
from ldm.utils import exit_with_parent, get_logger

logger = get_logger("ldm.train.trainer")

__all__ = ["DiffusionTrainer", "worker_init_fn", "SeededBatchSampler", "TimedDataLoader"]


class worker_init_fn:  # noqa: N801 - used like a function, picklable for worker processes
    """Seeds python/numpy RNGs of DataLoader worker `worker_id` from (seed, rank, worker_id)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = int(seed), int(rank)

    def __call__(self, worker_id: int) -> None:
        s = (self.seed * 1000003 + self.rank * 1009 + worker_id) % (2**32)
        random.seed(s)
        np.random.seed(s)


class SeededBatchSampler(ResumableSampler, paddle.io.DistributedBatchSampler):
    """paddle's DistributedBatchSampler shuffles with `RandomState(epoch)`, the same order for every
    run; this one mixes the run's seed in, so `--seed` changes the sample order too (the Trainer
    still drives it through `set_epoch`). It also sets the dataset's epoch (fresh random crops per
    epoch) and can start at a resumed position: `start_at(epochs, batches)` makes the Trainer's
    loop epoch 0 the data epoch `epochs`, of which the first `batches` batches are not yielded."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        self._seed = int(seed)
        super().__init__(*args, **kwargs)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch) + self._epoch_offset
        super().set_epoch((self._seed * 1000003 + epoch) % 2**32)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        yield from self._resumed(super().__iter__())  # ResumableSampler: a resumed pass starts later


class DiffusionTrainer(Trainer):
    """Trainer of a `TrainingTask`; see the module docstring for the hooks it fills in."""

    def __init__(self, model: TrainingTask, args, callbacks=(), **kwargs):
        if not isinstance(model, TrainingTask):
            raise TypeError(f"DiffusionTrainer trains an ldm.train.task.TrainingTask, got {type(model).__name__}")
        if args.unified_checkpoint or args.save_sharded_model or args.load_sharded_model:
            raise ValueError("--unified_checkpoint / --save_sharded_model / --load_sharded_model are not supported: "
                             "checkpoints hold the task's own weight files")
        if os.environ.get("PADDLE_TRAINER_ENDPOINTS"):  # a rank of paddle.distributed.launch: exit with it
            exit_with_parent()
        keep = args.save_total_limit
        # a stream resumes at its exact position itself (`set_start`), unless --ignore_data_skip
        # asks for a fresh stream; the Trainer must never skip batches of it on top
        self.exact_data_resume = not args.ignore_data_skip
        args = copy.copy(args)  # the caller's arguments stay as parsed
        args.ignore_save_lr_and_optim = args.ignore_load_lr_and_optim = True
        if isinstance(kwargs.get("train_dataset"), IterableDataset):
            args.ignore_data_skip = True
        args.save_total_limit = None
        self.checkpoint_state = CheckpointStateCallback(model)
        callbacks = [self.checkpoint_state, *(callbacks or ()), CheckpointMarkerCallback(keep)]
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        self.checkpoint_state.scaler = self.scaler if self.do_grad_scaling else None

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
        resume = self.args.resume_from_checkpoint  # set by _load_from_checkpoint, which train() calls first
        if isinstance(ds, IterableDataset):
            if hasattr(ds, "set_start"):  # micro-batches this rank consumed before the checkpoint
                done = checkpoint_global_step(resume) * self.args.gradient_accumulation_steps
                ds.set_start(done if resume and self.exact_data_resume else 0, self.args.per_device_train_batch_size)
            # the dataset's own error (e.g. LaionDataError: no valid record) must stop the run
            common["collate_fn"] = _collate_checked
            return TimedDataLoader(_ErrorCatchingIterable(ds), drop_last=True, **common)
        sizes = getattr(ds, "item_sizes", None)  # multi-aspect buckets: every batch from one size
        if sizes is not None and len(set(sizes)) > 1:
            sampler = BucketBatchSampler(ds, sizes, self.args.per_device_train_batch_size, self.args.dataset_world_size,
                                         self.args.dataset_rank, seed=self.args.seed)
        else:
            sampler = SeededBatchSampler(
                ds, batch_size=self.args.per_device_train_batch_size, shuffle=True, drop_last=True,
                num_replicas=self.args.dataset_world_size, rank=self.args.dataset_rank, seed=self.args.seed,
            )
        if resume:
            sampler.start_at(*resume_position(checkpoint_global_step(resume), len(sampler), self.args))
        common.pop("batch_size")
        common["collate_fn"] = _collate_checked
        return TimedDataLoader(_ErrorCatchingDataset(ds), batch_sampler=sampler, **common)

    def fit(self, resume_from_checkpoint=None, ema=None):
        """`train`, then the final files in `--output_dir`: the task's trained weights, the EMA
        weights (`ema`: the EMACallback, if any) and trainer_state.json, then `training_complete.json`.

        While it runs, `--output_dir` is locked (`OutputDirLock`: a second run into it refuses).
        A finished run (its final marker reached `--max_steps`, or any marker when the run is
        bounded by epochs) trains nothing and leaves every file as it is, whether or not a
        checkpoint was saved at the last step; `--overwrite_output_dir` trains again. A run whose
        checkpoint reached `--max_steps` but has no final marker (killed during the final save)
        writes the final files again from that checkpoint."""
        out = self.args.output_dir
        with OutputDirLock(out, enabled=self.args.should_save):
            final = read_final_marker(out)
            if final is not None and not self.args.overwrite_output_dir and (
                    self.args.max_steps <= 0 or int(final.get("global_step", -1)) >= self.args.max_steps):
                logger.info("%s: training already finished (step %s, --max_steps %d): nothing to do "
                            "(--overwrite_output_dir or another --output_dir trains again)",
                            out, final.get("global_step"), self.args.max_steps)
                if os.path.isfile(os.path.join(out, "trainer_state.json")):
                    self.state = read_trainer_state(out)
                return self
            done = checkpoint_global_step(resume_from_checkpoint)
            if resume_from_checkpoint and 0 < self.args.max_steps <= done:
                logger.info("training already finished at %s (step %d): writing the final files again from it",
                            resume_from_checkpoint, done)
                self._load_from_checkpoint(resume_from_checkpoint)
                if ema is not None:
                    ema.restore(self.model, resume_from_checkpoint)
                self.state = read_trainer_state(resume_from_checkpoint)
            else:
                self.train(resume_from_checkpoint=resume_from_checkpoint)
            self._save_final(ema)
            if self.args.world_size > 1:  # no rank leaves (tearing its process group down) before rank 0 wrote
                paddle.distributed.barrier()
        return self

    def _save_final(self, ema) -> None:
        out = self.args.output_dir
        self.save_model()
        if ema is not None and self.args.should_save:
            ema.save(self.model, out)
        self.save_state()
        if self.args.should_save:
            remove_stale_temp_files(out)
            write_final_marker(out, self.state.global_step)

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "loss" in logs:  # training logs only
            for cb in self.callback_handler.callbacks:
                if hasattr(cb, "pop_logs"):
                    logs.update(cb.pop_logs())
        super().log(logs, **kwargs)

    def _save(self, output_dir=None, state_dict=None, merge_tensor_parallel=False):
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            logger.info("saving trained weights to %s", output_dir)
            self.model.save_trained(output_dir, only_updated=getattr(self.args, "only_save_updated_model", True))

    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        """Load the task's trained weights; `args.resume_from_checkpoint` names the checkpoint this
        run resumes from (None when it starts fresh) for the dataloader and the callbacks."""
        resume = resume_from_checkpoint
        if resume is not None and not isinstance(resume, (str, os.PathLike)):
            raise ValueError(f"resume_from_checkpoint must be a checkpoint folder or None, got {resume!r} "
                             "(ldm.train.checkpoint.resolve_resume finds one)")
        self.args.resume_from_checkpoint = str(resume) if resume else None
        if resume:
            self.model.load_trained(str(resume))


# Shared-memory batch buffers a DataLoader worker keeps for reuse (paddle's MemoryMapAllocationPool;
# `TimedDataLoader(shm_buffers=...)`): the 3 batches a worker has in flight (prefetch 2 + 1) of one
# array field, + 1. Batches with more arrays still work (buffers beyond the pool are created and
# unlinked as without it).
SHM_BUFFERS_PER_WORKER = 4
_shm_reuse_taken = False  # whether an iterator of this process has used the buffer reuse (see TimedDataLoader)


class _ShmReuseCollate:
    """A DataLoader's collate_fn that, in a worker process, turns on paddle's shared-memory buffer
    pool (`shm_buffers` buffers) once the main process has sized its own side (`ready`, set by
    `TimedDataLoader`). Earlier batches go the plain way: a worker must never reuse a buffer the
    main process has already unlinked (paddle then fails with "File descriptor ... open failed")."""

    def __init__(self, collate_fn, shm_buffers: int):
        self.collate_fn, self.shm_buffers = collate_fn, int(shm_buffers)
        self.ready = None  # a multiprocessing Event per iterator, set by TimedDataLoader
        self._pooled = False

    def __call__(self, samples):
        if not self._pooled and self.ready is not None and paddle.io.get_worker_info() is not None \
                and self.ready.is_set():
            paddle.base.core._set_max_memory_map_allocation_pool_size(self.shm_buffers)
            self._pooled = True
        return self.collate_fn(samples)


class TimedDataLoader(DataLoader):
    """A paddle DataLoader that adds the seconds its consumer waited for each batch to
    `wait_seconds` (read by `ldm.train.callbacks.TimingCallback`: data waiting only, not the
    step, logging or preview time between batches).

    Its worker processes are left as paddle forks them: calling into OpenCV (e.g. its thread
    count) in a worker forked from a process whose OpenCV thread pool has run deadlocks there.

    Shared-memory buffer reuse (`shm_buffers` > 0, workers, shared memory; issue 15 item 4): the
    workers' batches travel through reused shared-memory buffers (paddle's `FLAGS_use_shm_cache`
    pool, which paddle sizes only for map-style data sets: `shm_buffers` per worker, 2 x
    num_workers x that in this process, paddle's own ratio) instead of a /dev/shm file created,
    faulted in and unlinked per batch. benchmarks/bench_dataloader.py, 2 workers, 256 px: worker
    CPU per sample 1.71 -> 1.38 ms (what the same work takes in one process), page faults per
    sample ~50 -> 0, 1056 -> 1357 samples/s (one run each). Only the first such iterator of a process reuses
    buffers (later ones, e.g. the next epoch of a map-style set, load as paddle does): the
    process keeps its buffers mapped until it exits, and a second iterator whose buffers find
    that side full fails in paddle's reader thread ("File descriptor ... open failed")."""

    wait_seconds = 0.0

    def __init__(self, *args, worker_init_fn=None, collate_fn=None, shm_buffers: int = SHM_BUFFERS_PER_WORKER,
                 **kwargs):
        shm_buffers = max(0, int(shm_buffers))
        reuse = _ShmReuseCollate(collate_fn, shm_buffers) if shm_buffers and collate_fn is not None else None
        super().__init__(*args, worker_init_fn=worker_init_fn, collate_fn=reuse or collate_fn, **kwargs)
        self._shm_reuse = reuse if self.num_workers > 0 and self.use_shared_memory else None

    def __iter__(self):
        global _shm_reuse_taken
        reuse = self._shm_reuse if not _shm_reuse_taken else None
        if self._shm_reuse is not None:
            self._shm_reuse.ready = None  # workers of this iterator: no reuse unless set below
        if reuse is not None:  # before the workers fork; left on (a loader without pool sizes allocates as before)
            _shm_reuse_taken = True
            paddle.set_flags({"FLAGS_use_shm_cache": True})
            reuse.ready = multiprocessing.get_context().Event()
        it = super().__iter__()
        if reuse is not None:
            # creating the iterator set this process's pool to 0 (paddle has no size for an iterable data
            # set); from here on this side keeps the workers' buffers mapped, and they may reuse them
            paddle.base.core._set_max_memory_map_allocation_pool_size(2 * self.num_workers * reuse.shm_buffers)
            reuse.ready.set()
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                finally:
                    self.wait_seconds += time.perf_counter() - t0
                if isinstance(batch, dict) and _DATASET_ERROR in batch:
                    raise batch[_DATASET_ERROR]
                yield batch
        finally:  # the consumer stopped (--max_steps mid-pass, an error, the end): stop the reader now
            _shutdown_loader_iterator(it)


_DATASET_ERROR = "__dataset_error__"


def _shutdown_loader_iterator(it) -> None:
    """Stop a paddle DataLoader iterator's reader thread (0 workers) or its worker processes now.

    paddle does it in the iterator's `__del__`. An iterator left to the interpreter's exit (the
    training loop stops at --max_steps in the middle of a pass) can still have its reader thread
    blocked on a full queue while the process is torn down; a rank then aborted (exit code -6)
    after a finished run, now and then."""
    shutdown = getattr(it, "_try_shutdown_all", None)
    if shutdown is None:
        return
    if getattr(it, "_num_workers", 0) > 0:
        shutdown(5)  # seconds to wait for each worker (they exit on the None paddle sends them)
    else:
        shutdown()


class _DatasetFailure:
    """What `_ErrorCatchingIterable` yields after its dataset raised (picklable: it crosses from a
    DataLoader worker process or thread to the main loop inside a batch)."""

    def __init__(self, error: BaseException):
        self.error = error


class _ErrorCatchingIterable(IterableDataset):
    """Iterates `dataset`; once it raises, yields `_DatasetFailure(error)` forever, which
    `_collate_checked` turns into an error batch that `TimedDataLoader` raises in the main loop.
    paddle reads an IterableDataset in a thread (num_workers 0) or in worker processes whose
    errors its thread re-raises: either way the thread dies, the main loop waits forever (0
    workers) or gets an unrelated "Blocking queue is killed" SystemError (workers)."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        try:
            yield from self.dataset
        except Exception as e:  # noqa: BLE001 - re-raised in the main loop
            failure = _DatasetFailure(e)
            while True:
                yield failure

    def __getattr__(self, name):  # set_epoch, stats, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _ErrorCatchingDataset(Dataset):
    """`_ErrorCatchingIterable` for map-style datasets: an item that raises becomes
    `_DatasetFailure(error)` (paddle's loader thread would die on it and, with 0 workers, the main
    loop would wait forever)."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except Exception as e:  # noqa: BLE001 - re-raised in the main loop
            return _DatasetFailure(e)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _failure_batch(error: BaseException) -> dict:
    return {_DATASET_ERROR: error, "_": np.zeros(1, np.float32)}  # paddle drops a batch without arrays


def _collate_checked(samples):
    """`collate`, except that a failed sample or a failing collation becomes an error batch that
    `TimedDataLoader` raises in the main loop (the loader thread must not die with it)."""
    for s in samples:
        if isinstance(s, _DatasetFailure):
            return _failure_batch(s.error)
    try:
        return collate(samples)
    except Exception as e:  # noqa: BLE001 - re-raised in the main loop
        return _failure_batch(e)


def run_training(model_args, data_args, training_args, build) -> DiffusionTrainer:
    """What every training entry point does once its arguments are parsed: refuse fp16 without a
    GPU, seed, find the checkpoint to resume (the newest complete one unless --overwrite_output_dir),
    build the trainer (``build(model_args, data_args, training_args, resume)`` -> (trainer, task,
    ema callback)) and, with --do_train, ``fit``."""
    from ldm.train.args import check_precision
    from ldm.train.checkpoint import resolve_resume
    from ldm.utils import set_seed

    check_precision(training_args)
    set_seed(training_args.seed)
    resume = resolve_resume(training_args.output_dir, training_args.resume_from_checkpoint,
                            training_args.overwrite_output_dir) if training_args.do_train else None
    trainer, _, ema = build(model_args, data_args, training_args, resume)
    if training_args.do_train:
        trainer.fit(resume, ema)
    return trainer
