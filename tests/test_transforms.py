"""ldm.data.transforms: decoding (colour modes, EXIF, errors, pixel limit, JPEG draft) and ImageTransform."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm.data import transforms
from ldm.data.transforms import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTransform,
    decode_image,
    draft_scale,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def smooth_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like test image: smooth gradients plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    arr = np.stack(
        [np.sin(xx / 17.0) * 90 + 128, np.cos(yy / 11.0) * 80 + 128, (xx + yy) * 200.0 / (w + h) + 20], axis=-1
    )
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def rgb_of(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int32)


# ------------------------------------------------------------------ colour modes
def test_default_max_pixels_is_pillows():
    assert DEFAULT_MAX_PIXELS == 89478485


def test_cmyk_jpeg_to_rgb():
    # (C, M, Y, K): red, then 50% grey made only of K.
    arr = np.zeros((16, 32, 4), np.uint8)
    arr[:, :16] = (0, 255, 255, 0)
    arr[:, 16:] = (0, 0, 0, 128)
    cmyk = Image.fromarray(arr, "CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = rgb_of(decode_image(data))
    assert out.shape == (16, 32, 3)
    np.testing.assert_allclose(out[4:12, 2:12].mean(axis=(0, 1)), (255, 0, 0), atol=6)
    np.testing.assert_allclose(out[4:12, 20:30].mean(axis=(0, 1)), (127, 127, 127), atol=6)


def test_palette_with_transparency_composited_on_white():
    p = Image.new("P", (8, 4))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    arr = np.zeros((4, 8), np.uint8)
    arr[:, 4:] = 1  # right half uses index 1 = green, declared transparent
    p.putdata(arr.ravel().tolist())
    data = encode(p, "PNG", transparency=1)
    out = rgb_of(decode_image(data))
    assert (out[:, :4] == (255, 0, 0)).all()
    assert (out[:, 4:] == (255, 255, 255)).all()


def test_palette_without_transparency():
    p = Image.new("P", (4, 4))
    p.putpalette([10, 20, 30] + [0] * 765)
    out = rgb_of(decode_image(encode(p, "PNG")))
    assert (out == (10, 20, 30)).all()


def test_la_composited_on_white():
    arr = np.zeros((2, 3, 2), np.uint8)
    arr[..., 0] = 100
    arr[0, :, 1] = (0, 128, 255)
    arr[1, :, 1] = 255
    data = encode(Image.fromarray(arr, "LA"), "PNG")
    out = rgb_of(decode_image(data))
    expected_mid = round(100 * 128 / 255 + 255 * 127 / 255)
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    assert np.abs(out[0, 1] - expected_mid).max() <= 1
    np.testing.assert_array_equal(out[0, 2], (100, 100, 100))
    assert (out[1] == 100).all()


def test_rgba_composited_on_white():
    arr = np.zeros((1, 3, 4), np.uint8)
    arr[0, :, :3] = (10, 20, 30)
    arr[0, :, 3] = (0, 255, 128)
    out = rgb_of(decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG")))
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (10, 20, 30))
    expected = np.round(np.array((10, 20, 30)) * 128 / 255 + 255 * 127 / 255)
    assert np.abs(out[0, 2] - expected).max() <= 1


def test_grayscale_l_and_1bit():
    out = rgb_of(decode_image(encode(Image.new("L", (5, 5), 77), "PNG")))
    assert (out == 77).all()
    out1 = rgb_of(decode_image(encode(Image.new("1", (5, 5), 1), "PNG")))
    assert (out1 == 255).all()


def test_16bit_grayscale_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32896, 65535, 12850]], np.uint16)
    img16 = Image.fromarray(values)  # mode I;16
    data = encode(img16, "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    out = rgb_of(decode_image(data))
    expected = np.round(values.astype(np.float64) / 257.0)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)
    assert out[0, 2, 0] == 4  # a clipping conversion would give 255 here


def test_16bit_full_range_gradient():
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :]
    out = rgb_of(decode_image(encode(Image.fromarray(ramp), "PNG")))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert (np.diff(out[0, :, 0]) >= 0).all()
    assert np.abs(out[0, :, 0] - np.arange(256)).max() <= 1


def test_webp_and_gif_decode():
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert np.abs(rgb_of(decode_image(encode(img, "WEBP", lossless=True))) - (200, 100, 50)).max() == 0
    assert decode_image(encode(img.convert("P"), "GIF")).size == (8, 8)


# ------------------------------------------------------------------ EXIF
def test_exif_orientation_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # stored: left red, right blue
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    out = rgb_of(decode_image(data))
    assert out.shape == (40, 20, 3)  # upright: tall
    np.testing.assert_allclose(out[5, 10], (255, 0, 0), atol=12)  # top is red
    np.testing.assert_allclose(out[35, 10], (0, 0, 255), atol=12)  # bottom is blue
    # draft path keeps the orientation
    out_d = decode_image(encode(Image.fromarray(np.repeat(np.repeat(arr, 8, 0), 8, 1)), "JPEG", exif=exif.tobytes()),
                         target_short_side=40)
    assert out_d.size[1] > out_d.size[0]


# ------------------------------------------------------------------ errors and the pixel limit
def test_garbage_and_empty_are_undecodable():
    for data in (b"", b"not an image at all" * 10, b"\x89PNG\r\n\x1a\n" + b"\0" * 5):
        with pytest.raises(ImageDecodeError) as ei:
            decode_image(data)
        assert ei.value.reason == "undecodable"
        assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(fmt):
    data = encode(smooth_rgb(64, 48), fmt)
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(data[: len(data) * 2 // 3])
    assert ei.value.reason == "truncated"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (the pixel data is a stub)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0"))
        + _png_chunk(b"IEND", b"")
    )


def test_too_large_default_limit_from_header():
    # 20000 x 20000 = 4e8 pixels > 89.5M: rejected from the header, nothing is decoded.
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(_png_header_only(20000, 20000))
    assert ei.value.reason == "too_large"


def test_configurable_limit_and_global_untouched(monkeypatch):
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(data, max_pixels=64 * 64 - 1)
    assert ei.value.reason == "too_large"
    assert decode_image(data, max_pixels=64 * 64).size == (64, 64)
    # The process-wide Pillow limit is neither consulted nor changed.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert decode_image(data, max_pixels=None).size == (64, 64)
    assert decode_image(data).size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 100


# ------------------------------------------------------------------ JPEG draft
def test_draft_scale_choice():
    assert draft_scale((640, 480), 256) == 1
    assert draft_scale((640, 480), 240) == 2
    assert draft_scale((640, 480), 100) == 4
    assert draft_scale((640, 480), 60) == 8
    assert draft_scale((100, 100), 256) == 1


@pytest.mark.parametrize("backend", ["simplejpeg", "pillow"])
@pytest.mark.parametrize("target", [60, 100, 200, 256, 300, 479])
def test_draft_decode_covers_target_and_matches_full(target, backend, monkeypatch):
    if backend == "pillow":
        monkeypatch.setattr(transforms, "_simplejpeg", None)
    elif transforms._simplejpeg is None:
        pytest.skip("simplejpeg not installed")
    img = smooth_rgb(640, 480)
    data = encode(img, "JPEG", quality=90)
    fast = decode_image(data, target_short_side=target)
    full = decode_image(data)
    assert full.size == (640, 480)
    assert min(fast.size) >= target
    # both decoders: Pillow's draft scales 1/2, 1/4, 1/8 (libjpeg-turbo's SIMD IDCTs; its other
    # M/8 scales, e.g. 5/8 for 256 (400x300), were slower than a full decode: issue 15 item 4)
    k = draft_scale((640, 480), target)
    assert fast.size == (-(-640 // k), -(-480 // k))
    assert 8 // k == {60: 1, 100: 2, 200: 4, 256: 8, 300: 8, 479: 8}[target]  # in eighths, as M/8 was
    t = ImageTransform(min(target, 96), center_crop=True)
    a, b = t.normalized(fast), t.normalized(full)
    diff = np.abs(a - b)
    assert diff.mean() < 0.03, diff.mean()  # in [-1, 1] units: < 2 grey levels on average
    assert diff.max() < 0.35, diff.max()


def test_draft_not_applied_to_png():
    data = encode(smooth_rgb(200, 160), "PNG")
    assert decode_image(data, target_short_side=20).size == (200, 160)


# ------------------------------------------------------------------ ImageTransform
def test_transform_shape_range_and_constant_values():
    white = Image.new("RGB", (50, 30), (255, 255, 255))
    black = Image.new("RGB", (50, 30), (0, 0, 0))
    t = ImageTransform(16)
    rng = np.random.default_rng(0)
    w = t.normalized(white, rng)
    assert w.shape == (3, 16, 16) and w.dtype == np.float32
    np.testing.assert_allclose(w, 1.0, atol=1e-6)
    np.testing.assert_allclose(t.normalized(black, rng), -1.0, atol=1e-6)
    z = ImageTransform(16, normalize="zero_one").normalized(white, rng)
    np.testing.assert_allclose(z, 1.0, atol=1e-6)
    x = t.normalized(smooth_rgb(90, 70), rng)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_small_images_are_upscaled():
    small = Image.new("RGB", (20, 12), (40, 80, 120))
    out = ImageTransform(64).normalized(small, np.random.default_rng(0))
    assert out.shape == (3, 64, 64)
    expected = np.array([40, 80, 120], np.float64)[:, None, None] * np.ones((1, 64, 64))
    np.testing.assert_allclose((out + 1) * 127.5, expected, atol=1e-3)


def test_non_square_resolution():
    out = ImageTransform((32, 48), center_crop=True).normalized(smooth_rgb(100, 100))
    assert out.shape == (3, 32, 48)


@pytest.mark.parametrize("backend", ["pillow", "cv2"])
def test_box_resize_equals_resize_then_crop(backend, monkeypatch):
    if backend == "pillow":
        monkeypatch.setattr(transforms, "_cv2", None)
    elif transforms._cv2 is None:
        pytest.skip("opencv not installed")
    img = smooth_rgb(123, 77)
    t = ImageTransform(40)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    got = t.normalized(img, rng_a)
    (rw, rh), (left, top) = t.crop_box(img.size, rng_b)
    ref = img.resize((rw, rh), Image.BILINEAR).crop((left, top, left + 40, top + 40))
    ref = np.asarray(ref).transpose(2, 0, 1) / 127.5 - 1
    assert (rw, rh) == (64, 40)
    diff = np.abs(got - ref)
    if backend == "pillow":
        assert diff.max() <= 2.5 / 127.5
    else:  # prefilter + bilinear vs Pillow's triangle filter, and the box snapped to whole pixels
        assert diff.mean() <= 2.0 / 127.5, diff.mean() * 127.5
        assert diff.max() <= 12.0 / 127.5, diff.max() * 127.5


def test_center_crop_is_centred():
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # white middle third
    out = ImageTransform(10, center_crop=True).normalized(Image.fromarray(arr))
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_determinism_and_flip():
    img = smooth_rgb(97, 61, seed=3)
    t = ImageTransform(32, random_flip=True)
    a = t.normalized(img, np.random.default_rng(42))
    b = t.normalized(img, np.random.default_rng(42))
    np.testing.assert_array_equal(a, b)
    outs = [t.normalized(img, np.random.default_rng(s)) for s in range(12)]
    assert any(np.abs(o - a).max() > 0.1 for o in outs)
    # flip: with a centre crop the only randomness is the mirror
    tc = ImageTransform(32, center_crop=True, random_flip=True)
    plain = ImageTransform(32, center_crop=True).normalized(img)
    seen = set()
    for s in range(16):
        o = tc.normalized(img, np.random.default_rng(s))
        if np.array_equal(o, plain):
            seen.add("plain")
        elif np.array_equal(o, plain[:, :, ::-1]):
            seen.add("flipped")
        else:
            raise AssertionError("output is neither the crop nor its mirror")
    assert seen == {"plain", "flipped"}


def test_bad_arguments():
    with pytest.raises(ValueError):
        ImageTransform(0)
    with pytest.raises(ValueError):
        ImageTransform(8, normalize="imagenet")
    with pytest.raises(ValueError):
        ImageTransform(8)(Image.new("L", (8, 8)), np.random.default_rng(0))
    with pytest.raises(ValueError):
        decode_image(b"x", max_pixels=0)


# ------------------------------------------------------------------ simplejpeg fast path vs Pillow
needs_simplejpeg = pytest.mark.skipif(transforms._simplejpeg is None, reason="simplejpeg not installed")


def _both_paths(monkeypatch, data: bytes, **kw):
    """(result or error reason) of decode_image with simplejpeg, then with Pillow only."""
    out = []
    for use_fast in (True, False):
        with monkeypatch.context() as m:
            if not use_fast:
                m.setattr(transforms, "_simplejpeg", None)
            try:
                out.append(decode_image(data, **kw))
            except ImageDecodeError as e:
                out.append(e.reason)
    return out


def _spy_decode(monkeypatch) -> list:
    calls = []
    real = transforms._simplejpeg.decode_jpeg

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(transforms._simplejpeg, "decode_jpeg", spy)
    return calls


@needs_simplejpeg
def test_fast_path_full_size_equals_pillow(monkeypatch):
    calls = _spy_decode(monkeypatch)
    for kw in ({}, {"subsampling": 0}, {"progressive": True}):
        data = encode(smooth_rgb(97, 61, seed=1), "JPEG", quality=88, **kw)
        fast, slow = _both_paths(monkeypatch, data)
        assert fast.mode == "RGB" and fast.size == slow.size == (97, 61)
        assert np.abs(rgb_of(fast) - rgb_of(slow)).max() <= 1
    gray = encode(smooth_rgb(40, 30).convert("L"), "JPEG")
    fast, slow = _both_paths(monkeypatch, gray)
    np.testing.assert_array_equal(rgb_of(fast), rgb_of(slow))
    assert len(calls) == 4  # every file above went through simplejpeg


@needs_simplejpeg
@pytest.mark.parametrize("target", [100, 256])
def test_fast_path_scaled_close_to_pillow(monkeypatch, target):
    data = encode(smooth_rgb(640, 480, seed=2), "JPEG", quality=90)
    fast, slow = _both_paths(monkeypatch, data, target_short_side=target)
    assert min(fast.size) >= target and min(slow.size) >= target
    assert fast.size == slow.size  # the same scale on both decoders (256: full size, 100: 1/4)
    t = ImageTransform(target, center_crop=True)
    diff = np.abs(t.normalized(fast) - t.normalized(slow))
    assert diff.mean() < 0.02, diff.mean()  # [-1, 1] units: about 1 grey level on average
    assert diff.max() < 0.3, diff.max()


@needs_simplejpeg
def test_fast_chroma_upsampling_only_before_a_downscale(monkeypatch):
    # 640x480 decoded at full size: short side 480 >= 1.5 x 256 (or 320), and at 1/4 (120) >= 1.5 x 70
    # -> replicated chroma; 480 < 1.5 x 400, no target, or 1/2 (240) for 200 -> the triangle filter
    data = encode(smooth_rgb(640, 480, seed=4), "JPEG", quality=90)
    calls = _spy_decode(monkeypatch)
    for target in (256, 320, 400, None, 200, 70):
        decode_image(data, target_short_side=target, as_array=True)
    assert [c["fastupsample"] for c in calls] == [True, True, False, False, False, True]
    # what it changes after the training resize: well under a grey level on average
    exact = transforms._simplejpeg.decode_jpeg(data, colorspace="RGB")
    fast = decode_image(data, target_short_side=256, as_array=True)
    assert fast.shape == exact.shape and not np.array_equal(fast, exact)
    t = ImageTransform(256, center_crop=True)
    diff = np.abs(t(fast).astype(np.int16) - t(exact).astype(np.int16))
    assert diff.mean() < 1.0, diff.mean()
    assert diff.max() <= 24, diff.max()


@needs_simplejpeg
def test_fast_path_short_side_covers_target_portrait_and_small():
    portrait = encode(smooth_rgb(333, 517), "JPEG")
    for target in (1, 42, 65, 100, 126, 200, 256, 333):
        img = decode_image(portrait, target_short_side=target)
        assert img.size[0] >= target and img.size[1] > img.size[0]
        assert img.size[0] <= 333
    small = encode(smooth_rgb(50, 40), "JPEG")
    assert decode_image(small, target_short_side=256).size == (50, 40)  # never upscaled by the decoder


@needs_simplejpeg
@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_path_exif_orientation_same_as_pillow(monkeypatch, orientation):
    arr = np.zeros((24, 40, 3), np.uint8)
    arr[:12, :20] = (255, 0, 0)
    arr[:12, 20:] = (0, 255, 0)
    arr[12:, :20] = (0, 0, 255)
    arr[12:, 20:] = (250, 250, 250)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    calls = _spy_decode(monkeypatch)
    fast, slow = _both_paths(monkeypatch, data)
    assert len(calls) == 1
    assert fast.size == slow.size == ((24, 40) if orientation >= 5 else (40, 24))
    assert np.abs(rgb_of(fast) - rgb_of(slow)).max() <= 1


@needs_simplejpeg
def test_fast_path_xmp_orientation_same_as_pillow(monkeypatch):
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    data = encode(smooth_rgb(40, 24), "JPEG", xmp=xmp)
    fast, slow = _both_paths(monkeypatch, data)
    assert fast.size == slow.size
    assert np.abs(rgb_of(fast) - rgb_of(slow)).max() <= 1


@needs_simplejpeg
def test_fast_path_truncation_reasons_same_as_pillow(monkeypatch):
    for kw in ({}, {"progressive": True}):
        data = encode(smooth_rgb(64, 48, seed=4), "JPEG", quality=90, **kw)
        for cut in (2, 3, 20, 150, len(data) // 3, len(data) // 2, len(data) * 2 // 3, len(data) - 40, len(data) - 2):
            fast, slow = _both_paths(monkeypatch, data[:cut])
            if isinstance(slow, str):
                assert fast == slow, (kw, cut, fast, slow)
            else:  # Pillow decodes it: the fast path must give the same pixels
                assert np.abs(rgb_of(fast) - rgb_of(slow)).max() <= 1, (kw, cut)
        with pytest.raises(ImageDecodeError) as ei:
            decode_image(data[: len(data) * 2 // 3])
        assert ei.value.reason == "truncated"


@needs_simplejpeg
def test_fast_path_corrupt_data_warning_falls_back_to_pillow(monkeypatch):
    data = encode(smooth_rgb(64, 48), "JPEG")
    assert data.endswith(b"\xff\xd9")
    junk = data[:-2] + b"\x00\x01\x02" + data[-2:]  # libjpeg warns "extraneous bytes before marker"
    fast, slow = _both_paths(monkeypatch, junk)
    assert not isinstance(slow, str)
    np.testing.assert_array_equal(rgb_of(fast), rgb_of(slow))


@needs_simplejpeg
def test_fast_path_cmyk_and_limit(monkeypatch):
    arr = np.zeros((16, 32, 4), np.uint8)
    arr[:, :16] = (0, 255, 255, 0)
    data = encode(Image.fromarray(arr, "CMYK"), "JPEG", quality=95)
    calls = _spy_decode(monkeypatch)
    out = rgb_of(decode_image(data))
    assert calls == []  # CMYK is left to Pillow
    np.testing.assert_allclose(out[4:12, 2:12].mean(axis=(0, 1)), (255, 0, 0), atol=6)
    big = encode(smooth_rgb(64, 64), "JPEG")
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(big, max_pixels=64 * 64 - 1)
    assert ei.value.reason == "too_large"
    assert calls == []  # rejected from the header, nothing decoded


def test_jpeg_app1_scan():
    plain = encode(smooth_rgb(16, 16), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 3
    assert transforms._jpeg_has_app1(plain) is False
    assert transforms._jpeg_has_app1(encode(smooth_rgb(16, 16), "JPEG", exif=exif.tobytes())) is True
    assert transforms._jpeg_has_app1(plain[:2] + b"\x00" + plain[2:]) is None  # garbage between segments
    assert transforms._jpeg_has_app1(plain[:30]) is None  # ends before SOS


# ------------------------------------------------------------------ OpenCV resize path vs Pillow
needs_cv2 = pytest.mark.skipif(transforms._cv2 is None, reason="opencv not installed")


def _both_resizers(monkeypatch, t: ImageTransform, img, seed: int = 0):
    fast = t.normalized(img, np.random.default_rng(seed))
    with monkeypatch.context() as m:
        m.setattr(transforms, "_cv2", None)
        slow = t.normalized(img, np.random.default_rng(seed))
    return fast, slow


def test_prefilter_kernel():
    assert transforms._prefilter_kernel(1.0) is None and transforms._prefilter_kernel(0.5) is None
    np.testing.assert_allclose(transforms._prefilter_kernel(2.0), [0.25, 0.5, 0.25])
    k = transforms._prefilter_kernel(300 / 256)
    assert k.sum() == pytest.approx(1.0) and 0.06 < k[0] < 0.07
    # a = min(1/4, 0.39 * (scale - 1)): the fitted slope, capped at the [1, 2, 1] / 4 kernel from 1.64
    for scale, a in ((1.1, 0.039), (1.5, 0.195), (1.6, 0.234), (1.65, 0.25), (1.875, 0.25)):
        np.testing.assert_allclose(transforms._prefilter_kernel(scale), [a, 1 - 2 * a, a], rtol=1e-5)


@needs_cv2
@pytest.mark.parametrize("scale", [1.1, 1.5, 1.875, 2.0])
def test_gaussian_sigma_gives_the_prefilter(scale):
    # cv2.GaussianBlur with (ksize, sigma) of `_gaussian_sigma` applies exactly `_prefilter_kernel`
    k = transforms._prefilter_kernel(scale)
    ksize, sigma = transforms._gaussian_sigma(k)
    assert ksize == 3
    np.testing.assert_allclose(transforms._cv2.getGaussianKernel(3, sigma).ravel(), k, atol=1e-7)
    assert transforms._gaussian_sigma(None) == (1, 1.0)
    # on an image: fixed-point rounding only (< 1 grey level), horizontally and vertically
    img = np.asarray(smooth_rgb(40, 30, seed=8))
    exact = transforms._cv2.sepFilter2D(img.astype(np.float32), -1, k, k, borderType=transforms._cv2.BORDER_REPLICATE)
    fast = transforms._cv2.GaussianBlur(img, (3, 3), sigma, sigmaY=sigma, borderType=transforms._cv2.BORDER_REPLICATE)
    assert np.abs(fast - exact).max() <= 1.0


def _psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


@needs_cv2
def test_cv2_resize_psnr_against_pillow():
    # The OpenCV path against Pillow's antialiased bilinear resize of the same box (what the Pillow
    # path does), 640x480 at factors 1.875 (-> 256, the data-loader benchmark's case) and 1.3
    # (-> 369), whole-pixel and fractional (snapped) crop boxes. Floors just below what the kernel
    # measured on this image (dB: 53.98, 47.21, 49.03, 51.63, 43.69); the variance-matched kernel
    # it replaced measured 53.68, 47.01, 48.83, 50.52, 42.99.
    img = smooth_rgb(640, 480, seed=11)
    arr = np.asarray(img)
    for size, box, floor in (
        (256, (80, 0, 560, 480), 53.8),
        (256, (37.4, 0, 517.4, 480), 47.0),
        (256, (1.7, 0, 481.7, 480), 48.8),
        (369, (80, 0, 560, 480), 51.4),
        (369, (37.4, 2.6, 517.4, 480), 43.5),
    ):
        fast = transforms._resize_box_cv2(arr, box, size, size)
        ref = np.asarray(img.resize((size, size), Image.BILINEAR, box=box))
        assert fast.shape == ref.shape == (size, size, 3)
        assert _psnr(fast, ref) >= floor, (size, box, _psnr(fast, ref))


@needs_cv2
@pytest.mark.parametrize("size", [(400, 300), (300, 400), (512, 512), (640, 480), (100, 90), (20, 12)])
def test_cv2_resize_close_to_pillow(monkeypatch, size):
    img = smooth_rgb(*size, seed=9)
    for center in (True, False):
        t = ImageTransform(256 if min(size) >= 256 else 64, center_crop=center, random_flip=True)
        fast, slow = _both_resizers(monkeypatch, t, img, seed=3)
        # grey levels; mostly from snapping the crop box to whole source pixels (< 0.5 px shift) on
        # these steep, noisy gradients (Pillow BOX vs BILINEAR differ by ~2 levels on photos)
        diff = np.abs(fast - slow) * 127.5
        assert fast.shape == slow.shape and fast.dtype == np.float32
        assert diff.mean() < 2.0, (size, center, diff.mean())
        assert diff.max() <= 12, (size, center, diff.max())


@needs_cv2
def test_cv2_factor_two_matches_pillow_kernel(monkeypatch):
    # At an exact 2x downscale prefilter + bilinear is Pillow's kernel [1, 3, 3, 1] / 8.
    img = smooth_rgb(128, 128, seed=5)
    fast, slow = _both_resizers(monkeypatch, ImageTransform(64, center_crop=True), img)
    inner = np.abs(fast - slow)[:, 2:-2, 2:-2] * 127.5
    assert inner.max() <= 1.01, inner.max()


@needs_cv2
def test_large_downscale_and_other_filters_use_pillow(monkeypatch):
    img = smooth_rgb(300, 200, seed=6)
    fast, slow = _both_resizers(monkeypatch, ImageTransform(64, center_crop=True), img)  # factor 3.1 > 2
    np.testing.assert_array_equal(fast, slow)
    t = ImageTransform(150, center_crop=True, resample=Image.BICUBIC)  # factor 1.33, not bilinear
    fast, slow = _both_resizers(monkeypatch, t, img)
    np.testing.assert_array_equal(fast, slow)


def test_array_input_equals_pil_input():
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [
        encode(smooth_rgb(130, 90, seed=1), "JPEG"),
        encode(smooth_rgb(130, 90, seed=2), "JPEG", exif=exif.tobytes()),
        encode(smooth_rgb(70, 50, seed=3), "PNG"),
    ]
    t = ImageTransform(48, random_flip=True)
    for data in files:
        arr = decode_image(data, target_short_side=48, as_array=True)
        img = decode_image(data, target_short_side=48)
        assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == (img.size[1], img.size[0], 3)
        np.testing.assert_array_equal(arr, np.asarray(img))
        for seed in range(4):
            np.testing.assert_array_equal(t(arr, np.random.default_rng(seed)), t(img, np.random.default_rng(seed)))
        np.testing.assert_array_equal(np.asarray(t.geometry(arr, np.random.default_rng(0))),
                                      np.asarray(t.geometry(img, np.random.default_rng(0))))
    with pytest.raises(ValueError):
        t(np.zeros((8, 8), np.uint8), np.random.default_rng(0))


def test_array_input_without_cv2(monkeypatch):
    monkeypatch.setattr(transforms, "_cv2", None)
    img = smooth_rgb(90, 70, seed=4)
    t = ImageTransform(32, random_flip=True)
    for seed in range(4):
        np.testing.assert_array_equal(t(np.asarray(img), np.random.default_rng(seed)), t(img, np.random.default_rng(seed)))
