"""Crash-safe checkpoints on top of the PaddleNLP Trainer's `checkpoint-<step>/` folders.

A checkpoint counts only once `checkpoint_complete.json` exists in it. The marker is written
(atomically) by `CheckpointMarkerCallback.on_save`, which runs after the Trainer and every earlier
callback (the EMA one included) have written their files. A run killed mid-save leaves a folder
without the marker; `find_resume_checkpoint` skips it and returns the previous complete one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

from paddlenlp.trainer import TrainerCallback

from ldm.utils import atomic_open, get_logger

logger = get_logger("ldm.train.checkpoint")

__all__ = ["COMPLETE_MARKER", "mark_complete", "is_complete", "list_checkpoints", "find_resume_checkpoint",
           "resolve_resume", "rotate_checkpoints", "CheckpointMarkerCallback"]

COMPLETE_MARKER = "checkpoint_complete.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    """Newest complete checkpoint in output_dir (incomplete newer ones are skipped with a warning)."""
    for step, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
        logger.warning("skipping incomplete checkpoint %s (no %s: the save was interrupted)", path, COMPLETE_MARKER)
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


class CheckpointMarkerCallback(TrainerCallback):
    """Marks a checkpoint complete, then applies save_total_limit. Add it LAST (it must run after
    the other on_save hooks); the Trainer's own rotation is disabled in DiffusionTrainer."""

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            mark_complete(ckpt, state.global_step)
            rotate_checkpoints(args.output_dir, args.save_total_limit)
