"""Small shared helpers: logging, seeding, distributed rank information, bool env flags, atomic
writes, message quoting (`shorten`), special-file checks and the entry-point runner (`run_main`)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import stat
import sys
import tempfile
import warnings

import numpy as np

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def get_logger(name: str = "ldm") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def parse_bool(value, name: str = "value") -> bool:
    """Parse 0/1/true/false/yes/no (any case). Raises ValueError naming `name` otherwise."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}: cannot read {value!r} as a boolean (use 0/1/true/false)")


def env_bool(name: str, default: bool = False) -> bool:
    """Read a boolean environment variable once (used only in argument parsing, as a default)."""
    raw = os.environ.get(name)
    return default if raw is None else parse_bool(raw, name)


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from paddle.distributed, falling back to the launcher's env vars."""
    try:
        import paddle.distributed as dist

        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - paddle missing or not initialised
        pass
    rank = int(os.environ.get("PADDLE_TRAINER_ID", os.environ.get("RANK", 0)))
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", os.environ.get("WORLD_SIZE", 1)))
    return rank, world


def set_seed(seed: int) -> None:
    import paddle

    random.seed(seed)
    np.random.seed(seed % 2**32)
    paddle.seed(seed)


def temp_file_next_to(path: str) -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder (same filesystem, so os.replace onto
    `path` is atomic), with the permissions a plain open() would give (mkstemp makes it 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Open a temporary file next to `path` and move it onto `path` only when the block completes
    (fsync'd), so readers never see a partial file."""
    fd, tmp = temp_file_next_to(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(path: str, image, meta=None) -> str:
    """Write a uint8 HxWx3 image as PNG, atomically, with `meta` as PNG text chunks (prompt, seed...)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (meta or {}).items():
        info.add_text(str(k), str(v))
    with atomic_open(path) as f:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format="PNG", pnginfo=info)
    return path


# --------------------------------------------------------------------------- messages and entry points

QUOTE_LIMIT = 200


def shorten(text, limit: int = QUOTE_LIMIT) -> str:
    """`text` (str, bytes or anything) cut to about `limit` characters for quoting in a message:
    a data line may be megabytes long (issue 12 item 5); a cut text says how long it was."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        n, unit = len(text), "bytes"
        text = bytes(text[: limit * 4]).decode("utf-8", errors="replace")
    else:
        text = str(text)
        n, unit = len(text), "characters"
    if n <= limit and len(text) <= limit:
        return text
    return f"{text[:limit]}... ({n} {unit})"


def special_file_problem(path: str, folder: bool = False) -> str | None:
    """Why `path` must not be opened, or None: a FIFO, device or socket would block or never end
    (issue 12 item 6). `folder=True` accepts a folder instead of a regular file. Missing paths
    return None (the caller's own not-found message names them better)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP, EACCES, ...
        return f"{path}: cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode) or (folder and stat.S_ISDIR(mode)):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    return f"{path} is {kind}, not a regular file{' or folder' if folder else ''}"


_NOISE = (  # third-party warnings every run printed (issue 12 item 15), by message start
    r"No ccache found",
    r"Setuptools is replacing distutils",
    r".*distutils Version classes are deprecated",
)


_quieted = False

# command-line tokens of the runs that need torch inside a library: ppdiffusers'
# `from_pretrained(from_diffusers=True)` of a .bin pickle (--allow_pickle_weights, ldm.sd.loading) and
# diffusers / transformers (scripts/make_tiny_sd.py --backend torch). No other run uses torch, or it
# imports torch itself (scripts/convert_other_weight.py --inception), which USE_TORCH does not affect.
TORCH_ARGS = ("--allow_pickle_weights", "torch", "--backend=torch")


def skip_unused_torch() -> None:
    """Keep ppdiffusers (and HF datasets, which paddlenlp imports) from importing torch in an entry
    point that never uses it: both import torch at start-up whenever it is installed, ~2.9 s on a
    2-core machine (of `inference.py --preset demo`'s ~17 s). Sets ``USE_TORCH=0``, which both read,
    unless the user set USE_TORCH, torch is not installed (nothing to skip), or the command line
    holds a token of `TORCH_ARGS`. Only the process and its children see it."""
    import importlib.util

    if "USE_TORCH" in os.environ or any(a in TORCH_ARGS for a in sys.argv[1:]):
        return
    if importlib.util.find_spec("torch") is not None:
        os.environ["USE_TORCH"] = "0"
        # HF datasets then logs "Disabling PyTorch because USE_TF is set" at INFO (wrong variable named)
        logging.getLogger("datasets").addFilter(_drop_disabling_torch)


def _drop_disabling_torch(record) -> bool:
    return "Disabling PyTorch" not in str(record.msg)


def quiet_third_party(verbose: bool | None = None, skip_torch: bool = True) -> None:
    """Silence the third-party start-up noise of every run, in one place; call it first thing in
    an entry point, before paddle / paddlenlp are imported. `verbose=True` leaves everything on.

    Sources (paddle 3.3.1, paddlenlp 2.8.1): `import paddle` warns "No ccache found"
    (paddle.utils.cpp_extension) and prints an OMP_NUM_THREADS notice to stderr when it is > 1
    (paddle.base.__bootstrap__); paddlenlp's `import pip` makes setuptools warn about distutils;
    the paddlenlp Trainer dumps every argument at DEBUG on the "PaddleNLP" logger (which it sets
    to DEBUG at import, so a filter is used, not a level). The project's own warnings stay.
    verbose=None: True when sys.argv holds --verbose or --debug. Calling it again is a no-op.
    skip_torch: also keep libraries from importing torch the run does not use
    (`skip_unused_torch`); run_main passes False (the libraries are imported by then, and
    a test process that calls run_main keeps torch for its references)."""
    global _quieted
    if skip_torch:
        skip_unused_torch()
    if verbose is None:
        verbose = any(a in ("--verbose", "--debug") for a in sys.argv[1:])
    if verbose or _quieted:
        return
    _quieted = True
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="(paddle|paddlenlp|ppdiffusers|visualdl)")
    logging.getLogger("PaddleNLP").addFilter(  # the argument dump, and a notice about paddlenlp v5 defaults
        lambda record: record.levelno >= logging.INFO and "will change in v5" not in str(record.msg))
    if "paddle" not in sys.modules:
        stderr = sys.stderr
        sys.stderr = _DropLines(stderr, ("OMP_NUM_THREADS",))  # log handlers made meanwhile keep it: harmless
        try:
            import paddle  # noqa: F401
        finally:
            sys.stderr = stderr


class _DropLines(io.TextIOBase):
    """A text stream forwarding to `target` every write except those containing a marker."""

    def __init__(self, target, markers):
        self._target, self._markers = target, tuple(markers)

    _dropped = False

    def write(self, text):
        dropped, self._dropped = self._dropped, any(m in text for m in self._markers)
        if self._dropped or (dropped and text == "\n"):  # print() writes its end separately
            return len(text)
        return self._target.write(text)

    def flush(self):
        self._target.flush()

    def __getattr__(self, name):
        return getattr(self._target, name)


_PROJECT_ERRORS = (OSError, ValueError)  # WeightsError, LaionDataError, ImageDecodeError,
# MissingWeightsError (a FileNotFoundError), PickleRefusedError are all one of these


def run_main(main, argv=None, errors=_PROJECT_ERRORS) -> int:
    """Run an entry point's `main(argv)` the way every script does (issue 12 items 8, 15).

    `--verbose` keeps the third-party start-up output (see quiet_third_party), `--debug` also
    shows tracebacks; both are removed from argv before `main` sees it. Otherwise the project's
    own errors (`errors`: ValueError with its subclasses WeightsError / LaionDataError /
    ImageDecodeError..., OSError such as FileNotFoundError / MissingWeightsError) become one
    `error: <message>` line on stderr and exit status 1, without a traceback (argparse usage
    errors keep their status 2). Returns main's int result, else 0; use as
    `raise SystemExit(run_main(main))`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    verbose = debug or "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    quiet_third_party(verbose, skip_torch=False)
    try:
        result = main(argv)
    except errors as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def exit_with_parent(poll_seconds: float = 1.0, exit_code: int = 1) -> None:
    """Make this process exit when its parent (e.g. `paddle.distributed.launch`) dies, even by
    kill -9: on Linux the kernel sends SIGTERM (prctl PR_SET_PDEATHSIG); everywhere a daemon thread
    also checks every `poll_seconds` whether the parent pid changed (the process was re-parented)
    and then exits with `exit_code` (os._exit: a rank stuck in a collective exits too)."""
    import signal
    import sys
    import threading
    import time

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl
            pass

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                get_logger("ldm").error("parent process %d is gone (launcher killed?): exiting", parent)
                os._exit(exit_code)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
