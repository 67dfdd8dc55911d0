"""Webdataset / img2dataset tar shards: dataset kind "tar", for both trainers.

Format (the webdataset format, https://github.com/webdataset/webdataset#the-webdataset-format,
which img2dataset's ``--output_format webdataset`` writes): a shard is a tar archive (plain or
gzip-compressed) whose consecutive members of one key form a sample. The key of a member is its
path up to the first "." of its file name, the rest is its extension (``000012.jpg`` ->
key ``000012``, extension ``jpg``; ``a/b.seg.png`` -> ``a/b``, ``seg.png``), as webdataset's
`base_plus_ext` splits names. A sample here is:

* the image: the first of ``.jpg``, ``.jpeg``, ``.png``, ``.webp`` it holds (extension in any case);
* the caption: ``.txt`` (UTF-8, stripped), else the ``caption`` field (option ``caption_key``) of
  ``.json`` (img2dataset writes both; other files such as ``.json`` metadata are ignored).

Sources (`expand_tar_source`): one shard; a folder of shards (``*.tar``, ``*.tar.gz``, ``*.tgz``,
flat); a brace pattern ``shards/{00000..00099}.tar`` (expanded with `braceexpand`, the expansion
webdataset uses) or a shell pattern ``shards/*.tar``; or a listing of shards (a ``.filelist`` /
``.filelist.list`` as for LAION part files, weights included: `ldm.data.laion.expand_file_list`).
Paths with a scheme (s3://, hdfs://, http(s)://) open through fsspec (`ldm.data.fsio`).

Guarantees: those of `ldm.data.stream.ShardedStream`, shared with the LAION reader: every
sample is read by exactly one (rank, DataLoader worker) consumer per pass for any number of shards
(with fewer shards than consumers, the shards' samples are dealt out by sample index), bad
samples are skipped and counted by reason (`INVALID_REASONS`; first example "shard:N", the N-th
sample of the shard; a shard that ends early - truncated, or an empty file - is one
`truncated_tar` at the sample after its last complete one), a consumer with no valid sample in a pass raises `LaionDataError`, and a
resumed run continues at its exact sample (mid-shard too).

Why the project reads tars with the standard library's `tarfile` rather than through webdataset's
pipeline: the exactly-once split within a shard (webdataset's `split_by_node` / `split_by_worker`
split the shard list only, so 1 shard and 8 consumers leaves 7 without data), counting skipped
samples by reason (its handlers either raise or warn and continue), and the exact resume position
all need the reader's own loop; webdataset (no torch needed) writes the tests' shards
(`webdataset.TarWriter`) and its `braceexpand` expands patterns.
"""
from __future__ import annotations

import gzip
import json
import posixpath
import tarfile
import zlib
from typing import Iterator, List, Optional

from ldm.data import fsio
from ldm.data.laion import LAION_OPTIONS, expand_file_list, read_listing, sniff_file_kind
from ldm.data.spec import DatasetSpec, check_options, register_dataset_kind
from ldm.data.stream import FileEntry, LaionDataError, RecordError, ShardedStream, TruncatedFile, check_stream, \
    stream_kwargs
from ldm.data.transforms import DEFAULT_MAX_PIXELS
from ldm.utils import get_logger, shorten

logger = get_logger(__name__)

__all__ = ["INVALID_REASONS", "TAR_SUFFIXES", "IMAGE_EXTENSIONS", "TAR_OPTIONS", "TarDataset", "build_tar_dataset",
           "expand_tar_source", "is_tar_source", "stream_kind", "read_shard", "parse_sample", "check_tars", "split_key"]

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INVALID_REASONS = ("no_image", "no_caption", "non_utf8", "bad_json", "undecodable", "truncated_image", "too_large",
                   "truncated_tar")
TAR_OPTIONS = (*LAION_OPTIONS, "caption_key")
_PATTERN_CHARS = ("{", "*", "?", "[")
_IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTENSIONS)


def split_key(name: str) -> tuple:
    """(key, extension) of a member name: the folder part plus the file name up to its first ".",
    and the rest, lower-cased ("" when the name has no ".")."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def _is_tar_name(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def is_pattern(path: str) -> bool:
    """True for a brace (``{00000..00009}``, ``{a,b}``) or shell (``*``, ``?``, ``[...]``) pattern."""
    return any(c in path for c in _PATTERN_CHARS)


def expand_pattern(pattern: str) -> List[str]:
    """The files of a brace and/or shell pattern, in expansion order (shell parts sorted); a brace
    expansion naming a missing file is a LaionDataError naming it."""
    from braceexpand import braceexpand

    out: List[str] = []
    for path in braceexpand(pattern):
        if any(c in path for c in _PATTERN_CHARS[1:]):
            out.extend(p for p in fsio.glob(path) if fsio.is_file(p))
        elif not fsio.is_file(path):
            raise LaionDataError(f"shard pattern {pattern!r}: {shorten(path)!r} does not exist")
        else:
            out.append(path)
    if not out:
        raise LaionDataError(f"shard pattern {pattern!r} matches no file")
    return out


def expand_tar_source(path: str) -> List[FileEntry]:
    """The shard entries of a tar, a folder of tars, a pattern or a listing of tars (module doc)."""
    path = str(path)
    if is_pattern(path) and not fsio.exists(path):
        return [FileEntry(p, 1.0, path, "tar") for p in expand_pattern(path)]
    problem = fsio.file_problem(path, folder=True)
    if problem:
        raise LaionDataError(f"tar shards: {problem}")
    if fsio.is_dir(path):
        shards = [p for p in fsio.list_dir(path) if _is_tar_name(p) and fsio.is_file(p)]
        if not shards:
            raise LaionDataError(f"folder {path} holds no tar shard (*.tar, *.tar.gz, *.tgz)")
        return [FileEntry(p, 1.0, path, "tar") for p in shards]
    entries = expand_file_list(path)
    other = [e.path for e in entries if e.kind != "tar"]
    if other:
        raise LaionDataError(f"{path}: {shorten(other[0])} is not a tar shard (a listing of tar shards names only tars; "
                             f"LAION part files are dataset kind 'laion')")
    return entries


def is_tar_source(path) -> bool:
    """Whether `path` names tar shards (so the trainers read it as kind "tar"): a pattern of
    ``.tar`` / ``.tar.gz`` / ``.tgz`` names, a folder holding such files and no image, a tar (by
    content), or a listing whose first entry is one. Anything else (a missing path too) is False."""
    path = str(path)
    try:
        if is_pattern(path) and not fsio.exists(path):
            return _is_tar_name(path)
        if fsio.is_dir(path):  # tars and no images (a caption folder stays a caption folder)
            names = [p.lower() for p in fsio.list_dir(path)]
            return any(map(_is_tar_name, names)) and not any(n.endswith(_IMAGE_SUFFIXES) for n in names)
        if not fsio.is_file(path) or fsio.file_problem(path):
            return False
        for _ in range(3):  # a tar, a listing of tars, a listing of listings of tars
            kind = sniff_file_kind(path)
            if kind != "listing":
                return kind == "tar"
            listed = read_listing(path)
            if not listed:
                return False
            path = listed[0][0]
    except fsio.MissingFsspecError:
        raise
    except (OSError, ValueError):
        return False
    return False


def read_shard(path: str) -> Iterator[tuple]:
    """(sample number, (key, {extension: bytes})) of every sample of one shard, in archive order;
    a shard that ends early raises TruncatedFile("truncated_tar") at the sample after the last
    complete one (the sample being read then is part of the truncation)."""
    n, key, files = 0, None, {}
    try:
        with fsio.open_file(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key or ext in files:  # a new sample starts: the previous one is complete
                    if key is not None:
                        n += 1
                        yield n, (key, files)
                    key, files = k, {}
                files[ext] = tar.extractfile(member).read()
                tar.members = []  # stream mode keeps every header otherwise (webdataset does the same)
        if key is not None:
            n += 1
            yield n, (key, files)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise TruncatedFile("truncated_tar", n + 1, f"tar stream ends early: {e}") from None


def parse_sample(record, caption_key: str = "caption") -> tuple:
    """(caption, image bytes) of one sample (key, files); RecordError no_image / no_caption /
    non_utf8 / bad_json (module doc: which files are the image and the caption)."""
    key, files = record
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    if image is None:
        raise RecordError("no_image", f"key {key!r} has no .jpg/.jpeg/.png/.webp (files: {sorted(files)})")
    if "txt" in files:
        try:
            return files["txt"].decode("utf-8-sig").strip(), image
        except UnicodeDecodeError:
            raise RecordError("non_utf8", f"key {key!r}: .txt is not UTF-8") from None
    if "json" not in files:
        raise RecordError("no_caption", f"key {key!r} has no .txt and no .json")
    try:
        meta = json.loads(files["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError("bad_json", f"key {key!r}: {e}") from None
    caption = meta.get(caption_key) if isinstance(meta, dict) else None
    if not isinstance(caption, str):
        raise RecordError("no_caption", f"key {key!r}: no .txt and no string {caption_key!r} in .json")
    return caption.strip(), image


def stream_kind(path) -> str:
    """The stream kind of an SD `--file_list`: "tar" for tar shards (`is_tar_source`), else "laion"."""
    return "tar" if is_tar_source(path) else "laion"


class TarDataset(ShardedStream):
    """Streams (image, caption) samples from tar shards (see the module doc; the sharding,
    counting and resume are `ldm.data.stream.ShardedStream`'s, whose arguments it takes).

    Args:
        source: a tar, a folder of tars, a pattern or a listing of tars (`expand_tar_source`).
        caption_key: the caption field of a sample's ``.json`` (used when it has no ``.txt``).
    """

    def __init__(self, source: str, resolution: int = 256, caption_key: str = "caption", **kwargs):
        if not isinstance(caption_key, str) or not caption_key:
            raise ValueError(f"caption_key must be a non-empty string, got {caption_key!r}")
        self.caption_key = caption_key
        self.entries = expand_tar_source(source)
        super().__init__(str(source), resolution, **kwargs)

    def read_file(self, path: str) -> Iterator[tuple]:
        return read_shard(path)

    def parse_record(self, record) -> tuple:
        return parse_sample(record, self.caption_key)


def build_tar_dataset(spec: DatasetSpec, rank: Optional[int] = None, world_size: Optional[int] = None) -> TarDataset:
    """Dataset kind "tar": `spec.path` is a tar, a folder of tars, a pattern or a listing of tars;
    `spec.options` may hold TAR_OPTIONS. Shards itself over rank x DataLoader worker."""
    return TarDataset(spec.path, **stream_kwargs(spec, rank, world_size), **check_options(spec, TAR_OPTIONS))


register_dataset_kind("tar", build_tar_dataset)


def check_tars(source: str, world_size: int = 1, num_workers: int = 1, resolution: int = 256,
               max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, seed: int = 0, epoch: int = 0,
               caption_key: str = "caption") -> dict:
    """The scripts/check_data.py report of tar shards (`ldm.data.stream.check_stream`)."""

    def make_rank(rank: int) -> TarDataset:
        return TarDataset(source, resolution=resolution, caption_key=caption_key, seed=seed, infinite=False,
                          rank=rank, world_size=world_size, max_pixels=max_pixels)

    report = check_stream(make_rank, world_size, num_workers, epoch)
    return {"tar_source": source, "shards": report.pop("files"), **report}
