"""ldm.data.folder.FolderDataset: stem pairing, caption errors, UTF-8, EXIF, corrupt images, collation."""
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from ldm.data import collate
from ldm.data.folder import FolderDataset, scan_folder
from ldm.data.transforms import normalize_pixels

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def write_image(path, size, colour, fmt=None, **kw):
    Image.new("RGB", size, colour).save(path, fmt, **kw)


def write_caption(path, text, encoding="utf-8"):
    with open(path, "wb") as f:
        f.write(text.encode(encoding))


def mean_rgb(pixel_values):
    return (pixel_values.mean(axis=(1, 2)) + 1.0) * 127.5


def normalized(sample, normalize="minus_one_one"):
    """A sample's uint8 [H, W, 3] pixels (the schema) as the training step sees them: float32 [3, H, W]."""
    assert sample["pixel_values"].dtype == np.uint8 and sample["pixel_values"].shape[-1] == 3
    return normalize_pixels(sample["pixel_values"], normalize)


def test_pairs_by_stem_not_sort_order(tmp_path):
    # Sorted images: a.jpg, b.png, c.JPEG, d.webp; sorted captions: 0_orphan.txt, a.txt, b.txt, c.TXT, d.txt.
    # Zipping the two sorted lists would give a.jpg the orphan's caption.
    write_image(tmp_path / "a.jpg", (40, 30), COLOURS["red"], quality=95)
    write_image(tmp_path / "b.png", (30, 40), COLOURS["green"])
    write_image(tmp_path / "c.JPEG", (32, 32), COLOURS["blue"], "JPEG", quality=95)
    write_image(tmp_path / "d.webp", (50, 20), COLOURS["white"], "WEBP", lossless=True)
    write_caption(tmp_path / "0_orphan.txt", "orphan caption")
    write_caption(tmp_path / "a.txt", "red")
    write_caption(tmp_path / "b.txt", "green\n")
    write_caption(tmp_path / "c.TXT", "  blue  ")
    write_caption(tmp_path / "d.txt", "white")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "e.jpg", (8, 8), COLOURS["red"])

    ds = FolderDataset(str(tmp_path), resolution=16, center_crop=True)
    assert len(ds) == 4
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a.jpg", "b.png", "c.JPEG", "d.webp"]
    for i in range(len(ds)):
        s = ds[i]
        x = normalized(s)
        assert x.shape == (3, 16, 16) and x.dtype == np.float32
        np.testing.assert_allclose(mean_rgb(x), COLOURS[s["caption"]], atol=8)


def test_missing_captions_listed_or_skipped(tmp_path):
    write_image(tmp_path / "a.jpg", (20, 20), COLOURS["red"])
    write_caption(tmp_path / "a.txt", "red")
    write_image(tmp_path / "lonely1.png", (20, 20), COLOURS["green"])
    write_image(tmp_path / "lonely2.jpg", (20, 20), COLOURS["blue"])
    with pytest.raises(ValueError) as ei:
        FolderDataset(str(tmp_path), resolution=8)
    msg = str(ei.value)
    assert "2 image(s)" in msg and "lonely1.png" in msg and "lonely2.jpg" in msg and "a.jpg" not in msg
    ds = FolderDataset(str(tmp_path), resolution=8, skip_missing_captions=True)
    assert len(ds) == 1 and ds[0]["caption"] == "red"
    assert sorted(os.path.basename(p) for p in ds.skipped["missing_caption"]) == ["lonely1.png", "lonely2.jpg"]


def test_utf8_captions(tmp_path):
    text = "雪中的哈尔滨 — café, naïve 🚀"
    write_image(tmp_path / "0001.jpg", (20, 20), COLOURS["red"])
    write_caption(tmp_path / "0001.txt", "\n  " + text + " \r\n")
    write_image(tmp_path / "0002.jpg", (20, 20), COLOURS["red"])
    write_caption(tmp_path / "0002.txt", "\ufeff" + text)  # UTF-8 with a BOM (Windows Notepad)
    ds = FolderDataset(str(tmp_path), resolution=8)
    assert [ds[0]["caption"], ds[1]["caption"]] == [text, text]


def test_non_utf8_caption_names_the_file(tmp_path):
    write_image(tmp_path / "0001.jpg", (20, 20), COLOURS["red"])
    write_caption(tmp_path / "0001.txt", "café", encoding="latin-1")
    with pytest.raises(ValueError) as ei:
        FolderDataset(str(tmp_path), resolution=8)
    assert "0001.txt" in str(ei.value) and "UTF-8" in str(ei.value)


def test_exif_rotated_image_comes_out_upright(tmp_path):
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = COLOURS["red"]  # stored: left red, right blue
    arr[:, 32:] = COLOURS["blue"]
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: top red, bottom blue
    Image.fromarray(arr).save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    write_caption(tmp_path / "rot.txt", "rotated")
    x = normalized(FolderDataset(str(tmp_path), resolution=(32, 16), center_crop=True)[0])
    rgb = (x + 1.0) * 127.5
    np.testing.assert_allclose(rgb[:, 3:10].mean(axis=(1, 2)), COLOURS["red"], atol=12)
    np.testing.assert_allclose(rgb[:, 22:29].mean(axis=(1, 2)), COLOURS["blue"], atol=12)


def test_mixed_sizes_collate(tmp_path):
    for name, size in [("wide", (200, 50)), ("tiny", (9, 7)), ("tall", (40, 160)), ("square", (64, 64))]:
        write_image(tmp_path / f"{name}.png", size, COLOURS["green"])
        write_caption(tmp_path / f"{name}.txt", name)
    ds = FolderDataset(str(tmp_path), resolution=24, random_flip=True)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (4, 24, 24, 3) and batch["pixel_values"].dtype == np.uint8  # the schema
    pv = normalize_pixels(batch["pixel_values"])
    assert pv.shape == (4, 3, 24, 24) and pv.dtype == np.float32
    assert batch["caption"] == ["square", "tall", "tiny", "wide"]
    loader = paddle.io.DataLoader(ds, batch_size=4, shuffle=False, num_workers=0, collate_fn=collate)
    got = next(iter(loader))
    assert tuple(normalize_pixels(got["pixel_values"]).shape) == (4, 3, 24, 24)


def test_deterministic_for_seed_and_epoch(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "n.png")
    write_caption(tmp_path / "n.txt", "noise")
    a = FolderDataset(str(tmp_path), resolution=16, random_flip=True, seed=7)
    b = FolderDataset(str(tmp_path), resolution=16, random_flip=True, seed=7)
    np.testing.assert_array_equal(a[0]["pixel_values"], b[0]["pixel_values"])
    np.testing.assert_array_equal(a[0]["pixel_values"], a[0]["pixel_values"])
    views = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        views.add(a[0]["pixel_values"].tobytes())
    assert len(views) > 1  # new crops per epoch
    c = FolderDataset(str(tmp_path), resolution=16, random_flip=True, seed=8)
    assert any(
        not np.array_equal(FolderDataset(str(tmp_path), resolution=16, seed=s)[0]["pixel_values"], c[0]["pixel_values"])
        for s in range(3)
    )


def test_zero_one_normalisation(tmp_path):
    write_image(tmp_path / "w.png", (10, 10), (255, 255, 255))
    write_caption(tmp_path / "w.txt", "w")
    write_image(tmp_path / "k.png", (10, 10), (0, 0, 0))
    write_caption(tmp_path / "k.txt", "k")
    ds = FolderDataset(str(tmp_path), resolution=8, normalize="zero_one")
    got = {ds[i]["caption"]: normalized(ds[i], "zero_one") for i in range(2)}
    np.testing.assert_allclose(got["w"], 1.0, atol=1e-6)
    np.testing.assert_allclose(got["k"], 0.0, atol=1e-6)


def test_corrupt_images_raise_or_skip(tmp_path):
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "good.jpg", quality=90)  # cut below: inside the pixel data
    write_caption(tmp_path / "good.txt", "good")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    write_caption(tmp_path / "garbage.txt", "garbage")
    full = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    write_caption(tmp_path / "cut.txt", "cut")
    with pytest.raises(ValueError) as ei:
        FolderDataset(str(tmp_path), resolution=8)
    msg = str(ei.value)
    assert "2 image(s)" in msg and "garbage.png (undecodable)" in msg and "cut.jpg (truncated)" in msg
    ds = FolderDataset(str(tmp_path), resolution=8, skip_corrupt_images=True)
    assert len(ds) == 1 and ds[0]["caption"] == "good"
    assert sorted((os.path.basename(p), r) for p, r in ds.skipped["corrupt"]) == [
        ("cut.jpg", "truncated"),
        ("garbage.png", "undecodable"),
    ]
    lazy = FolderDataset(str(tmp_path), resolution=8, verify_images=False)
    assert len(lazy) == 3
    with pytest.raises(ValueError, match="garbage.png"):
        lazy[[os.path.basename(p) for p, _ in lazy.samples].index("garbage.png")]


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataset(str(tmp_path / "nope"), resolution=8)
    write_caption(tmp_path / "only.txt", "caption without image")
    with pytest.raises(ValueError, match="no image/caption pairs"):
        FolderDataset(str(tmp_path), resolution=8)
    with pytest.raises(NotADirectoryError):
        scan_folder(str(tmp_path / "only.txt"))


def test_demo_dataset_loads():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo_dataset")
    ds = FolderDataset(root, resolution=64, center_crop=True)
    assert len(ds) == 8
    assert all(cap for _, cap in ds.samples)
    assert normalized(ds[0]).shape == (3, 64, 64)


def test_dataloader_workers_match_main_process():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo_dataset")
    ds = FolderDataset(root, resolution=32, random_flip=True, seed=3)
    loader = paddle.io.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    for b, batch in enumerate(batches):
        ref = collate([ds[i] for i in range(4 * b, 4 * b + 4)])
        np.testing.assert_array_equal(np.asarray(batch["pixel_values"]), ref["pixel_values"])
        assert batch["caption"] == ref["caption"]
