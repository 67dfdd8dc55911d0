"""Opening data paths: local paths with the builtin `open`, paths with a scheme through fsspec.

Every reader of `ldm.data` (LAION part files and listings, tar shards, parquet and jsonl inputs of
`create_pretraining_data`) opens and lists files through these few functions, so a path such as
``s3://bucket/shards/00000.tar``, ``hdfs://...``, ``https://host/part-000001.gz`` or fsspec's
in-memory ``memory://...`` works wherever a local path does.

- A path "has a scheme" when it starts with ``<scheme>://`` (RFC 3986 §3.1 scheme characters:
  a letter, then letters, digits, ``+``, ``-``, ``.``). ``file://`` paths go through fsspec too.
- fsspec (https://filesystem-spec.readthedocs.io) is an optional dependency: local paths never
  import it. A scheme path without it installed raises `MissingFsspecError`, naming the path and
  saying to ``pip install fsspec`` (plus the scheme's backend: s3fs for s3://, aiohttp for
  http(s)://; fsspec names the missing backend itself).
- Local paths keep the project's special-file guard (`ldm.utils.special_file_problem`: a FIFO or
  device would block a reader); remote objects are never special files.
"""
from __future__ import annotations

import glob as _glob
import os
import posixpath
import re
from typing import List, Optional

from ldm.utils import special_file_problem

__all__ = ["MissingFsspecError", "has_scheme", "open_file", "exists", "is_file", "is_dir", "list_dir", "glob",
           "join", "dirname", "abspath", "file_problem"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class MissingFsspecError(OSError):
    """A path with a scheme (s3://, hdfs://, http(s)://, ...) was given but fsspec is not installed."""


def has_scheme(path) -> bool:
    """True for ``<scheme>://...`` paths (opened through fsspec)."""
    return isinstance(path, str) and bool(_SCHEME.match(path))


def _fs(path: str):
    """(fsspec filesystem, path without the protocol) of a scheme path."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise MissingFsspecError(
            f"{path}: a path with a scheme needs fsspec, which is not installed "
            f"(pip install fsspec, plus the backend of the scheme, e.g. s3fs for s3://)") from None
    return url_to_fs(path)


def _full(fs, path: str) -> str:
    """A listed path of `fs` with its protocol again (fsspec lists paths without it)."""
    return fs.unstrip_protocol(path)


def open_file(path: str, mode: str = "rb", buffering: int = -1):
    """A file object of `path` (binary modes for scheme paths; local paths take any `open` mode)."""
    if not has_scheme(path):
        return open(path, mode, buffering=buffering)
    fs, inner = _fs(path)
    return fs.open(inner, mode)


def exists(path: str) -> bool:
    if not has_scheme(path):
        return os.path.exists(path)
    fs, inner = _fs(path)
    return fs.exists(inner)


def is_file(path: str) -> bool:
    if not has_scheme(path):
        return os.path.isfile(path)
    fs, inner = _fs(path)
    return fs.isfile(inner)


def is_dir(path: str) -> bool:
    if not has_scheme(path):
        return os.path.isdir(path)
    fs, inner = _fs(path)
    return fs.isdir(inner)


def list_dir(path: str) -> List[str]:
    """Full paths of the entries of folder `path`, sorted by name."""
    if not has_scheme(path):
        return sorted(os.path.join(path, name) for name in os.listdir(path))
    fs, inner = _fs(path)
    return sorted(_full(fs, p) for p in fs.ls(inner, detail=False) if p.rstrip("/") != inner.rstrip("/"))


def glob(pattern: str) -> List[str]:
    """Sorted paths matching a shell pattern (``*``, ``?``, ``[...]``)."""
    if not has_scheme(pattern):
        return sorted(_glob.glob(os.path.expanduser(pattern)))
    fs, inner = _fs(pattern)
    return sorted(_full(fs, p) for p in fs.glob(inner))


def dirname(path: str) -> str:
    """The folder of `path` (for a scheme path: the URL up to its last ``/``)."""
    if not has_scheme(path):
        return os.path.dirname(os.path.abspath(path))
    return path.rsplit("/", 1)[0] if path.count("/") > 2 else path


def join(folder: str, name: str) -> str:
    if not has_scheme(folder):
        return os.path.join(folder, name)
    return posixpath.join(folder, name)


def abspath(path: str) -> str:
    """`os.path.abspath` for local paths; scheme paths are already absolute."""
    return path if has_scheme(path) else os.path.abspath(os.path.expanduser(path))


def file_problem(path: str, folder: bool = False) -> Optional[str]:
    """`ldm.utils.special_file_problem` for local paths; None for scheme paths."""
    return None if has_scheme(path) else special_file_problem(path, folder=folder)
