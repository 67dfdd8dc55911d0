"""Offline conversion of a caption/image jsonl, tar shards or parquet files into LAION-format part files.

Follows the seed's `create_pretraining_data.py` (stable_diffusion_README.md §3.1): every jsonl
line `{"caption": ..., "image": "relative/or/absolute/path.jpg", ...}` becomes one part-file line
`caption \\t NONE \\t base64(original image bytes)`. The input may also be img2dataset output
(issue 15 item 2; `input_kind` tells them apart by content, never by file name):

- webdataset tar shards: a tar, a folder of tars, a pattern (``shards/{00000..00099}.tar``) or a
  listing of tars, read as the "tar" dataset kind reads them (`ldm.data.tars.read_shard` /
  `parse_sample`: the image of each key, its ``.txt`` or the ``caption_key`` field of its ``.json``);
- parquet files (a file, a folder of ``*.parquet`` or a pattern) with the image bytes in column
  ``image_column`` (binary, or a struct with a ``bytes`` field as Hugging Face datasets store
  images) and the caption in ``caption_column``, read in row batches with pyarrow (img2dataset's
  ``--output_format parquet`` writes ``jpg`` and ``caption``; rows without image bytes - failed
  downloads - are skipped as ``no_image``).

The same images give the same part files from any of the three inputs (the bytes are kept as
they are). Paths with a scheme (s3://, ...) open through fsspec (`ldm.data.fsio`). Output layout,
as in the seed:

    OUT/filelist/NAME.filelist          part files, one per line (x num_repeat)
    OUT/filelist/NAME.filelist.list     NAME.filelist
    OUT/laion400m_format_data/part-000001[.gz]

Differences from the seed (issue 2):
- the jsonl is streamed; images are read and verified by a bounded process pool (at most
  `4 * num_workers` lines in flight), results are written in input order;
- each part is written to a temporary name and renamed when complete; the filelists are written
  only after every part succeeded;
- filelist lines are ABSOLUTE paths (in both NAME.filelist and NAME.filelist.list): the reader
  resolves a relative line against the working directory first (the seed's demo data needs
  that), so a relative line such as `custom_dataset.filelist` could silently pick up another
  dataset's file of the same name in the working directory; absolute lines work from any
  working directory and always mean this run's files;
- at the start of a run the NAME.filelist / NAME.filelist.list of the same `output_name` are
  removed (a re-run replaces part files, and a failed re-run must not leave filelists that list
  a mix of old and new parts): filelists only ever describe a complete run;
- tabs, CR and LF inside captions become spaces so a record can never break;
- image paths resolve against the jsonl's folder (then the working directory);
- every image must decode (ldm.data.transforms.decode_image) before it is included; bad json
  lines, missing keys and missing, unreadable or undecodable images are skipped, logged with
  their jsonl line number and counted.
"""
from __future__ import annotations

import base64
import collections
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ldm.data import fsio
from ldm.data.stream import RecordError, TruncatedFile
from ldm.data.tars import expand_pattern, expand_tar_source, is_pattern, is_tar_source, parse_sample, read_shard
from ldm.data.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from ldm.utils import atomic_open, get_logger

logger = get_logger(__name__)

PLACEHOLDER = "NONE"
PART_DIR = "laion400m_format_data"
FILELIST_DIR = "filelist"
PARQUET_MAGIC = b"PAR1"  # Apache Parquet: a file starts and ends with these 4 bytes (parquet-format spec)
SKIP_REASONS = (
    "bad_json",
    "missing_key",
    "no_image",
    "no_caption",
    "non_utf8",
    "truncated_tar",
    "missing_image",
    "unreadable_image",
    "undecodable",
    "truncated_image",
    "too_large",
)
_CAPTION_BREAKS = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


def clean_caption(caption: str) -> str:
    """Tabs, CR and LF -> spaces: a record always stays one line with three columns."""
    return caption.translate(_CAPTION_BREAKS)


@dataclass
class PrepareResult:
    written: int = 0
    parts: list = field(default_factory=list)  # absolute part paths, in order
    skipped: dict = field(default_factory=dict)  # reason -> count
    filelist: Optional[str] = None
    filelist_list: Optional[str] = None

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        by_reason = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"written {self.written} records in {len(self.parts)} part file(s); skipped {skipped} ({by_reason})"


def _resolve_image(path: str, jsonl_dir: str) -> str:
    if fsio.has_scheme(path):
        return path
    if fsio.has_scheme(jsonl_dir):
        return fsio.join(jsonl_dir, path)
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    beside = os.path.join(jsonl_dir, path)
    if os.path.exists(beside) or not os.path.exists(path):
        return beside
    return path  # only found relative to the working directory


def _parse_json_line(raw: bytes, caption_key: str, image_key: str, jsonl_dir: str):
    """(caption, image path) or (None, (reason, message)). UTF-8, else GB18030."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            line = raw.decode("gb18030")
        except UnicodeDecodeError:
            return None, ("bad_json", "line is neither UTF-8 nor GB18030")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, ("bad_json", str(e))
    if not isinstance(obj, dict):
        return None, ("bad_json", f"expected a json object, got {type(obj).__name__}")
    for key in (caption_key, image_key):
        if not isinstance(obj.get(key), str):
            return None, ("missing_key", f"no string value for key {key!r}")
    return (clean_caption(obj[caption_key]), _resolve_image(obj[image_key], jsonl_dir)), None


def encode_image_file(path: str, max_pixels: Optional[int]):
    """Worker: ("ok", base64 text) or (reason, message). Bytes are kept as-is. A FIFO or device
    (`/dev/zero`) is refused before it is opened: reading it would block or never end."""
    problem = fsio.file_problem(path)
    if problem:
        return "unreadable_image", problem
    try:
        with fsio.open_file(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "missing_image", f"{path} does not exist"
    except OSError as e:
        return "unreadable_image", f"{path}: {e}"
    return encode_image_bytes(data, max_pixels, path)


def encode_image_bytes(data: bytes, max_pixels: Optional[int], name: str = "image"):
    """Worker: ("ok", base64 of `data` as it is) when it decodes, else (reason, message)."""
    try:
        decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as e:
        reason = {"truncated": "truncated_image"}.get(e.reason, e.reason)
        return reason, f"{name}: {e}"
    return "ok", base64.b64encode(data).decode("ascii")


def _encode(job: str, payload, max_pixels: Optional[int]):
    """Worker: an image file ("file", path) or image bytes ("bytes", data) -> encode_image_*."""
    return encode_image_file(payload, max_pixels) if job == "file" else encode_image_bytes(payload, max_pixels)


class _PartWriter:
    """Writes part-NNNNNN[.gz] files of at most `per_part` records, each atomically."""

    def __init__(self, part_dir: str, per_part: int, gzip_parts: bool):
        self.part_dir, self.per_part, self.gzip_parts = part_dir, per_part, gzip_parts
        self.parts: list[str] = []
        self._fh = None
        self._tmp = self._final = None
        self._count = 0

    def _open(self) -> None:
        import gzip

        name = f"part-{len(self.parts) + 1:06d}" + (".gz" if self.gzip_parts else "")
        self._final = os.path.join(self.part_dir, name)
        self._tmp = f"{self._final}.tmp-{os.getpid()}"
        self._fh = gzip.open(self._tmp, "wb") if self.gzip_parts else open(self._tmp, "wb")
        self._count = 0

    def write(self, caption: str, image_b64: str) -> None:
        if self._fh is None:
            self._open()
        self._fh.write(f"{caption}\t{PLACEHOLDER}\t{image_b64}\n".encode("utf-8"))
        self._count += 1
        if self._count >= self.per_part:
            self.close()

    def close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        os.replace(self._tmp, self._final)
        self.parts.append(self._final)
        self._fh = None

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            os.remove(self._tmp)
            self._fh = None


def _atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def _iter_jsonl(path: str) -> Iterator[tuple[int, bytes]]:
    with fsio.open_file(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def _is_parquet_file(path: str) -> bool:
    with fsio.open_file(path, "rb") as f:
        return f.read(4) == PARQUET_MAGIC


def parquet_files(input_path: str) -> list:
    """The parquet files of a file, a folder (``*.parquet``, flat) or a pattern; [] when
    `input_path` names none."""
    if is_pattern(input_path) and not fsio.exists(input_path):
        files = [p for p in expand_pattern(input_path) if p.lower().endswith(".parquet")]
    elif fsio.is_dir(input_path):
        files = [p for p in fsio.list_dir(input_path) if p.lower().endswith(".parquet") and fsio.is_file(p)]
    else:
        files = [input_path]
    return [p for p in files if fsio.is_file(p) and not fsio.file_problem(p) and _is_parquet_file(p)]


def input_kind(input_path: str) -> str:
    """"tar" (tar shards), "parquet" (parquet files) or "jsonl", from the content of what
    `input_path` names (a file, a folder or a pattern)."""
    if is_tar_source(input_path):
        return "tar"
    try:
        if parquet_files(input_path):
            return "parquet"
    except ValueError:  # a pattern that matches nothing: the jsonl check below names the path
        pass
    return "jsonl"


def _jsonl_items(input_path: str, caption_key: str, image_key: str):
    """(where, caption, "file", image path) per jsonl line, or (where, None, reason, message)."""
    problem = fsio.file_problem(input_path)
    if problem:
        raise ValueError(f"input jsonl {problem}")
    if not fsio.is_file(input_path):
        raise FileNotFoundError(f"input jsonl {input_path!r} does not exist")
    jsonl_dir = fsio.dirname(input_path)
    for lineno, line in _iter_jsonl(input_path):
        parsed, error = _parse_json_line(line, caption_key, image_key, jsonl_dir)
        if parsed is None:
            yield (f"{input_path}:{lineno}", None, *error)
        else:
            yield f"{input_path}:{lineno}", parsed[0], "file", parsed[1]


def _tar_items(input_path: str, caption_key: str):
    """(where, caption, "bytes", image bytes) per sample of the shards, or (where, None, reason, message)."""
    for entry in expand_tar_source(input_path):
        try:
            for n, record in read_shard(entry.path):
                try:
                    caption, data = parse_sample(record, caption_key)
                except RecordError as e:
                    yield f"{entry.path}:{n}", None, e.reason, str(e)
                    continue
                yield f"{entry.path}:{n}", clean_caption(caption), "bytes", data
        except TruncatedFile as e:
            yield f"{entry.path}:{e.position}", None, e.reason, str(e)


def _parquet_items(input_path: str, image_column: str, caption_column: str, batch_rows: int = 64):
    """(where, caption, "bytes", image bytes) per row ("file:row", 1-based), or (where, None, reason, message)."""
    import pyarrow.parquet as pq

    files = parquet_files(input_path)
    if not files:
        raise ValueError(f"{input_path}: no parquet file (a .parquet file, a folder of them or a pattern)")
    for path in files:
        with fsio.open_file(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            missing = [c for c in (image_column, caption_column) if c not in names]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (it has {', '.join(names)}); "
                                 f"name the columns with --image_column / --caption_column")
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=[image_column, caption_column]):
                images = batch.column(image_column).to_pylist()
                captions = batch.column(caption_column).to_pylist()
                for image, caption in zip(images, captions):
                    row += 1
                    where = f"{path}:{row}"
                    if isinstance(image, dict):  # a struct {bytes, path} (Hugging Face datasets' Image feature)
                        image = image.get("bytes")
                    if not isinstance(image, (bytes, bytearray)) or not image:
                        yield where, None, "no_image", f"no image bytes in column {image_column!r}"
                    elif not isinstance(caption, str):
                        yield where, None, "no_caption", f"no string caption in column {caption_column!r}"
                    else:
                        yield where, clean_caption(caption), "bytes", bytes(image)


def create_pretraining_data(
    input_path: str,
    output_path: str,
    output_name: str = "custom_dataset",
    caption_key: str = "caption",
    image_key: str = "image",
    per_part_file_num: int = 1000,
    save_gzip_file: bool = False,
    num_repeat: int = 1,
    num_workers: int = 0,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    image_column: str = "jpg",
    caption_column: str = "caption",
) -> PrepareResult:
    """Convert `input_path` (a jsonl, tar shards or parquet files: module doc) into part files +
    filelists under `output_path`. `caption_key` / `image_key`: the jsonl keys (`caption_key` is
    also the caption field of a tar sample's .json); `image_column` / `caption_column`: the
    parquet columns.

    `num_workers` <= 1 runs in this process; more uses a process pool. Filelists are written
    only when at least one record was written. Returns the counts (see PrepareResult).
    """
    if per_part_file_num < 1:
        raise ValueError(f"per_part_file_num must be >= 1, got {per_part_file_num}")
    if num_repeat < 1:
        raise ValueError(f"num_repeat must be >= 1, got {num_repeat}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not output_name or os.sep in output_name:
        raise ValueError(f"output_name must be a plain file name, got {output_name!r}")
    kind = input_kind(input_path)
    if kind == "tar":
        items = _tar_items(input_path, caption_key)
    elif kind == "parquet":
        items = _parquet_items(input_path, image_column, caption_column)
    else:
        items = _jsonl_items(input_path, caption_key, image_key)
    first = next(items, None)  # a bad input fails here, before any output is touched
    from tqdm import tqdm

    part_dir = os.path.join(os.path.abspath(output_path), PART_DIR)
    list_dir = os.path.join(os.path.abspath(output_path), FILELIST_DIR)
    os.makedirs(part_dir, exist_ok=True)
    os.makedirs(list_dir, exist_ok=True)

    # Filelists describe complete runs only: drop the previous run's before touching any part.
    for stale in (f"{output_name}.filelist", f"{output_name}.filelist.list"):
        stale_path = os.path.join(list_dir, stale)
        if os.path.lexists(stale_path):
            os.remove(stale_path)
            logger.info("removed %s of a previous run (rewritten when this run completes)", stale_path)

    result = PrepareResult()
    writer = _PartWriter(part_dir, per_part_file_num, save_gzip_file)

    def skip(where: str, reason: str, message: str) -> None:
        result.skipped[reason] = result.skipped.get(reason, 0) + 1
        logger.warning("%s: skipped (%s): %s", where, reason, message)

    def handle(where: str, caption: str, outcome) -> None:
        status, payload = outcome
        if status == "ok":
            writer.write(caption, payload)
            result.written += 1
        else:
            skip(where, status, payload)

    pool = ProcessPoolExecutor(max_workers=num_workers) if num_workers > 1 else None
    window = 4 * max(num_workers, 1)
    in_flight: collections.deque = collections.deque()
    bar = tqdm(desc="create_pretraining_data", unit="line", disable=not progress)
    try:
        for where, caption, job, payload in itertools.chain([first] if first else [], items):
            if caption is None:  # skipped while reading: job is the reason, payload the message
                skip(where, job, payload)
                bar.update(1)
                continue
            if pool is None:
                handle(where, caption, _encode(job, payload, max_pixels))
                bar.update(1)
                continue
            in_flight.append((where, caption, pool.submit(_encode, job, payload, max_pixels)))
            while len(in_flight) >= window:
                lno, cap, fut = in_flight.popleft()
                handle(lno, cap, fut.result())
                bar.update(1)
        while in_flight:
            lno, cap, fut = in_flight.popleft()
            handle(lno, cap, fut.result())
            bar.update(1)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    result.parts = writer.parts
    if result.written == 0:
        return result
    # Every part is complete: now the filelists, with absolute paths (see the module doc).
    result.filelist = os.path.join(list_dir, f"{output_name}.filelist")
    result.filelist_list = os.path.join(list_dir, f"{output_name}.filelist.list")
    _atomic_write_text(result.filelist, "".join(f"{p}\n" for p in result.parts * num_repeat))
    _atomic_write_text(result.filelist_list, f"{result.filelist}\n")
    return result
