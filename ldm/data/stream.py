"""The sharded record stream behind the file-based iterable kinds ("laion" part files, "tars" shards).

A stream is a list of file entries (`FileEntry`) whose records are read in order; a kind supplies
two hooks, `read_file(path)` (the records of one file, with their 1-based position in it) and
`parse_record(record)` (caption and image bytes of one record, or `RecordError`). Everything else
is here, written once:

- Sharding is exact: there are K = world_size * num_workers consumers, consumer
  k = rank * num_workers + worker. Per pass, the file entries are put in a deterministic order
  (the same on every consumer); the first `(n // K) * K` entries are dealt out whole
  (entry i goes to consumer i % K), and the records of the remaining `n % K` entries are dealt
  out one by one (global record index j goes to consumer j % K). So in one pass every record is
  read by exactly one consumer, for any number of files, ranks and workers (1 file with
  2 ranks x 4 workers included). Duplicate entries are simply repeated passes over that file.
- Sampling weights change the ORDER of the file entries in each pass: a deterministic weighted
  shuffle (Efraimidis-Spirakis keys u**(1/w), "Weighted random sampling with a reservoir",
  Inf. Process. Lett. 97(5), 2006), seeded by (seed, epoch), so heavier entries tend to be read
  earlier. They do not change how often a record is read per pass.
- Bad records are skipped and counted by reason; the first example of each reason is kept as
  `file:position` (line number of a part file, sample number of a tar shard). A file that ends
  early (`TruncatedFile`) counts as one record of the kind's truncation reason at the position
  after its last complete record, owned by the same dealing rule as any other record. A
  consumer that completes a full pass with zero valid records raises `LaionDataError` naming
  its files instead of spinning.
- Resume (`set_start`): the consumed samples of each consumer are read again and dropped (their
  random draws included), so a resumed stream continues at the exact sample, mid-file too.
- Everything random (file order, shuffle buffer, crop, flip) comes from numpy Generators
  seeded by (seed, epoch[, rank, worker]), so the stream is deterministic for a given
  (seed, rank, world_size, worker, num_workers, epoch). Caption dropout and tokenization are not
  done here: they are part of the training step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

import numpy as np
import paddle

from ldm.data.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTransform, decode_image
from ldm.utils import dist_info, get_logger

logger = get_logger(__name__)

_DECODE_REASON = {"undecodable": "undecodable", "truncated": "truncated_image", "too_large": "too_large"}

__all__ = ["LaionDataError", "RecordError", "TruncatedFile", "FileEntry", "ConsumerStats", "pass_order",
           "deal_records", "decode_record_image", "ShardedStream", "check_stream", "stream_kwargs"]


class LaionDataError(ValueError):
    """Unusable stream data: a missing listed file, a bad listing line, or a consumer with no valid
    record. The one error of every sharded stream (LAION part files and tar shards alike); the name
    predates the tar kind and is kept (callers and scripts/check_data.py reports name it)."""


class RecordError(Exception):
    """One bad record; `reason` is one of the kind's invalid reasons."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


class TruncatedFile(Exception):
    """Raised by a kind's `read_file` when the file ends early: `reason` (e.g. "truncated_gzip",
    "truncated_tar") and `position`, the record position after the last complete record."""

    def __init__(self, reason: str, position: int, message: str = ""):
        super().__init__(message or reason)
        self.reason, self.position = reason, int(position)


@dataclass(frozen=True)
class FileEntry:
    path: str  # the file, as it will be opened
    weight: float = 1.0
    source: str = ""  # the listing that named it ("" for a file given directly)
    kind: str = "part"  # what the file holds, sniffed from its content: "part" (LAION lines) or "tar"


def pass_order(entries: List[FileEntry], seed: int, epoch: int, shuffle: bool) -> List[FileEntry]:
    """The order of the file entries for one pass: identical on every consumer."""
    if not shuffle:
        return list(entries)
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    u = rng.random(len(entries))
    w = np.array([e.weight for e in entries], dtype=np.float64)
    keys = np.log(np.maximum(u, 1e-300)) / w  # Efraimidis-Spirakis: larger key first
    return [entries[i] for i in np.argsort(-keys, kind="stable")]


def decode_record_image(
    data: bytes, max_pixels: Optional[int], target_short_side: Optional[int], as_array: bool = False
):
    """`ldm.data.transforms.decode_image`, its failure as a RecordError (undecodable /
    truncated_image / too_large)."""
    try:
        return decode_image(data, max_pixels=max_pixels, target_short_side=target_short_side, as_array=as_array)
    except ImageDecodeError as e:
        raise RecordError(_DECODE_REASON.get(e.reason, "undecodable"), str(e)) from None


@dataclass
class ConsumerStats:
    """Counts of one consumer's pass (records = valid + sum(invalid))."""

    rank: int = 0
    worker: int = 0
    records: int = 0
    valid: int = 0
    invalid: dict = field(default_factory=dict)  # reason -> count
    first_example: dict = field(default_factory=dict)  # reason -> "file:position"
    files: list = field(default_factory=list)  # distinct files this consumer read

    def add_invalid(self, reason: str, where: str) -> None:
        self.invalid[reason] = self.invalid.get(reason, 0) + 1
        self.first_example.setdefault(reason, where)


ReadFile = Callable[[str], Iterator[tuple]]  # path -> (position, record), may raise TruncatedFile


def deal_records(order: List[FileEntry], consumer: int, num_consumers: int, stats: ConsumerStats,
                 read_file: ReadFile) -> Iterator[tuple]:
    """(path, position, record) of this consumer's share of one pass (see the module doc)."""
    n_whole = (len(order) // num_consumers) * num_consumers
    mine = [(e.path, False) for i, e in enumerate(order[:n_whole]) if i % num_consumers == consumer]
    mine += [(e.path, True) for e in order[n_whole:]]
    seen = set()
    j = 0  # global record index over the record-shared tail entries
    for path, shared in mine:
        if path not in seen:
            seen.add(path)
            stats.files.append(path)
        try:
            for position, record in read_file(path):
                if shared:
                    j += 1
                    if (j - 1) % num_consumers != consumer:
                        continue
                yield path, position, record
        except TruncatedFile as e:
            owned = True
            if shared:
                j += 1
                owned = (j - 1) % num_consumers == consumer
            if owned:
                stats.records += 1
                stats.add_invalid(e.reason, f"{path}:{e.position}")
                logger.warning("%s:%d: %s (%s); rest of the file skipped", path, e.position, e.reason, e)


class ShardedStream(paddle.io.IterableDataset):
    """Streams (image, caption) samples from file entries; see the module doc. Subclasses set
    `self.entries` (before calling this constructor) and implement `read_file` and `parse_record`.

    Args:
        source: what the entries came from (named in messages).
        resolution: output side R; images are short-side resized (small ones upscaled) and
            cropped to R x R.
        normalize: "minus_one_one" (default, [-1, 1]) or "zero_one" ([0, 1]); see ldm.data.transforms.
        center_crop / random_flip: crop mode and horizontal flip (ldm.data.transforms).
        seed: base seed; epoch, rank and worker are mixed in.
        infinite: True repeats passes forever (Trainer with max_steps); False reads one pass.
        rank / world_size: default from ldm.utils.dist_info().
        max_pixels: decompression-bomb guard (None disables it).
        shuffle_files: per-pass weighted shuffle of file entries (False keeps listing order).
        shuffle_buffer: size of a reservoir of raw records shuffled before decoding (0 = off;
            records then come in file order).

    Yields the samples of `ldm.data.spec`: "pixel_values" uint8 ndarray [R, R, 3], "caption" str.
    Inside a DataLoader, worker id / count come from paddle.io.get_worker_info();
    `iter_consumer(worker, num_workers)` runs one consumer explicitly (tests, check_data).
    `self.stats` holds the counts of the latest pass run in this process.

    With paddlenlp's Trainer, do NOT let it wrap this dataset in IterableDatasetShard (it does so
    when dataset_world_size > 1): this dataset already shards by rank, and the wrapper would keep
    only every world_size-th batch of each rank's share.
    """

    entries: List[FileEntry]

    def __init__(
        self,
        source: str,
        resolution: int = 256,
        normalize: str = "minus_one_one",
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        infinite: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
        shuffle_files: bool = True,
        shuffle_buffer: int = 0,
    ):
        super().__init__()
        if resolution <= 0:
            raise ValueError(f"resolution must be > 0, got {resolution}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if (rank is None) != (world_size is None):
            d_rank, d_world = dist_info()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        elif rank is None:
            rank, world_size = dist_info()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.file_list = source  # what the entries came from, as given (a file list, a tar, a folder, a pattern)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.infinite = bool(infinite)
        self.rank, self.world_size = int(rank), int(world_size)
        self.max_pixels = max_pixels
        self.shuffle_files = bool(shuffle_files)
        self.shuffle_buffer = int(shuffle_buffer)
        self.transform = ImageTransform(
            self.resolution, center_crop=center_crop, random_flip=random_flip, normalize=normalize
        )
        self.epoch = 0
        self.start_batches, self.batch_size = 0, 1  # set_start
        self.stats: Optional[ConsumerStats] = None  # the latest pass of this process's consumer

    # -- the kind's hooks
    def read_file(self, path: str) -> Iterator[tuple]:
        """(position, record) of every record of `path`; raises TruncatedFile when it ends early."""
        raise NotImplementedError

    def parse_record(self, record) -> tuple:
        """(caption, image bytes) of one record; raises RecordError."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, batches: int, batch_size: int) -> None:
        """Resume (issue 12): this rank's DataLoader already consumed `batches` batches of
        `batch_size` from this stream. A DataLoader takes batch k from worker k % num_workers, so
        worker w of the resumed loader continues consumer (w + batches) % num_workers at its
        position: the batches then come exactly as in an uninterrupted run. The consumed samples
        are read again and dropped (their random draws included)."""
        if batches < 0 or batch_size < 1:
            raise ValueError(f"need batches >= 0 and batch_size >= 1, got {batches}, {batch_size}")
        self.start_batches, self.batch_size = int(batches), int(batch_size)

    # -- iteration
    def __iter__(self):
        info = paddle.io.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.start_batches:
            return self.iter_consumer(worker, num_workers)
        done = self.start_batches
        worker = (worker + done) % num_workers
        consumed = (done // num_workers + (1 if worker < done % num_workers else 0)) * self.batch_size
        return itertools.islice(self.iter_consumer(worker, num_workers), consumed, None)

    def iter_consumer(self, worker: int = 0, num_workers: int = 1, epoch: Optional[int] = None) -> Iterator[dict]:
        """Samples of consumer (self.rank, worker); one pass, or forever when `infinite`."""
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ValueError(f"need 0 <= worker < num_workers, got worker={worker} num_workers={num_workers}")
        epoch = self.epoch if epoch is None else int(epoch)
        while True:
            stats = ConsumerStats(rank=self.rank, worker=worker)
            self.stats = stats
            yield from self._iter_pass(worker, num_workers, epoch, stats, decode_only=False)
            self._check_pass(stats, num_workers)
            if not self.infinite:
                return
            epoch += 1

    def scan_consumer(self, worker: int, num_workers: int, epoch: Optional[int] = None) -> ConsumerStats:
        """One pass of consumer (self.rank, worker) that decodes every image exactly as training
        does but skips the resize/crop; returns its counts and never raises on bad data."""
        epoch = self.epoch if epoch is None else int(epoch)
        stats = ConsumerStats(rank=self.rank, worker=worker)
        for _ in self._iter_pass(worker, num_workers, epoch, stats, decode_only=True):
            pass
        return stats

    def _check_pass(self, stats: ConsumerStats, num_workers: int) -> None:
        if stats.valid > 0:
            return
        where = f"rank {self.rank}/{self.world_size}, worker {stats.worker}/{num_workers}"
        consumers = self.world_size * num_workers
        if stats.records == 0 and not self.infinite:
            logger.warning("%s: no record fell to this consumer in %s", where, self.file_list)
            return
        advice = (
            "use fewer DataLoader workers (--dataloader_num_workers) or ranks, or more data "
            "(scripts/check_data.py shows how the records are split)"
        )
        if stats.records == 0:
            raise LaionDataError(
                f"{where}: no record fell to this consumer in a full pass: the data set has fewer records than "
                f"the {consumers} consumers ({self.world_size} rank(s) x {num_workers} DataLoader worker(s)), "
                f"each record going to exactly one of them (or this consumer's files are empty); {advice}; "
                f"data {self.file_list}"
            )
        raise LaionDataError(
            f"{where}: a full pass over {stats.records} record(s) gave no valid sample "
            f"(invalid: {stats.invalid}, first examples: {stats.first_example}); "
            f"files: {stats.files}; data {self.file_list}. If the data set has fewer valid records than "
            f"the {consumers} consumers ({self.world_size} rank(s) x {num_workers} DataLoader worker(s)), {advice}"
        )

    def _iter_pass(self, worker, num_workers, epoch, stats: ConsumerStats, decode_only: bool):
        consumer = self.rank * num_workers + worker
        num_consumers = self.world_size * num_workers
        order = pass_order(self.entries, self.seed, epoch, self.shuffle_files)
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, worker, num_workers])
        records = deal_records(order, consumer, num_consumers, stats, self.read_file)
        if self.shuffle_buffer > 0:
            records = _buffer_shuffle(records, self.shuffle_buffer, rng)
        for path, position, record in records:
            stats.records += 1
            try:
                caption, data = self.parse_record(record)
                img = decode_record_image(
                    data, self.max_pixels, self.resolution, as_array=self.transform.prefers_array
                )
            except RecordError as e:
                stats.add_invalid(e.reason, f"{path}:{position}")
                continue
            stats.valid += 1
            if decode_only:
                yield None
                continue
            yield {"pixel_values": self.transform(img, rng), "caption": caption}  # uint8 [R, R, 3]


def stream_kwargs(spec, rank: Optional[int], world_size: Optional[int]) -> dict:
    """The `ShardedStream` arguments a `DatasetSpec` gives (its kind's options aside); streams make
    square crops, so a (height, width) resolution with height != width is a ValueError."""
    height, width = spec.size
    if height != width:
        raise ValueError(f"dataset kind {spec.kind!r} makes square crops; got resolution {spec.resolution}")
    return dict(resolution=height, normalize=spec.normalize, center_crop=spec.center_crop,
                random_flip=spec.random_flip, seed=spec.seed, rank=rank, world_size=world_size)


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        buf[i], item = item, buf[i]
        yield item
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def check_stream(make_rank: Callable[[int], ShardedStream], world_size: int, num_workers: int, epoch: int = 0) -> dict:
    """One full pass of every (rank, worker) consumer, simulated in this process, sharded exactly
    as training shards it; `make_rank(rank)` builds the one-pass (infinite=False) stream of a
    rank. Returns the counts of the report printed by scripts/check_data.py; the "first" example
    of each invalid reason is the earliest one in the pass (file order, position)."""
    if world_size < 1 or num_workers < 1:
        raise ValueError(f"world_size and num_workers must be >= 1, got {world_size}, {num_workers}")
    per_consumer, invalid, all_files = [], {}, set()
    records = valid = 0
    position: dict = {}  # file -> first position in this pass, for "first example"

    def first_key(where: str):
        path, pos = where.rsplit(":", 1)
        return position.get(path, len(position)), int(pos)

    ds = None
    for rank in range(world_size):
        ds = make_rank(rank)
        if not position:
            for e in pass_order(ds.entries, ds.seed, epoch, ds.shuffle_files):
                position.setdefault(e.path, len(position))
        for worker in range(num_workers):
            st = ds.scan_consumer(worker, num_workers, epoch=epoch)
            records += st.records
            valid += st.valid
            all_files.update(st.files)
            per_consumer.append({"rank": rank, "worker": worker, "records": st.records, "valid": st.valid})
            for reason, count in st.invalid.items():
                where = st.first_example[reason]
                slot = invalid.setdefault(reason, {"count": 0, "first": where})
                slot["count"] += count
                if first_key(where) < first_key(slot["first"]):
                    slot["first"] = where
    return {
        "world_size": world_size,
        "num_workers": num_workers,
        "files": len(all_files),
        "file_entries": len(ds.entries),
        "records": records,
        "valid": valid,
        "invalid": dict(sorted(invalid.items())),
        "per_consumer": per_consumer,
        "consumers_without_valid": sum(1 for c in per_consumer if c["valid"] == 0),
    }
