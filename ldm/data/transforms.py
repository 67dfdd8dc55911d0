"""Image decoding and training transforms shared by the LAION part-file and folder datasets.

`decode_image` turns encoded bytes into an upright 8-bit RGB `PIL.Image`:

* Decompression-bomb guard with a per-call limit. Pillow's own guard reads the process-wide
  ``PIL.Image.MAX_IMAGE_PIXELS`` (warning above the limit, error above twice the limit). Changing
  that global from a data loader would leak into every other thread, so the image is opened
  through Pillow's format registry without the global check and the header size is compared
  with ``max_pixels`` here instead. An image with ``width * height > max_pixels`` is rejected
  with ``ImageDecodeError(reason="too_large")`` (the warning threshold is the limit: a warning
  inside a DataLoader worker is invisible, so it is treated as a rejection). ``None`` disables
  the limit. Pillow's global is never read or written after import.
* A file whose pixel data ends early is ``"truncated"`` (``ImageFile.LOAD_TRUNCATED_IMAGES`` is
  never set); anything Pillow cannot identify or decode, including a file cut inside its header,
  is ``"undecodable"``.
* Colour modes: CMYK (Pillow's JPEG decoder already undoes Adobe's inverted CMYK), YCbCr, L, 1
  and P are converted with Pillow's matrices. Images with transparency (RGBA, LA, PA, P with a
  ``transparency`` entry) are alpha-composited onto a WHITE background: dropping alpha would
  expose whatever colour the encoder left under transparent pixels (often black). 16/32-bit
  integer grayscale (I;16*, I) is scaled 0..65535 -> 0..255 (``round(v / 257)``) instead of
  Pillow's clipping conversion; values outside 0..65535 are min-max rescaled.
* EXIF orientation is applied (`PIL.ImageOps.exif_transpose`) on every path, LAION included: it is
  a no-op for images without an orientation tag (no copy is made), and web images that carry one
  are displayed upright by browsers, so upright is what the caption describes.
* JPEG fast path: with ``target_short_side`` the JPEG is decoded at a reduced DCT scale, the
  smallest one whose short side is still >= ``target_short_side``; the final antialiased resize
  then brings it to the training size. When the optional `simplejpeg` package (libjpeg-turbo)
  is importable, baseline and progressive YCbCr / RGB / grayscale JPEGs are decoded by it, at
  the scales Pillow's draft offers too (1/2, 1/4, 1/8, else full size), so both decoders give
  the same size: libjpeg-turbo's other M/8 scales run scalar IDCTs and are slower than its SIMD
  full decode (640x480 at 5/8: 2.3 ms, full: 1.7 ms, 1/2: 1.4 ms on one core, measured for
  issue 15 item 4). Its decoder is faster than Pillow's (the same full decode and convert: 4.0
  ms), and the header is read without building a Pillow image. The pixel
  limit is checked on the header before decoding; EXIF/XMP orientation is read through Pillow
  whenever the header has an APP1 segment (the only place Pillow reads it from in a JPEG). CMYK /
  YCCK JPEGs, headers this path does not understand, and any libjpeg-turbo error or warning
  (truncated data included) fall back to the Pillow path, which then decides the result
  or the error reason exactly as before. Without `simplejpeg`, Pillow's draft (1/2, 1/4, 1/8)
  is used.
  Chroma upsampling: when the decoded image's short side is >= 1.5x ``target_short_side``
  (`FAST_UPSAMPLE_MIN_DOWNSCALE`: an antialiased downscale by >= 1.5x follows), libjpeg-turbo
  upsamples the half-resolution chroma of 4:2:0 / 4:2:2 JPEGs by pixel replication (its
  ``do_fancy_upsampling = FALSE``, merged with the colour conversion) instead of its triangle
  filter: ~7-10% of the decode (640x480: 0.76 instead of 0.81-0.83 ms on one core). Measured on
  the benchmark's 200 photo-like 640x480 JPEGs (quality 90, 4:2:0), against the default decode:
  full size mean |diff| 1.9 grey levels, PSNR 38.5 dB (max 94, on hard colour edges); after
  `ImageTransform` to 256 px mean 0.45, PSNR 50.2 dB, max 20. Luma is untouched. (The DCT is
  left exact: its fast integer variant gave ~2% for a mean difference of 0.93 after the resize.)
  Smaller downscales, upscales, ``target_short_side=None`` and the Pillow path decode with
  the triangle filter.

`ImageTransform` does the training-time geometry: short-side resize to the target (small images
are upscaled, never dropped) + random or centre crop + optional horizontal flip, returned as the
sample's pixels, uint8 HWC [H, W, 3]. The resize and the crop are done in one call that
samples only the crop: Pillow's `Image.resize(..., box=...)` (exactly the pixels that resizing
the whole image and then cropping would give), or, for downscales by 1..2x with the default
bilinear filter, OpenCV with a variance-matched prefilter (see `ImageTransform`).

`normalize_pixels` is the one normalisation: uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in
[-1, 1] (x / 127.5 - 1) or [0, 1] (x / 255). It runs after a batch is collated, where the batch
lives: on a paddle Tensor (the training step, `ldm.train.task.TrainingTask.pixels`, i.e. on the
training device) or on a numpy array (offline use). DataLoader workers thus hand over uint8
batches, a quarter of the bytes of float32 (issue 15 item 4; `benchmarks/bench_dataloader.py`).

Follows the transform recipe of diffusers' ``train_text_to_image.py`` (resize, random/centre
crop, random flip, normalise with mean = std = 0.5); the code is this project's own.
"""
from __future__ import annotations

import io
import math
import multiprocessing
import warnings
from struct import error as struct_error
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

try:  # optional fast JPEG decoder (libjpeg-turbo, DCT scaling); Pillow is the fallback
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

try:  # optional SIMD resize for ImageTransform (opencv-python, a ppdiffusers dependency); Pillow is the fallback
    import cv2 as _cv2
except ImportError:  # pragma: no cover - depends on the environment
    _cv2 = None
if _cv2 is not None and multiprocessing.parent_process() is None:
    # One OpenCV thread per loader process: the parallelism is the DataLoader's workers. OpenCV's
    # default pool (a thread per core) spends more CPU than it saves on one 256 px resize (in-process
    # samples per CPU second 590 -> 812 on the bench's 640x480 JPEGs). Set here, before any worker
    # forks (they inherit it): calling this in a worker forked after the pool ran deadlocks it.
    _cv2.setNumThreads(1)

try:  # Pillow >= 9.1
    _RESAMPLE = Image.Resampling
    _TRANSPOSE = Image.Transpose
except AttributeError:  # pragma: no cover - very old Pillow
    _RESAMPLE = _TRANSPOSE = Image
_TRANSPOSE_FLIP = _TRANSPOSE.FLIP_LEFT_RIGHT

# Pillow's decompression-bomb limit as shipped (read once, at import; never written).
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS

DECODE_REASONS = ("undecodable", "truncated", "too_large")
NORMALIZE_MODES = ("minus_one_one", "zero_one")
_EXIF_ORIENTATION = 0x0112
_DRAFT_SCALES = (8, 4, 2)
_WHITE = (255, 255, 255)
_JPEG_SOI = b"\xff\xd8\xff"  # what Pillow's JPEG plugin accepts
_SIMPLEJPEG_COLORSPACES = ("YCbCr", "RGB", "Gray")  # libjpeg-turbo converts these to RGB itself
# simplejpeg path: libjpeg-turbo's fast chroma upsampling when the decoded short side is at least this
# many times the target (an antialiased downscale follows); see the module docstring
FAST_UPSAMPLE_MIN_DOWNSCALE = 1.5


class ImageDecodeError(ValueError):
    """An image that cannot be used. ``reason`` is one of "undecodable", "truncated", "too_large"."""

    def __init__(self, reason: str, message: str = ""):
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown ImageDecodeError reason {reason!r}; expected one of {DECODE_REASONS}")
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Opening without the process-wide decompression-bomb check
# --------------------------------------------------------------------------------------------
def _open_unchecked(fp: io.BytesIO) -> Image.Image:
    """Identify and open an image like `Image.open`, minus its global MAX_IMAGE_PIXELS check.

    Walks Pillow's format registry (``Image.ID`` / ``Image.OPEN``) the way `Image.open` does:
    formats registered by `Image.preinit` first, then the rest after `Image.init`.
    """
    prefix = fp.read(16)
    tried: set[str] = set()
    for loader in (Image.preinit, Image.init):
        loader()
        for fmt in list(Image.ID):
            if fmt in tried or fmt not in Image.OPEN:
                continue
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            try:
                ok = not accept or accept(prefix)
                if ok and not isinstance(ok, str):
                    fp.seek(0)
                    return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, ValueError, EOFError, OSError, struct_error):
                continue
    raise ImageDecodeError("undecodable", "cannot identify image format")


def _open(data: bytes) -> Image.Image:
    fp = io.BytesIO(data)
    if hasattr(Image, "ID") and hasattr(Image, "OPEN") and hasattr(Image, "preinit"):
        return _open_unchecked(fp)
    # Fallback for a Pillow without the registry: global check may fire above 2x its limit.
    try:  # pragma: no cover
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as e:  # pragma: no cover
        raise ImageDecodeError("too_large", str(e)) from None
    except Exception as e:  # pragma: no cover
        raise ImageDecodeError("undecodable", f"{type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------
def draft_scale(size: tuple[int, int], target_short_side: int) -> int:
    """Largest JPEG DCT reduction in {8, 4, 2, 1} keeping the short side >= target_short_side."""
    short = min(size)
    for k in _DRAFT_SCALES:
        if short // k >= target_short_side:
            return k
    return 1


def _apply_draft(img: Image.Image, target_short_side: int) -> None:
    w, h = img.size
    k = draft_scale((w, h), target_short_side)
    if k > 1:
        # Requesting (w // k, h // k) makes Pillow pick exactly reduction k: w // (w // k) is in [k, 2k).
        img.draft("RGB", (w // k, h // k))


# EXIF orientation -> the Pillow transpose that makes the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: _TRANSPOSE.FLIP_LEFT_RIGHT,
    3: _TRANSPOSE.ROTATE_180,
    4: _TRANSPOSE.FLIP_TOP_BOTTOM,
    5: _TRANSPOSE.TRANSPOSE,
    6: _TRANSPOSE.ROTATE_270,
    7: _TRANSPOSE.TRANSVERSE,
    8: _TRANSPOSE.ROTATE_90,
}


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # broken EXIF block: keep the pixels, ignore the orientation
        return 1


def _int_gray_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer grayscale -> 8-bit L, scaling 0..65535 to 0..255 (no clipping)."""
    arr = np.asarray(img)
    if arr.dtype.byteorder == ">" or arr.dtype.kind != "i":
        arr = arr.astype(np.int64)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo >= 0 and hi <= 65535:
        out = (arr.astype(np.float64) / 257.0).round()
    else:  # signed or 32-bit data: stretch its own range
        out = (arr.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1))
        out = out.round()
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded Pillow image to 8-bit RGB (see module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        return _int_gray_to_l(img).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    has_alpha = has_alpha or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _jpeg_has_app1(data: bytes) -> bool | None:
    """Whether a JPEG has an APP1 segment (EXIF or XMP) before its first SOS marker.

    Pillow reads a JPEG's orientation only from APP1 segments before the first SOS. Returns None
    when the marker sequence is not a plain one (bytes between segments, a length running past
    the end, EOI before SOS, ...): such files are left to Pillow.
    """
    n, i = len(data), 2  # data[:2] is SOI
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # SOS
            return False
        elif marker == 0xE1:  # APP1
            return True
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # RSTn, SOI, TEM: no length field
            i += 2
        elif marker == 0xD9:  # EOI
            return None
        else:
            length = (data[i + 2] << 8) | data[i + 3]
            if length < 2:
                return None
            i += 2 + length
    return None


def _decode_jpeg_fast(
    data: bytes, max_pixels: int | None, target_short_side: int | None, as_array: bool = False
) -> Image.Image | np.ndarray | None:
    """`decode_image` through simplejpeg (libjpeg-turbo); None: leave this file to the Pillow path.

    Scale: the one Pillow's draft takes (`draft_scale`: 1/8, 1/4, 1/2 while the short side stays
    >= target_short_side, else full size; output ceil(size / k)); libjpeg-turbo's SIMD IDCTs.
    """
    try:
        h, w, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except Exception:  # header libjpeg-turbo cannot read: Pillow decides (and names the error)
        return None
    if colorspace not in _SIMPLEJPEG_COLORSPACES or w <= 0 or h <= 0:
        return None  # CMYK / YCCK (Adobe inversion handled by Pillow), unknown layouts
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    has_app1 = _jpeg_has_app1(data)
    if has_app1 is None:
        return None
    orientation = 1
    if has_app1:  # EXIF / XMP orientation, read exactly as the Pillow path reads it
        try:
            orientation = _exif_orientation(_open(data))
        except Exception:
            return None
    min_h = min_w = 0
    k = 1 if target_short_side is None else draft_scale((w, h), target_short_side)
    if k > 1:  # simplejpeg takes the smallest M/8 covering the minimum: M = 8 / k for ceil(short / k)
        if h <= w:
            min_h = -(-h // k)
        else:
            min_w = -(-w // k)
    # chroma upsampling by pixel replication when a downscale by >= 1.5x follows (see the module doc)
    fast_upsample = (target_short_side is not None
                     and -(-min(w, h) // k) >= FAST_UPSAMPLE_MIN_DOWNSCALE * target_short_side)
    try:  # strict: libjpeg-turbo warnings (e.g. "Premature end of JPEG file") raise
        arr = _simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w,
                                      fastupsample=fast_upsample, strict=True)
    except Exception:
        return None
    if orientation not in _ORIENTATION_TRANSPOSE:
        return arr if as_array else Image.fromarray(arr)  # [H, W, 3] uint8 -> RGB
    img = Image.fromarray(arr).transpose(_ORIENTATION_TRANSPOSE[orientation])
    return np.asarray(img) if as_array else img


def decode_image(
    data: bytes,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_short_side: int | None = None,
    as_array: bool = False,
) -> Image.Image | np.ndarray:
    """Decode encoded image bytes to an upright 8-bit RGB image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, GIF, ... whatever Pillow reads).
        max_pixels: reject images whose header size exceeds this many pixels (None: no limit).
        target_short_side: if given and the image is a JPEG, decode at the smallest DCT scale
            whose short side is still >= this value (the output may be larger; never smaller
            than the original's short side allows). Scales 1/2, 1/4, 1/8, through simplejpeg when
            it is installed, else Pillow's draft (see the module docstring); with simplejpeg,
            chroma is upsampled by replication when the decode is >= 1.5x the target.
        as_array: return the pixels as a uint8 ndarray [H, W, 3] instead of a PIL image (what
            `ImageTransform` works on fastest: no Pillow copy in and out). It may be read-only.
    Raises:
        ImageDecodeError with ``reason`` "undecodable", "truncated" or "too_large".
    """
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    if target_short_side is not None and target_short_side <= 0:
        raise ValueError(f"target_short_side must be positive or None, got {target_short_side}")
    if not data:
        raise ImageDecodeError("undecodable", "empty data")
    data = bytes(data)
    if _simplejpeg is not None and data[:3] == _JPEG_SOI:
        fast = _decode_jpeg_fast(data, max_pixels, target_short_side, as_array)
        if fast is not None:
            return fast
    try:
        img = _open(data)
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError("undecodable", f"{type(e).__name__}: {e}") from None

    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError("undecodable", f"invalid size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")

    orientation = _exif_orientation(img)
    try:
        if target_short_side is not None and img.format in ("JPEG", "MPO"):
            _apply_draft(img, target_short_side)
        img.load()
    except Image.DecompressionBombError as e:  # e.g. a GIF frame larger than its header says
        raise ImageDecodeError("too_large", str(e)) from None
    except EOFError as e:
        raise ImageDecodeError("truncated", f"{type(e).__name__}: {e}") from None
    except Exception as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg.lower() else "undecodable"
        raise ImageDecodeError(reason, f"{type(e).__name__}: {msg}") from None

    try:
        if orientation in _ORIENTATION_TRANSPOSE:
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        return np.asarray(img) if as_array else img
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError("undecodable", f"cannot convert mode {img.mode}: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------------
# Training transform
# --------------------------------------------------------------------------------------------
def _as_hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, (int, np.integer)):
        h = w = int(resolution)
    else:
        try:
            h, w = (int(v) for v in resolution)
        except (TypeError, ValueError):
            raise ValueError(f"resolution must be an int or (height, width), got {resolution!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return h, w


# Largest downscale factor the OpenCV path handles; beyond it the 3-tap prefilter is too narrow.
_CV2_MAX_SCALE = 2.0
# Prefilter weight a of [a, 1 - 2a, a]: _PREFILTER_SLOPE per unit of downscale above 1, capped at
# 1/4 (the [1, 2, 1] / 4 kernel, exact at 2x); see `_prefilter_kernel`.
_PREFILTER_SLOPE = 0.39
_PREFILTER_MAX = 0.25


def _prefilter_kernel(scale: float) -> np.ndarray | None:
    """3-tap low-pass [a, 1 - 2a, a] for a downscale by `scale` in (1, 2] (None for no downscale).

    a = min(1/4, 0.39 * (scale - 1)). At scale 2 prefilter + bilinear interpolation is exactly
    Pillow's antialiased bilinear kernel [1, 3, 3, 1] / 8. The slope is fitted to Pillow's output
    (200 photo-like 640x480 JPEGs, whole-pixel crop boxes, PSNR against Pillow's bilinear): it
    beats the kernel whose variance matches Pillow's triangle ((scale**2 - 1) / 12) at every
    factor measured, by 0.0 dB at 1.02, 0.6-2.3 dB at 1.1-1.6, 0.9 dB at 1.7, 0.6 dB at 1.875
    and 0.1 dB at 1.96 (Pillow's antialiased triangle attenuates more near Nyquist than the variance
    match does). From scale 1.64 on the kernel is [1, 2, 1] / 4, for which OpenCV's fixed-point
    Gaussian blur has a dedicated integer path (~2x faster than a general 3-tap kernel).
    """
    if scale <= 1.0 + 1e-9:
        return None
    a = min(_PREFILTER_MAX, _PREFILTER_SLOPE * (scale - 1.0))
    return np.array([a, 1.0 - 2.0 * a, a], np.float32)


def _gaussian_sigma(kernel: np.ndarray | None) -> tuple[int, float]:
    """(ksize, sigma) for which `cv2.GaussianBlur`'s kernel along one axis is `kernel` (None: (1, 1.0), no filter).

    A 3-tap sampled Gaussian is [r, 1, r] / (1 + 2r) with r = exp(-1 / (2 sigma**2)); r = a / (1 - 2a)
    gives [a, 1 - 2a, a].
    """
    if kernel is None:
        return 1, 1.0
    a = float(kernel[0])
    return 3, math.sqrt(-0.5 / math.log(a / (1.0 - 2.0 * a)))


def _resize_box_cv2(arr: np.ndarray, box: tuple, width: int, height: int) -> np.ndarray:
    """Antialiased resize of the source region `box` of arr [H, W, 3] uint8 to [height, width, 3].

    The region is snapped to whole source pixels (its corner moves by < 0.5 px, its size by
    < 0.5 px, i.e. < 0.4% at the usual sizes), low-pass filtered by `_prefilter_kernel` (on a
    window one pixel wider, so edge pixels see their real neighbours) and bilinearly resampled.
    The prefilter runs as OpenCV's fixed-point (bit-exact) Gaussian blur with the 3-tap kernel
    along each axis (`_gaussian_sigma`).

    Measured (one core, 640x480 JPEGs of the data-loader benchmark, 480x480 random crop boxes to
    256x256, i.e. factor 1.875, right after the decode): 0.29-0.30 ms per image (the previous
    variance-matched kernel through cv2.sepFilter2D: 0.36-0.38), of which the bilinear resize is
    ~0.14. Against Pillow's antialiased resize of the same box, over the 200 images: PSNR 42.47 dB
    to BILINEAR (previous kernel 42.35), 41.82 dB to BICUBIC (41.86), max |diff| 63 grey levels
    (68), mean |diff| 1.16 (1.18); with whole-pixel boxes 53.2 dB to BILINEAR (52.6), i.e. the
    random-box figures are dominated by the box snapping.
    """
    h_in, w_in = arr.shape[:2]
    x0, y0, x1, y1 = box
    ww = min(w_in, max(1, int(round(x1 - x0))))
    hh = min(h_in, max(1, int(round(y1 - y0))))
    ix = min(max(int(round(x0)), 0), w_in - ww)
    iy = min(max(int(round(y0)), 0), h_in - hh)
    kx, ky = _prefilter_kernel(ww / width), _prefilter_kernel(hh / height)
    if kx is None and ky is None:
        src = arr[iy:iy + hh, ix:ix + ww]
    else:
        mx, my = min(ix, 1), min(iy, 1)
        win = arr[iy - my:min(h_in, iy + hh + 1), ix - mx:min(w_in, ix + ww + 1)]
        (kw, sx), (kh, sy) = _gaussian_sigma(kx), _gaussian_sigma(ky)
        win = _cv2.GaussianBlur(win, (kw, kh), sx, sigmaY=sy, borderType=_cv2.BORDER_REPLICATE)
        src = win[my:my + hh, mx:mx + ww]
    return _cv2.resize(src, (width, height), interpolation=_cv2.INTER_LINEAR)


class ImageTransform:
    """Short-side resize + random/centre crop + optional horizontal flip, as uint8 HWC.

    Args:
        resolution: output size, an int (square) or (height, width).
        center_crop: take the centre crop instead of a random one.
        random_flip: mirror horizontally with probability 0.5.
        normalize: the range the pixels are meant for, applied by `normalized` (and by the
            consumer of a batch, `normalize_pixels`): "minus_one_one" (x / 127.5 - 1, the
            diffusion-model convention, default) or "zero_one" (x / 255, e.g. before ImageNet
            normalisation for an EfficientNet).
        resample: Pillow filter for the resize. Default: bilinear, which in Pillow is the
            antialiased triangle filter (its support widens with the downscale factor), the
            same filter diffusers' text-to-image recipe uses; bicubic/Lanczos are sharper and
            1.5-3.5x slower on CPU.
    Call with an RGB `PIL.Image` or a uint8 ndarray [H, W, 3] (`decode_image(..., as_array=True)`)
    and a `numpy.random.Generator`; the output depends only on the image and the generator state.
    Returns ndarray uint8 [height, width, 3] (C-contiguous, writable, never a view of the input):
    the ``pixel_values`` of a sample. `normalized` gives float32 [3, height, width] in the
    `normalize` range instead (`normalize_pixels` of the same pixels).

    Fast path: with the default bilinear filter, OpenCV importable and a downscale by a factor
    in [1, 2] (the usual case after a reduced-scale JPEG decode, whose remaining factor is below
    (M+1)/M),
    the resize is `_resize_box_cv2`: a 3-tap prefilter fitted so that prefilter + bilinear
    interpolation is close to Pillow's antialiased bilinear (identical at factors 1 and 2), then
    OpenCV's SIMD bilinear resize, ~4x faster than Pillow's. Outputs differ from the Pillow
    path by about one grey level on average. Larger factors, other filters, or no OpenCV use
    Pillow's `Image.resize(..., box=...)`.
    """

    def __init__(
        self,
        resolution: int | Sequence[int],
        center_crop: bool = False,
        random_flip: bool = False,
        normalize: str = "minus_one_one",
        resample: int = _RESAMPLE.BILINEAR,
    ):
        self.height, self.width = _as_hw(resolution)
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.normalize = normalize
        self.resample = resample

    def __repr__(self) -> str:
        return (
            f"ImageTransform(resolution=({self.height}, {self.width}), center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}, normalize={self.normalize!r})"
        )

    def crop_box(
        self, size: tuple[int, int], rng: np.random.Generator | None
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Resized size (W', H') covering the target, and the crop's (left, top) in it."""
        w, h = size
        scale = max(self.width / w, self.height / h)
        rw = max(self.width, int(round(w * scale)))
        rh = max(self.height, int(round(h * scale)))
        if self.center_crop:
            left, top = (rw - self.width) // 2, (rh - self.height) // 2
        else:
            if rng is None:
                raise ValueError("ImageTransform with random crop needs a numpy Generator")
            left = int(rng.integers(0, rw - self.width + 1))
            top = int(rng.integers(0, rh - self.height + 1))
        return (rw, rh), (left, top)

    def _flip(self, rng: np.random.Generator | None) -> bool:
        if not self.random_flip:
            return False
        if rng is None:
            raise ValueError("ImageTransform with random_flip needs a numpy Generator")
        return bool(rng.random() < 0.5)

    def _plan(self, size: tuple[int, int], rng):
        """((W', H'), (left, top), source box) of the crop; draws the crop offsets from rng."""
        w, h = size
        (rw, rh), (left, top) = self.crop_box((w, h), rng)
        sx, sy = w / rw, h / rh  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + self.width) * sx, (top + self.height) * sy)
        return (rw, rh), (left, top), box

    def _use_cv2(self, box: tuple) -> bool:
        """OpenCV path: bilinear filter and a downscale by a factor in [1, 2] on both axes.

        Upscales stay on Pillow: snapping the box to whole source pixels would move and stretch
        an upscaled crop by up to half an input pixel, i.e. several output pixels.
        """
        if _cv2 is None or self.resample != _RESAMPLE.BILINEAR:
            return False
        bw, bh = box[2] - box[0], box[3] - box[1]
        return (self.width <= bw <= _CV2_MAX_SCALE * self.width) and (self.height <= bh <= _CV2_MAX_SCALE * self.height)

    def _geometry_array(self, arr: np.ndarray, rng) -> np.ndarray:
        """Resize + crop (+ flip) of arr [H, W, 3] uint8 -> [height, width, 3] uint8."""
        h, w = arr.shape[:2]
        (rw, rh), (left, top), box = self._plan((w, h), rng)
        if (rw, rh) == (w, h):
            out = arr[top:top + self.height, left:left + self.width]
        elif self._use_cv2(box):
            out = _resize_box_cv2(arr, box, self.width, self.height)
        else:
            out = np.asarray(Image.fromarray(arr).resize((self.width, self.height), resample=self.resample, box=box))
        if self._flip(rng):
            out = _cv2.flip(out, 1) if _cv2 is not None else np.ascontiguousarray(out[:, ::-1])
        return out

    def _geometry_pil(self, img: Image.Image, rng) -> Image.Image:
        w, h = img.size
        (rw, rh), (left, top), box = self._plan((w, h), rng)
        if (rw, rh) == (w, h):
            out = img.crop((left, top, left + self.width, top + self.height))
        else:
            out = img.resize((self.width, self.height), resample=self.resample, box=box)
        if self._flip(rng):
            out = out.transpose(_TRANSPOSE_FLIP)
        return out

    @property
    def prefers_array(self) -> bool:
        """True when inputs are best given as uint8 arrays (the OpenCV path is available), so a
        caller can ask `decode_image(..., as_array=...)` for the cheaper form; both work."""
        return _cv2 is not None and self.resample == _RESAMPLE.BILINEAR

    def _as_input(self, img) -> Image.Image | np.ndarray:
        """Validated input: a uint8 [H, W, 3] array when the OpenCV path may be used, else RGB PIL."""
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"ImageTransform expects a uint8 [H, W, 3] array, got {img.dtype} {img.shape}")
            return img if self.prefers_array else Image.fromarray(img)
        if img.mode != "RGB":
            raise ValueError(f"ImageTransform expects an RGB image, got mode {img.mode} (use decode_image / to_rgb)")
        return np.asarray(img) if self.prefers_array else img

    def geometry(self, img, rng: np.random.Generator | None) -> Image.Image:
        """Resize + crop (+ flip) as a PIL image of size (width, height) (same pixels as __call__)."""
        x = self._as_input(img)
        if isinstance(x, np.ndarray):
            return Image.fromarray(self._geometry_array(x, rng))
        return self._geometry_pil(x, rng)

    def __call__(self, img, rng: np.random.Generator | None = None) -> np.ndarray:
        x = self._as_input(img)
        if isinstance(x, np.ndarray):
            out = self._geometry_array(x, rng)  # [H, W, 3] uint8
        else:
            out = np.asarray(self._geometry_pil(x, rng), dtype=np.uint8)
        if not (out.flags.c_contiguous and out.flags.writeable) or (
                isinstance(x, np.ndarray) and np.may_share_memory(out, x)):
            out = np.array(out, dtype=np.uint8, order="C")  # a crop view or Pillow's read-only buffer
        return out

    def normalized(self, img, rng: np.random.Generator | None = None) -> np.ndarray:
        """float32 [3, height, width] in the `normalize` range: `normalize_pixels(self(img, rng))`."""
        return normalize_pixels(self(img, rng), self.normalize)


# x * scale + shift of each mode (NORMALIZE_MODES), applied to uint8 values converted to float32
_NORMALIZE_AFFINE = {"minus_one_one": (1.0 / 127.5, -1.0), "zero_one": (1.0 / 255.0, 0.0)}


def normalize_pixels(pixel_values, normalize: str = "minus_one_one"):
    """uint8 [..., H, W, 3] pixels (a sample's or a collated batch's ``pixel_values``) -> float32
    [..., 3, H, W]: x / 127.5 - 1 ("minus_one_one") or x / 255 ("zero_one").

    A paddle Tensor gives a contiguous paddle Tensor computed where it lives (the training device:
    the host-to-device copy moves uint8): the layout change is a view of the uint8 input, then one
    cast and one `paddle.scale` pass (~1 ms per 256 px sample on one loaded CPU core; numpy takes
    ~0.3 ms). A numpy array gives a C-contiguous numpy array. Both compute float32(x) *
    float32(scale) + shift in float32, bit-equal on CPU (`tests/test_uint8_handover.py`); a device
    that fuses the multiply-add may differ by one ulp.
    """
    if normalize not in _NORMALIZE_AFFINE:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    shape = tuple(pixel_values.shape)
    if len(shape) < 3 or shape[-1] != 3 or not str(pixel_values.dtype).endswith("uint8"):
        raise ValueError(f"normalize_pixels takes uint8 [..., H, W, 3] pixels, got {pixel_values.dtype} {list(shape)}")
    nd = len(shape)
    perm = [*range(nd - 3), nd - 1, nd - 3, nd - 2]  # [..., H, W, C] -> [..., C, H, W]
    scale, shift = _NORMALIZE_AFFINE[normalize]
    if isinstance(pixel_values, np.ndarray):
        out = np.ascontiguousarray(pixel_values.transpose(perm), dtype=np.float32)
        out *= np.float32(scale)
        if shift:
            out += np.float32(shift)
        return out
    import paddle  # (a Tensor was given: paddle is loaded)

    return paddle.scale(pixel_values.transpose(perm).astype("float32"), scale=scale, bias=shift)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DECODE_REASONS",
    "ImageDecodeError",
    "ImageTransform",
    "decode_image",
    "draft_scale",
    "normalize_pixels",
    "to_rgb",
]
