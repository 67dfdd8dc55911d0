"""Crash-safe, pickle-free checkpoints on top of the PaddleNLP Trainer's `checkpoint-<step>/` folders.

What a checkpoint holds and who writes it:
- the task's trained weights (and `trainer_state.json`): the Trainer, through `DiffusionTrainer._save`;
- the EMA weights: `ldm.train.callbacks.EMACallback`;
- the rest of the training state: `CheckpointStateCallback`, as safetensors and JSON only:
  `optimizer[.<shard>].safetensors` (optimizer tensors keyed `<structured parameter name>/<accumulator>`
  and `master_weights/<structured name>`, so resume does not depend on paddle's generated names;
  one file per optimizer shard where the state is sharded, else one written by rank 0),
  `scheduler.json` (learning-rate scheduler, loss scaler and the optimizer's scalars),
  `rng_state_rank<k>.json` (python / numpy / paddle generator states of rank k) and the task's
  per-rank state (`task.state_file`, e.g. `train_c_state_rank<k>.json`);
- `checkpoint_complete.json`: `CheckpointMarkerCallback`, after everything else, atomically.

PaddleNLP's own optimizer / scheduler / RNG files are pickles; `DiffusionTrainer` switches the
first two off (`ignore_save_lr_and_optim` / `ignore_load_lr_and_optim`) and this callback deletes
the Trainer's `rng_state*.pth` once its JSON copy is written, so nothing in a new checkpoint is
ever unpickled. Because `ignore_load_lr_and_optim` also stops PaddleNLP from reading
`trainer_state.json`, `CheckpointStateCallback.on_train_begin` restores the TrainerState
(global step, epoch, log history), and `DiffusionTrainer.get_train_dataloader` starts its sampler
at the resumed position. The RNG states are restored right before the first step after resume.

Checkpoints written before (`optimizer.pdopt`, `scheduler.pdparams`, `scaler.pdparams`,
`rng_state*.pth`, `param_names.json`) still resume: those files are read through the restricted
unpickler of `ldm.weights` (arrays, plain containers, Paddle generator states; never code).

A checkpoint counts only once `checkpoint_complete.json` exists in it; a run killed mid-save leaves
a folder without it, which `find_resume_checkpoint` skips. `save_total_limit` is applied by the
marker callback after the new checkpoint is complete (the Trainer's own rotation is off).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from typing import Dict, Optional, Tuple

import numpy as np
import paddle
from paddlenlp.trainer import TrainerCallback
from paddlenlp.trainer.trainer_callback import TrainerState
from paddlenlp.trainer.trainer_utils import has_length

from ldm.utils import atomic_open, get_logger
from ldm.weights import TRAINER_STATE_GLOBALS, load_pickle_restricted, load_state_dict, save_safetensors

logger = get_logger("ldm.train.checkpoint")

__all__ = ["COMPLETE_MARKER", "FINAL_MARKER", "LOCK_FILE", "TRAINER_STATE_FILE", "OPTIMIZER_FILE", "SCHEDULER_FILE", "RNG_FILE",
           "mark_complete", "is_complete", "list_checkpoints", "find_resume_checkpoint", "resolve_resume",
           "rotate_checkpoints", "remove_stale_temp_files", "write_final_marker", "read_final_marker",
           "OutputDirLock", "OutputDirLockedError", "step_checkpoint_dir", "read_trainer_state", "checkpoint_global_step",
           "batches_per_epoch", "resume_position", "capture_rng", "restore_rng", "named_optimizer_state",
           "optimizer_state_from_named", "rename_optimizer_state", "read_legacy_state", "CheckpointStateCallback",
           "CheckpointMarkerCallback"]

COMPLETE_MARKER = "checkpoint_complete.json"
TRAINER_STATE_FILE = "trainer_state.json"  # PaddleNLP's TRAINER_STATE_NAME
OPTIMIZER_FILE = "optimizer{}.safetensors"  # "" or ".<shard suffix>"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng_state_rank{}.json"
# written by the Trainer and by the code before this one (pickles, read only through the restricted unpickler)
LEGACY_OPTIMIZER_FILE = "optimizer{}.pdopt"
LEGACY_SCHEDULER_FILE = "scheduler.pdparams"
LEGACY_SCALER_FILE = "scaler.pdparams"
LEGACY_RNG_FILE = "rng_state.pth"
LEGACY_RNG_FILE_DIST = "rng_state_{}.pth"  # world size; a list with one entry per rank
LEGACY_PARAM_NAMES_FILE = "param_names.json"  # {structured name: paddle name} of the optimizer keys
FINAL_MARKER = "training_complete.json"  # in --output_dir, after the final files
LOCK_FILE = ".train.lock"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_LEGACY_RNG_RE = re.compile(r"^rng_state(_\d+)?\.pth$")
# TrainerState fields of the run itself, not of the checkpoint (PaddleNLP sets them after loading it)
_RUN_FIELDS = ("max_steps", "num_train_epochs", "is_local_process_zero", "is_world_process_zero")


# ---------------------------------------------------------------------------------------------
# Completeness, resume and rotation
# ---------------------------------------------------------------------------------------------
def mark_complete(checkpoint_dir: str, global_step: int) -> None:
    with atomic_open(os.path.join(checkpoint_dir, COMPLETE_MARKER), "w") as f:
        json.dump({"global_step": int(global_step)}, f)


def is_complete(checkpoint_dir: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of checkpoint-<step> folders, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT_RE.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def find_resume_checkpoint(output_dir: str) -> Optional[str]:
    """Newest complete checkpoint in output_dir (incomplete newer ones, and ones whose
    trainer_state.json cannot be read, are skipped with a warning naming them)."""
    for step, path in reversed(list_checkpoints(output_dir)):
        if not is_complete(path):
            logger.warning("skipping incomplete checkpoint %s (no %s: the save was interrupted)", path,
                           COMPLETE_MARKER)
            continue
        if os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):  # a missing one is named when it is read
            try:
                read_trainer_state(path)
            except ValueError as e:
                logger.warning("skipping checkpoint %s: %s", path, e)
                continue
        return path
    return None


def resolve_resume(output_dir: str, resume_from_checkpoint, overwrite_output_dir: bool = False) -> Optional[str]:
    """Which checkpoint to resume from.

    resume_from_checkpoint: a path (must be complete), "auto"/"true"/"last" (newest complete one,
    error if none), or None: resume automatically from the newest complete checkpoint of
    output_dir unless overwrite_output_dir.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        if overwrite_output_dir:
            return None
        found = find_resume_checkpoint(output_dir)
        if found:
            logger.info("resuming from %s (found in --output_dir; pass --overwrite_output_dir to start over)", found)
        return found
    if str(resume_from_checkpoint).lower() in ("auto", "true", "last", "1"):
        found = find_resume_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(f"--resume_from_checkpoint: no complete checkpoint in {output_dir}")
        return found
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a folder")
    if not is_complete(path):
        raise ValueError(f"--resume_from_checkpoint: {path} is incomplete (no {COMPLETE_MARKER}); an interrupted save?")
    return path


def rotate_checkpoints(output_dir: str, keep: int | None) -> list[str]:
    """Delete checkpoints older than the newest `keep` COMPLETE ones; returns the deleted paths.

    Runs only after a new checkpoint is marked complete, so a crash never leaves no loadable one.
    """
    if not keep or keep <= 0:
        return []
    complete = [(step, p) for step, p in list_checkpoints(output_dir) if is_complete(p)]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep][0]
    deleted = []
    for step, path in list_checkpoints(output_dir):
        if step < oldest_kept:
            logger.info("deleting old checkpoint %s (save_total_limit=%d)", path, keep)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the temporary files a killed save left in `folder` and its sub-folders (the
    `.<name>.<random>.tmp` files of `ldm.utils.atomic_open`; checkpoint-N sub-folders excepted).
    Call it only when no save into `folder` is in flight. Returns the deleted paths."""
    deleted = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _CKPT_RE.match(d)]
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                path = os.path.join(root, name)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
                deleted.append(path)
    if deleted:
        logger.info("removed %d temporary file(s) of an interrupted save in %s", len(deleted), folder)
    return deleted


def write_final_marker(output_dir: str, global_step: int) -> None:
    """`training_complete.json`: the final files of --output_dir are all written (DiffusionTrainer.fit)."""
    with atomic_open(os.path.join(output_dir, FINAL_MARKER), "w") as f:
        json.dump({"global_step": int(global_step)}, f)


def read_final_marker(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, FINAL_MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class OutputDirLockedError(FileExistsError):
    """Another live run is writing the same --output_dir."""


class OutputDirLock:
    """`<output_dir>/.train.lock` holding {"pid", "host"} while a run writes the folder (context
    manager). A lock of a live process refuses with `OutputDirLockedError`; one left by a dead
    process of this host is taken over (with a warning); one of another host refuses (its pid
    cannot be checked from here: delete the file if that run is gone)."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(str(output_dir), LOCK_FILE)
        self.enabled = enabled
        self._held = False

    def __enter__(self):
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        import socket

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile, or unreadable: _holder removed it
                if holder.get("host") != me["host"] or _pid_alive(holder.get("pid")):
                    raise OutputDirLockedError(
                        f"{os.path.dirname(self.path)} is in use by the run of pid {holder.get('pid')} on host "
                        f"{holder.get('host')} ({self.path}); wait for it, or use another --output_dir "
                        "(delete the lock file if that run is gone)") from None
                logger.warning("taking over the lock %s of pid %s, which is no longer running", self.path,
                               holder.get("pid"))
                _remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise OutputDirLockedError(f"could not take the lock {self.path}")

    def _holder(self) -> Optional[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # written half by a process killed right after creating it
            data = {}
        if not isinstance(data, dict) or "pid" not in data:
            return {"pid": None, "host": None}
        return data

    def release(self) -> None:
        if self._held:
            _remove(self.path)
            self._held = False


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_trainer_state(checkpoint: str) -> TrainerState:
    path = os.path.join(str(checkpoint), TRAINER_STATE_FILE)
    try:
        return TrainerState.load_from_json(path)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a readable trainer state ({e})") from None


def checkpoint_global_step(checkpoint: Optional[str]) -> int:
    """Optimiser steps done at `checkpoint` (0 for None)."""
    return int(read_trainer_state(checkpoint).global_step) if checkpoint else 0


def batches_per_epoch(dataloader, args) -> int:
    """Micro-batches of one epoch as the Trainer counts them (`max_steps` x accumulation for a
    loader without a length)."""
    if has_length(dataloader):
        return len(dataloader)
    return int(args.max_steps) * int(args.gradient_accumulation_steps)


def resume_position(global_step: int, per_epoch: int, args) -> Tuple[int, int]:
    """(epochs done, micro-batches of the next epoch done) after `global_step` optimiser steps,
    as PaddleNLP computes them when it resumes (no batches with `--ignore_data_skip`)."""
    accum = int(args.gradient_accumulation_steps)
    steps_per_epoch = max(int(per_epoch) // accum, 1)
    done = 0 if args.ignore_data_skip else (int(global_step) % steps_per_epoch) * accum
    return int(global_step) // steps_per_epoch, done


# ---------------------------------------------------------------------------------------------
# RNG states as JSON
# ---------------------------------------------------------------------------------------------
def _generator_to_json(state) -> list:
    """A paddle GeneratorState as [device, seed, offset, engine state text]."""
    device, seed, offset, text = state.__getstate__()
    return [int(device), int(seed), int(offset), bytes(text).decode("ascii")]


def _generator_from_json(obj):
    cls = type(paddle.framework.core.default_cpu_generator().get_state())
    if not (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[3], str)):
        raise ValueError(f"not a paddle generator state: {str(obj)[:80]}")
    state = cls.__new__(cls)
    state.__setstate__((int(obj[0]), int(obj[1]), int(obj[2]), list(obj[3].encode("ascii"))))
    return state


def capture_rng(with_tracker: bool = False) -> dict:
    """The python, numpy and paddle (CPU + current device) RNG states of this process, JSON-able;
    with the hybrid-parallel RNG tracker's states when `with_tracker`."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "paddle_cpu": _generator_to_json(paddle.framework.core.default_cpu_generator().get_state()),
        "paddle_device": [_generator_to_json(s) for s in paddle.get_rng_state()],
    }
    if with_tracker:
        from paddle.distributed import fleet

        tracker = fleet.meta_parallel.get_rng_state_tracker().get_states_tracker()
        out["tracker"] = {k: [_generator_to_json(s) for s in v] for k, v in tracker.items()}
    return out


def restore_rng(state: dict) -> None:
    """Set every RNG state of `capture_rng` (or of a legacy PaddleNLP `rng_state.pth` entry)."""
    if "paddle_cpu" not in state:  # PaddleNLP's layout, read by read_legacy_state
        state = _rng_from_legacy(state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    paddle.framework.core.default_cpu_generator().set_state(_generator_from_json(state["paddle_cpu"]))
    paddle.set_rng_state([_generator_from_json(s) for s in state["paddle_device"]])
    if state.get("tracker"):
        from paddle.distributed import fleet

        fleet.meta_parallel.get_rng_state_tracker().set_states_tracker(
            {k: [_generator_from_json(s) for s in v] for k, v in state["tracker"].items()})


def _rng_from_legacy(old: dict) -> dict:
    def gen(s):
        return _generator_to_json(s)

    device = old.get("cuda")
    device = [gen(s) for s in device] if isinstance(device, (list, tuple)) else [gen(device)]
    name, keys, pos, has_gauss, cached = old["numpy"]
    out = {"python": list(old["python"]), "numpy": [name, np.asarray(keys).tolist(), pos, has_gauss, cached],
           "paddle_cpu": gen(old["cpu"]), "paddle_device": device}
    if "hybrid_parallel_rng_state_tracker" in old:
        out["tracker"] = {k: [gen(s) for s in (v if isinstance(v, (list, tuple)) else [v])]
                          for k, v in old["hybrid_parallel_rng_state_tracker"].items()}
    return out


# ---------------------------------------------------------------------------------------------
# Optimizer state keyed by structured parameter names
# ---------------------------------------------------------------------------------------------
def _split_key(key: str, names: Dict[str, str]) -> Optional[Tuple[str, str]]:
    """`<paddle param name>_<accumulator>` -> (paddle name, accumulator) for the longest known name."""
    cut = key.rfind("_")
    while cut > 0:
        if key[:cut] in names:
            return key[:cut], key[cut + 1:]
        cut = key.rfind("_", 0, cut)
    return None


def named_optimizer_state(state: Dict, names: Dict[str, str]) -> Tuple[Dict[str, object], Dict[str, object]]:
    """Paddle `optimizer.state_dict()` -> (tensors, scalars).

    names: {paddle parameter name: structured name}. Tensors are keyed
    `<structured>/<accumulator>` and `master_weights/<structured>`; every other entry (the
    "LR_Scheduler" dict) goes to scalars. A tensor of an unknown parameter is an error.
    """
    tensors, scalars = {}, {}
    for key, value in state.items():
        if key == "master_weights":
            for pname, v in value.items():
                if pname not in names:
                    raise ValueError(f"optimizer master weight of unknown parameter {pname!r}")
                tensors[f"master_weights/{names[pname]}"] = v
        elif isinstance(value, paddle.Tensor):
            split = _split_key(key, names)
            if split is None:
                raise ValueError(f"optimizer state {key!r} belongs to no parameter of the task")
            tensors[f"{names[split[0]]}/{split[1]}"] = value
        else:
            scalars[key] = value
    return tensors, scalars


def optimizer_state_from_named(tensors: Dict[str, np.ndarray], scalars: Dict, names: Dict[str, str],
                               where: str = "optimizer state") -> Dict:
    """The inverse of `named_optimizer_state` for the current parameter names
    (names: {paddle parameter name: structured name})."""
    current = {s: p for p, s in names.items()}
    state, master, unknown = dict(scalars), {}, []
    for key, value in tensors.items():
        head, _, tail = key.partition("/")
        if head == "master_weights" and tail in current:
            master[current[tail]] = value
        elif head in current and tail:
            state[f"{current[head]}_{tail}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} entries of parameters the task does not have, e.g. {unknown[:3]}")
    if master:
        state["master_weights"] = master
    return state


def rename_optimizer_state(state: Dict, mapping: Dict[str, str]) -> Dict:
    """Rename optimizer-state keys `<param name>_<accumulator>` and master-weight keys
    (mapping: {saved paddle name: current paddle name}; legacy `optimizer.pdopt` files)."""
    if not mapping:
        return state
    out = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):
            out[key] = {mapping.get(k, k): v for k, v in value.items()}
            continue
        split = _split_key(key, mapping)
        out[mapping[split[0]] + "_" + split[1] if split else key] = value
    return out


def _legacy_name_map(checkpoint: str, names: Dict[str, str]) -> Dict[str, str]:
    """{saved paddle name: current paddle name} from a legacy checkpoint's `param_names.json`."""
    path = os.path.join(str(checkpoint), LEGACY_PARAM_NAMES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)  # {structured name: paddle name at save time}
    current = {s: p for p, s in names.items()}
    missing = sorted(set(current) - set(saved))
    if missing:
        raise ValueError(f"{path}: {len(missing)} parameters of the model are not in the checkpoint, "
                         f"e.g. {missing[:3]}")
    return {saved[s]: current[s] for s in current if saved[s] != current[s]}


def read_legacy_state(path: str):
    """A pickled Trainer file of an older checkpoint (optimizer, scheduler, scaler, RNG), read
    through the restricted unpickler: arrays, containers, Paddle generator states, never code."""
    return load_pickle_restricted(path, TRAINER_STATE_GLOBALS)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, paddle.Tensor):
        obj = obj.numpy()
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    return obj


# ---------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------
def step_checkpoint_dir(args, state) -> str:
    """The `checkpoint-<global step>` folder the Trainer saves into."""
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


def _shard_suffix(args) -> str:
    """"" or ".<suffix>" (tensor/pipeline/sharding rank, as PaddleNLP names its optimizer files)."""
    suffix = args.optimizer_name_suffix if args.use_hybrid_parallel else ""
    return f".{suffix}" if suffix else ""


class CheckpointStateCallback(TrainerCallback):
    """Saves and restores everything of a checkpoint except the weights (see the module docstring).

    Installed FIRST by `DiffusionTrainer` (so the TrainerState is restored before the other
    callbacks' `on_train_begin`); `scaler` is the Trainer's loss scaler when it scales (fp16).
    """

    def __init__(self, task):
        self.task = task
        self.scaler = None
        self._rng: Optional[dict] = None  # restored before the first step after resume
        self._resumed: Optional[Tuple[int, int, int]] = None  # (epochs done, batches done in it, batches per epoch)
        self._loop_epochs = 0

    # -------------------------------------------------------------------------- save
    def on_save(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        folder = step_checkpoint_dir(args, state)
        os.makedirs(folder, exist_ok=True)
        writes_optimizer = args.data_parallel_rank == 0 if args.use_hybrid_parallel else args.should_save
        if writes_optimizer or args.should_save:
            tensors, scalars = named_optimizer_state(optimizer.state_dict(), self._names())
        if writes_optimizer:
            save_safetensors(tensors, os.path.join(folder, OPTIMIZER_FILE.format(_shard_suffix(args))))
        if args.should_save:
            scaler = self.scaler.state_dict() if self.scaler is not None else {}
            with atomic_open(os.path.join(folder, SCHEDULER_FILE), "w") as f:
                json.dump(_jsonable({"lr_scheduler": lr_scheduler.state_dict(), "optimizer": scalars,
                                     "grad_scaler": scaler}), f)
        rank = max(args.process_index, 0)
        with atomic_open(os.path.join(folder, RNG_FILE.format(rank)), "w") as f:
            json.dump(capture_rng(with_tracker=args.use_hybrid_parallel), f)
        with atomic_open(os.path.join(folder, self.task.state_file.format(self.task.rank)), "w") as f:
            json.dump(_jsonable(self.task.train_state()), f)
        if args.should_save:  # the Trainer's pickled copy of the RNG states: the JSON files replace it
            for name in os.listdir(folder):
                if _LEGACY_RNG_RE.match(name):
                    os.remove(os.path.join(folder, name))
        if args.world_size > 1:  # every rank's files exist before rank 0 marks the checkpoint complete
            paddle.distributed.barrier()

    # -------------------------------------------------------------------------- restore
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, train_dataloader=None, **kwargs):
        ckpt = getattr(args, "resume_from_checkpoint", None)
        if not ckpt:
            return
        ckpt = str(ckpt)
        saved = read_trainer_state(ckpt)
        for f in dataclasses.fields(TrainerState):
            if f.name not in _RUN_FIELDS:
                setattr(state, f.name, getattr(saved, f.name))
        self._load_optimizer(args, ckpt, optimizer, lr_scheduler)
        task_state = os.path.join(ckpt, self.task.state_file.format(self.task.rank))
        if os.path.isfile(task_state):
            with open(task_state, encoding="utf-8") as f:
                self.task.set_train_state(json.load(f))
        else:
            logger.warning("%s missing: the task's noise stream restarts from the seed", task_state)
        self._rng = self._read_rng(args, ckpt)
        per_epoch = batches_per_epoch(train_dataloader, args)
        self._resumed = resume_position(state.global_step, per_epoch, args) + (per_epoch,)
        self._loop_epochs = 0
        logger.info("resumed training state from %s (step %d)", ckpt, state.global_step)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._loop_epochs += 1

    def on_step_begin(self, args, state, control, **kwargs):
        if self._rng is not None:  # after the batch of this step was loaded, as in an uninterrupted run
            restore_rng(self._rng)
            self._rng = None

    def on_step_end(self, args, state, control, **kwargs):
        # the Trainer counts epochs of this run's loop from 0 (it did not read trainer_state.json):
        # shift its `state.epoch` by the epochs and batches the resumed sampler skipped
        if self._resumed is not None and state.epoch is not None:
            epochs, batches, per_epoch = self._resumed
            state.epoch += epochs + (batches / per_epoch if self._loop_epochs <= 1 else 0.0)

    def _names(self) -> Dict[str, str]:
        """{paddle parameter name: structured name} of every parameter of the task."""
        return {p.name: n for n, p in self.task.named_parameters()}

    def _load_optimizer(self, args, ckpt, optimizer, lr_scheduler) -> None:
        path = os.path.join(ckpt, OPTIMIZER_FILE.format(_shard_suffix(args)))
        sched_path = os.path.join(ckpt, SCHEDULER_FILE)
        if os.path.isfile(path):
            with open(sched_path, encoding="utf-8") as f:
                scalars = json.load(f)
            opt_state = optimizer_state_from_named(load_state_dict(path), scalars["optimizer"], self._names(),
                                                   where=path)
            sched, scaler = scalars["lr_scheduler"], scalars.get("grad_scaler") or {}
        else:
            legacy = os.path.join(ckpt, LEGACY_OPTIMIZER_FILE.format(_shard_suffix(args)))
            if not os.path.isfile(legacy):
                raise FileNotFoundError(f"{ckpt}: no optimizer state ({os.path.basename(path)}) to resume from")
            trained = {p.name: n for n, p in self.task.trainable_parameters().items()}
            opt_state = rename_optimizer_state(read_legacy_state(legacy), _legacy_name_map(ckpt, trained))
            sched = read_legacy_state(os.path.join(ckpt, LEGACY_SCHEDULER_FILE))
            scaler_path = os.path.join(ckpt, LEGACY_SCALER_FILE)
            scaler = read_legacy_state(scaler_path) if os.path.isfile(scaler_path) else {}
            logger.info("%s: optimizer, scheduler and RNG state read from the older pickled files", ckpt)
        optimizer.set_state_dict(opt_state)
        lr_scheduler.set_state_dict(sched)
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict({k: np.asarray(v, np.float32) if k == "scale" else v
                                         for k, v in scaler.items()})

    @staticmethod
    def _read_rng(args, ckpt) -> Optional[dict]:
        rank = max(args.process_index, 0)
        path = os.path.join(ckpt, RNG_FILE.format(rank))
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        dist = os.path.join(ckpt, LEGACY_RNG_FILE_DIST.format(args.world_size))
        if args.world_size > 1 and os.path.isfile(dist):
            return read_legacy_state(dist)[rank]
        single = os.path.join(ckpt, LEGACY_RNG_FILE)
        if args.world_size == 1 and os.path.isfile(single):
            return read_legacy_state(single)
        logger.warning("%s has no RNG state for rank %d: dropout and other global draws restart from the seed",
                       ckpt, rank)
        return None


class CheckpointMarkerCallback(TrainerCallback):
    """Marks a checkpoint complete, then applies `save_total_limit` (default: the argument of the
    same name). Installed LAST by `DiffusionTrainer`: it must run after the other on_save hooks."""

    def __init__(self, save_total_limit: Optional[int] = None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        ckpt = step_checkpoint_dir(args, state)
        if os.path.isdir(ckpt):
            remove_stale_temp_files(ckpt)  # of a killed earlier save of this step; every rank's files are written
            mark_complete(ckpt, state.global_step)
            keep = self.save_total_limit if self.save_total_limit is not None else args.save_total_limit
            rotate_checkpoints(args.output_dir, keep)
