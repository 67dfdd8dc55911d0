"""Data checks behind scripts/check_data.py: one full pass, sharded as training shards it.

- LAION part files: `ldm.data.laion.check_file_list`, tar shards: `ldm.data.tars.check_tars`
  (every (rank, worker) consumer of the iterable dataset simulated in this process;
  `check_stream_source` picks the one a path needs, as the trainers pick their kind).
- Stage C caption folder: `check_folder` below. The folder dataset is map-style; training
  shards it with paddle's DistributedBatchSampler (indices padded to a multiple of world_size,
  rank r takes indices r, r + W, ...) and the DataLoader hands batch b of a rank to worker
  b % num_workers. Images are decoded exactly as `ldm.data.folder.FolderDataset` decodes them.
"""
from __future__ import annotations

from typing import Optional

from ldm.data.laion import check_file_list
from ldm.data.tars import check_tars, is_tar_source
from ldm.data.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

_FOLDER_REASON = {"undecodable": "undecodable", "truncated": "truncated_image", "too_large": "too_large"}


def _folder_record_problem(image: str, caption_path: str, max_pixels, target: int) -> Optional[tuple[str, str]]:
    try:
        with open(caption_path, "rb") as f:
            f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return "non_utf8", f"{caption_path}:1 ({e.reason})"
    try:
        with open(image, "rb") as f:
            data = f.read()
        decode_image(data, max_pixels=max_pixels, target_short_side=target)
    except OSError:
        return "unreadable_image", image
    except ImageDecodeError as e:
        return _FOLDER_REASON.get(e.reason, "undecodable"), image
    return None


def check_stream_source(path: str, **kwargs) -> dict:
    """`check_tars` for tar shards (a tar, a folder of tars, a pattern, a listing of tars), else
    `check_file_list` (LAION part files); kwargs: world_size, num_workers, resolution, max_pixels."""
    return (check_tars if is_tar_source(path) else check_file_list)(path, **kwargs)


def check_folder(
    dataset_path: str,
    world_size: int = 1,
    num_workers: int = 1,
    batch_size: int = 1,
    resolution: int = 768,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> dict:
    """Report for an image/caption folder, in the same shape as check_file_list's."""
    from ldm.data.folder import scan_folder

    if world_size < 1 or num_workers < 1 or batch_size < 1:
        raise ValueError(f"world_size, num_workers, batch_size must be >= 1, got {world_size}, {num_workers}, {batch_size}")
    pairs, missing = scan_folder(dataset_path)
    invalid: dict = {}

    def bad(reason: str, where: str) -> None:
        slot = invalid.setdefault(reason, {"count": 0, "first": where})
        slot["count"] += 1

    for image in missing:
        bad("missing_caption", image)
    ok = []
    for image, caption_path in pairs:
        problem = _folder_record_problem(image, caption_path, max_pixels, resolution)
        if problem is None:
            ok.append(image)
        else:
            bad(*problem)
    # DistributedBatchSampler over the valid samples (the dataset drops or rejects bad ones).
    n = len(ok)
    total = -(-n // world_size) * world_size if n else 0
    per_consumer = []
    for rank in range(world_size):
        counts = [0] * num_workers
        rank_indices = list(range(rank, total, world_size))
        for b in range(0, len(rank_indices), batch_size):
            counts[(b // batch_size) % num_workers] += len(rank_indices[b : b + batch_size])
        for worker in range(num_workers):
            per_consumer.append({"rank": rank, "worker": worker, "records": counts[worker], "valid": counts[worker]})
    return {
        "dataset_path": dataset_path,
        "world_size": world_size,
        "num_workers": num_workers,
        "batch_size": batch_size,
        "records": len(pairs) + len(missing),
        "valid": n,
        "invalid": dict(sorted(invalid.items())),
        "per_consumer": per_consumer,
        "padded_duplicates": total - n,
    }


__all__ = ["check_file_list", "check_tars", "check_stream_source", "check_folder"]
