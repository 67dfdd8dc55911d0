"""LAION-format part-file dataset (the data of the seed's `train_txt2img_laion400m_trainer.py`).

Format (seed stable_diffusion_README.md §3.1): a part file holds one record per line,
`caption \\t placeholder \\t base64(image bytes)`, gzip-compressed or plain. A `.filelist`
lists part files one per line; a `.filelist.list` lists filelists, each line optionally followed
by whitespace and a sampling weight.

Design (issue 2):
- Compression is detected from the magic bytes, never from the file name.
- Whether a file is a part file or a listing is sniffed from its content (`sniff_file_kind`):
  gzip magic -> part file; a plain file is a listing only when its first non-empty lines all
  look like `path` or `path<whitespace>weight`.
- Relative paths in a listing resolve against the working directory first (the seed's demo
  data is written that way), then against the listing's own folder. `create_pretraining_data.py`
  writes absolute paths, which mean the same files from any working directory.
- Sharding is exact: there are K = world_size * num_workers consumers, consumer
  k = rank * num_workers + worker. Per pass, the file entries are put in a deterministic order
  (the same on every consumer); the first `(n // K) * K` entries are dealt out whole
  (entry i goes to consumer i % K), and the records of the remaining `n % K` entries are dealt
  out one by one (global record index j goes to consumer j % K). So in one pass every record is
  read by exactly one consumer, for any number of files, ranks and workers (1 file with
  2 ranks x 4 workers included), and no `--num_repeat` trick is needed. Duplicate lines in a
  filelist (the seed's `--num_repeat`) are simply repeated passes over that file.
- Sampling weights (second column of a `.filelist.list` line, default 1) change the ORDER of
  the file entries in each pass: a deterministic weighted shuffle (Efraimidis-Spirakis keys
  u**(1/w), seeded by (seed, epoch)), so heavier filelists tend to be read earlier. They do not
  change how often a record is read per pass (repeat lines for that). Weight 0 drops a filelist.
- Bad records are skipped and counted by reason (see `INVALID_REASONS`); the first example of
  each reason is kept as `file:line`. A consumer that completes a full pass with zero valid
  records raises `LaionDataError` naming its files instead of spinning.
- Everything random (file order, shuffle buffer, crop, flip) comes from numpy Generators
  seeded by (seed, epoch[, rank, worker]), so the stream is deterministic for a given
  (seed, rank, world_size, worker, num_workers, epoch). Caption dropout and tokenization are not
  done here: they are part of the training step (ldm.data yields raw captions).
"""
from __future__ import annotations

import base64
import binascii
import gzip
import itertools
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import paddle

from ldm.data.spec import DatasetSpec, check_options, register_dataset_kind
from ldm.data.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTransform, decode_image
from ldm.utils import dist_info, get_logger, shorten, special_file_problem

logger = get_logger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
INVALID_REASONS = (
    "too_few_columns",
    "non_utf8",
    "bad_base64",
    "undecodable",
    "truncated_image",
    "too_large",
    "truncated_gzip",
)
_READ_BUFFER = 1 << 20
_ASCII_WS = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() removes
_DECODE_REASON = {"undecodable": "undecodable", "truncated": "truncated_image", "too_large": "too_large"}


class LaionDataError(ValueError):
    """Unusable data: a missing listed file, a bad listing line, or a consumer with no valid record."""


class RecordError(Exception):
    """One bad record; `reason` is one of INVALID_REASONS."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


@dataclass(frozen=True)
class FileEntry:
    path: str  # part file, as it will be opened
    weight: float = 1.0
    source: str = ""  # the listing that named it ("" for a part file given directly)


# --------------------------------------------------------------------------- listings


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_part(path: str):
    """Open a part file for reading bytes, gzip or plain by magic bytes.

    Plain files get a 1 MiB read buffer: records are ~100 KB lines, which an 8 KiB buffer
    assembles from a dozen reads each.
    """
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb", buffering=_READ_BUFFER)


_SNIFF_BYTES = 65536
_SNIFF_LINES = 8
MAX_LISTING_LINE = 4096  # PATH_MAX on Linux: a longer line is no path (issue 12 item 5)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _listing_like(line: str, listing: str) -> bool:
    """True for a line a listing may hold: a comment, `path`, or `path<whitespace>number`.

    A path containing whitespace (no weight) only counts when it names an existing file, so a
    broken part-file line such as `broken line without tabs` is not taken for a listing line.
    """
    if line.startswith("#"):
        return True
    if len(line) > MAX_LISTING_LINE:
        return False  # e.g. a record whose caption alone fills the sniffed bytes
    if line.count("\t") >= 2:
        return False  # caption \t placeholder \t base64: a record
    parts = line.rsplit(None, 1)
    path = parts[0] if len(parts) == 2 and _is_number(parts[1]) else line
    if not any(c.isspace() for c in path):
        return True
    candidates = [os.path.expanduser(path), os.path.join(os.path.dirname(os.path.abspath(listing)), path)]
    return any(os.path.isfile(c) for c in candidates)


def sniff_file_kind(path: str) -> str:
    """The kind of a file given or listed: "part", "listing" or "empty", from the content only (never the file name).

    gzip magic -> part file. Otherwise the first few non-empty lines are looked at: a listing has
    only listing-like lines (`path`, `path<whitespace>weight`, `# comment`); anything else - a
    record with >= 3 tab-separated columns, or a line that is neither - makes it a part file,
    whose bad lines are then counted as `too_few_columns` like any other bad record. A line
    longer than MAX_LISTING_LINE, or a first line that does not end within the sniffed 64 KiB,
    is no path, so such a file is a part file too (issue 12 item 5).
    """
    if is_gzip(path):
        return "part"
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    lines = head.split(b"\n")
    if len(head) == _SNIFF_BYTES:
        if len(lines) == 1:
            return "part"  # no line end in 64 KiB: not a listing of paths (a record with a huge caption)
        lines = lines[:-1]  # the last line may be cut by the read size
    sniffed = [ln.strip() for ln in lines if ln.strip()][:_SNIFF_LINES]
    if not sniffed:
        return "empty"
    for raw in sniffed:
        if not _listing_like(raw.decode("utf-8", errors="replace"), path):
            return "part"
    return "listing"


def resolve_listed_path(entry: str, listing: str, lineno: Optional[int] = None) -> str:
    """Working directory first, then the listing's own folder (issue 2). A missing file, or one
    that is not a regular file (a FIFO, /dev/zero: reading it would hang), is a LaionDataError
    naming the listing and its line (issue 12 items 6, 9)."""
    where = f"{listing}:{lineno}" if lineno else listing
    entry = os.path.expanduser(entry)
    if os.path.isabs(entry):
        if not os.path.lexists(entry):
            raise LaionDataError(f"{where}: listed file {shorten(entry)!r} not found")
        found = entry
    elif os.path.exists(entry):
        found = entry
    else:
        beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(listing)), entry))
        if not os.path.exists(beside):
            raise LaionDataError(
                f"{where}: listed file {shorten(entry)!r} not found "
                f"(tried {shorten(os.path.abspath(entry))} and {shorten(beside)})"
            )
        found = beside
    problem = special_file_problem(found)
    if problem:
        raise LaionDataError(f"{where}: listed {shorten(problem)}")
    return found


def _parse_listing_line(line: str, listing: str, lineno: int) -> tuple[str, float]:
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        try:
            weight = float(parts[1])
        except ValueError:
            return line, 1.0  # a path containing whitespace, no weight
        if not np.isfinite(weight) or weight < 0:
            raise LaionDataError(
                f"{listing}:{lineno}: sampling weight must be finite and >= 0, got {shorten(parts[1])!r}"
            )
        return parts[0], weight
    return line, 1.0


def read_listing(listing: str) -> list[tuple[str, float, int]]:
    """(resolved path, weight, line number) of each non-empty, non-comment line."""
    out = []
    with open(listing, "r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            path, weight = _parse_listing_line(line, listing, lineno)
            out.append((resolve_listed_path(path, listing, lineno), weight, lineno))
    return out


def expand_file_list(file_list: str) -> list[FileEntry]:
    """Part-file entries of a `.filelist.list`, a `.filelist` or a single part file.

    A listing's entries may be part files or listings themselves (one level of nesting, as in
    `.filelist.list` -> `.filelist` -> parts); the kind of each file is sniffed from its content.
    Weights multiply down the levels.
    """
    problem = special_file_problem(file_list)
    if problem:
        raise LaionDataError(f"file list {problem}")
    if not os.path.isfile(file_list):
        raise LaionDataError(f"file list {file_list!r} does not exist")
    kinds: dict[str, str] = {}

    def expand(path: str, weight: float, source: str, depth: int) -> list[FileEntry]:
        if path not in kinds:
            kinds[path] = sniff_file_kind(path)
        if kinds[path] == "empty" and depth == 0:
            raise LaionDataError(f"file list {file_list!r} is empty")
        if kinds[path] != "listing":  # a part file; an empty listed file is a part with no record
            return [FileEntry(path, weight, source)]
        if depth >= 2:
            raise LaionDataError(f"{path}: listings nest deeper than .filelist.list -> .filelist -> part files")
        entries: list[FileEntry] = []
        for child, w, _ in read_listing(path):
            if w * weight > 0:
                entries.extend(expand(child, w * weight, path, depth + 1))
        return entries

    entries = expand(file_list, 1.0, "", 0)
    if not entries:
        raise LaionDataError(f"{file_list}: lists no part file (empty, or every weight is 0)")
    return entries


def pass_order(entries: list[FileEntry], seed: int, epoch: int, shuffle: bool) -> list[FileEntry]:
    """The order of the file entries for one pass: identical on every consumer."""
    if not shuffle:
        return list(entries)
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    u = rng.random(len(entries))
    w = np.array([e.weight for e in entries], dtype=np.float64)
    keys = np.log(np.maximum(u, 1e-300)) / w  # Efraimidis-Spirakis: larger key first
    return [entries[i] for i in np.argsort(-keys, kind="stable")]


# --------------------------------------------------------------------------- records


def _b64decode_strict(data) -> bytes:
    """base64.b64decode(data, validate=True), minus its copy of memoryview input (Python >= 3.11)."""
    return binascii.a2b_base64(data, strict_mode=True)


try:
    binascii.a2b_base64(b"", strict_mode=True)
except TypeError:  # pragma: no cover - Python < 3.11: b64decode(validate=True) checks with a regex

    def _b64decode_strict(data) -> bytes:  # noqa: F811
        return base64.b64decode(bytes(data), validate=True)


def parse_record(raw: bytes) -> tuple[str, bytes]:
    """(caption, image bytes) of one part-file line; raises RecordError.

    Same result as ``cols = raw.rstrip(b"\r\n").split(b"\t")``, ``cols[0]`` as the caption and
    ``base64.b64decode(cols[2].strip(), validate=True)`` as the image, but the ~100 KB base64
    column is decoded in place (a memoryview of the line) instead of being copied three times.
    """
    t1 = raw.find(b"\t")
    t2 = raw.find(b"\t", t1 + 1) if t1 >= 0 else -1
    if t2 < 0:
        n_cols = len(raw.rstrip(b"\r\n").split(b"\t"))
        raise RecordError("too_few_columns", f"{n_cols} column(s), need caption\\tplaceholder\\tbase64")
    try:
        caption = raw[:t1].decode("utf-8")
    except UnicodeDecodeError:
        try:
            caption = raw[:t1].decode("gb18030")
        except UnicodeDecodeError:
            raise RecordError("non_utf8", "caption is neither UTF-8 nor GB18030") from None
    start = t2 + 1
    end = raw.find(b"\t", start)
    if end < 0:
        end = len(raw)
    while start < end and raw[start] in _ASCII_WS:  # cols[2].strip()
        start += 1
    while end > start and raw[end - 1] in _ASCII_WS:
        end -= 1
    if start == end:
        raise RecordError("bad_base64", "empty image column")
    try:
        data = _b64decode_strict(memoryview(raw)[start:end])
    except (binascii.Error, ValueError) as e:
        raise RecordError("bad_base64", str(e)) from None
    if not data:
        raise RecordError("bad_base64", "empty image column")
    return caption, data


def decode_record_image(
    data: bytes, max_pixels: Optional[int], target_short_side: Optional[int], as_array: bool = False
):
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
    first_example: dict = field(default_factory=dict)  # reason -> "file:line"
    files: list = field(default_factory=list)  # distinct part files this consumer read

    def add_invalid(self, reason: str, where: str) -> None:
        self.invalid[reason] = self.invalid.get(reason, 0) + 1
        self.first_example.setdefault(reason, where)


def iter_consumer_lines(
    order: list[FileEntry], consumer: int, num_consumers: int, stats: ConsumerStats
) -> Iterator[tuple[str, int, bytes]]:
    """(path, line number, raw line) of this consumer's share of one pass (see module doc).

    A gzip stream that ends early counts as one `truncated_gzip` record at the line after the
    last complete one (owned by the same rule as any other record).
    """
    n_whole = (len(order) // num_consumers) * num_consumers
    mine = [(e.path, False) for i, e in enumerate(order[:n_whole]) if i % num_consumers == consumer]
    mine += [(e.path, True) for e in order[n_whole:]]
    seen = set()
    j = 0  # global record index over the record-shared tail entries
    for path, shared in mine:
        if path not in seen:
            seen.add(path)
            stats.files.append(path)
        lineno = 0
        try:
            with open_part(path) as fh:
                for raw in fh:
                    lineno += 1
                    if len(raw) < 64 and not raw.strip():
                        continue  # blank lines are not records
                    if shared:
                        j += 1
                        if (j - 1) % num_consumers != consumer:
                            continue
                    yield path, lineno, raw
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            owned = True
            if shared:
                j += 1
                owned = (j - 1) % num_consumers == consumer
            if owned:
                stats.records += 1
                stats.add_invalid("truncated_gzip", f"{path}:{lineno + 1}")
                logger.warning("%s:%d: gzip stream ends early (%s); rest of the file skipped", path, lineno + 1, e)


# --------------------------------------------------------------------------- dataset


class LaionDataset(paddle.io.IterableDataset):
    """Streams (image, caption) samples from LAION-format part files; see the module doc.

    Args:
        file_list: a `.filelist.list`, a `.filelist`, or a single part file.
        resolution: output side R; images are short-side resized (small ones upscaled) and
            cropped to R x R.
        normalize: "minus_one_one" (default, [-1, 1]) or "zero_one" ([0, 1]); see ldm.data.transforms.
        center_crop / random_flip: crop mode and horizontal flip (ldm.data.transforms).
        seed: base seed; epoch, rank and worker are mixed in.
        infinite: True repeats passes forever (Trainer with max_steps); False reads one pass.
        rank / world_size: default from ldm.utils.dist_info().
        max_pixels: decompression-bomb guard (None disables it).
        shuffle_files: per-pass weighted shuffle of file entries (False keeps listing order).
        shuffle_buffer: size of a reservoir of raw lines shuffled before decoding (0 = off;
            records then come in file order).

    Yields the samples of `ldm.data.spec`: "pixel_values" float32 ndarray [3, R, R], "caption" str
    (as stored: tokenization and caption dropout belong to the training step). Batch them with
    `ldm.data.collate`. Inside a DataLoader, worker id / count come from paddle.io.get_worker_info();
    `iter_consumer(worker, num_workers)` runs one consumer explicitly (tests, check_data).
    `self.stats` holds the counts of the latest pass run in this process.

    With paddlenlp's Trainer, do NOT let it wrap this dataset in IterableDatasetShard (it does so
    when dataset_world_size > 1): this dataset already shards by rank, and the wrapper would keep
    only every world_size-th batch of each rank's share.
    """

    def __init__(
        self,
        file_list: str,
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
        self.file_list = file_list
        self.entries = expand_file_list(file_list)
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
                f"file list {self.file_list}"
            )
        raise LaionDataError(
            f"{where}: a full pass over {stats.records} record(s) gave no valid sample "
            f"(invalid: {stats.invalid}, first examples: {stats.first_example}); "
            f"files: {stats.files}; file list {self.file_list}. If the data set has fewer valid records than "
            f"the {consumers} consumers ({self.world_size} rank(s) x {num_workers} DataLoader worker(s)), {advice}"
        )

    def _iter_pass(self, worker, num_workers, epoch, stats: ConsumerStats, decode_only: bool):
        consumer = self.rank * num_workers + worker
        num_consumers = self.world_size * num_workers
        order = pass_order(self.entries, self.seed, epoch, self.shuffle_files)
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, worker, num_workers])
        lines = iter_consumer_lines(order, consumer, num_consumers, stats)
        if self.shuffle_buffer > 0:
            lines = _buffer_shuffle(lines, self.shuffle_buffer, rng)
        for path, lineno, raw in lines:
            stats.records += 1
            try:
                caption, data = parse_record(raw)
                img = decode_record_image(
                    data, self.max_pixels, self.resolution, as_array=self.transform.prefers_array
                )
            except RecordError as e:
                stats.add_invalid(e.reason, f"{path}:{lineno}")
                continue
            stats.valid += 1
            if decode_only:
                yield None
                continue
            yield {"pixel_values": self.transform(img, rng), "caption": caption}  # float32 [3, R, R]


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


LAION_OPTIONS = ("infinite", "max_pixels", "shuffle_files", "shuffle_buffer")


def build_laion_dataset(spec: DatasetSpec, rank: Optional[int] = None, world_size: Optional[int] = None) -> LaionDataset:
    """Dataset kind "laion": `spec.path` is a `.filelist.list`, a `.filelist` or a part file;
    `spec.options` may hold LAION_OPTIONS (LaionDataset's arguments of those names). The dataset
    shards itself over rank x DataLoader worker (rank / world_size default to dist_info())."""
    height, width = spec.size
    if height != width:
        raise ValueError(f"dataset kind 'laion' makes square crops; got resolution {spec.resolution}")
    return LaionDataset(
        spec.path, resolution=height, normalize=spec.normalize, center_crop=spec.center_crop,
        random_flip=spec.random_flip, seed=spec.seed, rank=rank, world_size=world_size,
        **check_options(spec, LAION_OPTIONS),
    )


register_dataset_kind("laion", build_laion_dataset)


def check_file_list(
    file_list: str,
    world_size: int = 1,
    num_workers: int = 1,
    resolution: int = 256,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    seed: int = 0,
    epoch: int = 0,
) -> dict:
    """One full pass of every (rank, worker) consumer, simulated in this process, sharded
    exactly as training shards it. Returns the report printed by scripts/check_data.py; the
    "first" example of each invalid reason is the earliest one in the pass (file order, line)."""
    if world_size < 1 or num_workers < 1:
        raise ValueError(f"world_size and num_workers must be >= 1, got {world_size}, {num_workers}")
    per_consumer, invalid, all_files = [], {}, set()
    records = valid = 0
    position: dict = {}  # part file -> first position in this pass, for "first example"

    def first_key(where: str):
        path, line = where.rsplit(":", 1)
        return position.get(path, len(position)), int(line)

    for rank in range(world_size):
        ds = LaionDataset(
            file_list, resolution=resolution, seed=seed, infinite=False, rank=rank,
            world_size=world_size, max_pixels=max_pixels,
        )
        if not position:
            for e in pass_order(ds.entries, seed, epoch, ds.shuffle_files):
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
        "file_list": file_list,
        "world_size": world_size,
        "num_workers": num_workers,
        "part_files": len(all_files),
        "file_entries": len(ds.entries),
        "records": records,
        "valid": valid,
        "invalid": dict(sorted(invalid.items())),
        "per_consumer": per_consumer,
        "consumers_without_valid": sum(1 for c in per_consumer if c["valid"] == 0),
    }
