"""create_pretraining_data.py / ldm.data.prepare: layout, round trip into the dataset, skips."""
import base64
import collections
import gzip
import io
import json
import logging
import os

import numpy as np
import pytest

from laion_fixtures import image_bytes
from ldm.data.laion import LaionDataset
from ldm.data.prepare import create_pretraining_data
from ldm.data.transforms import ImageTransform, normalize_pixels


def _make_jsonl(folder, items, name="data.jsonl"):
    """items: (caption, image relative name, bytes or None, extra json) -> jsonl in folder."""
    os.makedirs(folder / "imgs", exist_ok=True)
    lines = []
    for item in items:
        if isinstance(item, str):
            lines.append(item)  # a raw (possibly broken) line
            continue
        caption, rel, data = item
        if data is not None:
            (folder / rel).write_bytes(data)
        lines.append(json.dumps({"caption": caption, "image": rel, "image_id": rel}, ensure_ascii=False))
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# JPEG short sides <= 10 = the dataset resolution of the round trip: no reduced-scale (DCT) decode
# happens, so the dataset's pixels must equal a direct full decode exactly.
GOOD = [
    ("a red\tcar\non a road\r\n", "imgs/0.jpg", image_bytes(20, 10, "JPEG", seed=0)),  # crop only
    ("中文 caption", "imgs/1.png", image_bytes(6, 5, "PNG", seed=1)),  # smaller than R: upscaled
    ("plain", "imgs/2.jpg", image_bytes(10, 16, "JPEG", seed=2)),
    ("rgba", "imgs/3.png", image_bytes(9, 12, "PNG", seed=3, mode="RGBA")),
    ("five", "imgs/4.jpg", image_bytes(9, 13, "JPEG", seed=4)),
]
CLEAN = ["a red car on a road  ", "中文 caption", "plain", "rgba", "five"]


def test_round_trip_jsonl_parts_dataset(tmp_path, monkeypatch):
    src = tmp_path / "src"
    jsonl = _make_jsonl(src, GOOD)
    out = tmp_path / "out"
    res = create_pretraining_data(
        str(jsonl), str(out), per_part_file_num=2, save_gzip_file=True, num_repeat=3, progress=False
    )
    assert res.written == 5 and res.skipped == {}
    # layout exactly as the seed's
    assert sorted(os.listdir(out)) == ["filelist", "laion400m_format_data"]
    assert sorted(os.listdir(out / "filelist")) == ["custom_dataset.filelist", "custom_dataset.filelist.list"]
    assert sorted(os.listdir(out / "laion400m_format_data")) == ["part-000001.gz", "part-000002.gz", "part-000003.gz"]
    # absolute paths: they mean these files from any working directory
    fl = str(out / "filelist" / "custom_dataset.filelist")
    assert (out / "filelist" / "custom_dataset.filelist.list").read_text() == fl + "\n"
    listed = (out / "filelist" / "custom_dataset.filelist").read_text().splitlines()
    assert listed == [str(out / "laion400m_format_data" / f"part-00000{i}.gz") for i in (1, 2, 3)] * 3

    # records: caption \t NONE \t base64(original bytes), tabs/newlines replaced
    lines = []
    for i in (1, 2, 3):
        with gzip.open(out / "laion400m_format_data" / f"part-00000{i}.gz", "rb") as f:
            lines += f.read().decode("utf-8").splitlines()
    assert len(lines) == 5
    for line, (_, rel, data), cap in zip(lines, GOOD, CLEAN):
        assert line.split("\t") == [cap, "NONE", base64.b64encode(data).decode()]

    # the dataset, from another working directory, single pass, no repeat lines needed
    monkeypatch.chdir(tmp_path)
    ds = LaionDataset(res.filelist_list, resolution=10, random_flip=True, infinite=False, rank=0, world_size=1)
    samples = list(ds.iter_consumer())
    counts = collections.Counter(s["caption"] for s in samples)
    assert counts == collections.Counter({c: 3 for c in CLEAN})  # num_repeat=3: three passes
    # relative file-list paths from other working directories
    for cwd, rel in [(out, "filelist/custom_dataset.filelist.list"), (out / "filelist", "custom_dataset.filelist"),
                     (out / "laion400m_format_data", "../filelist/custom_dataset.filelist.list")]:
        monkeypatch.chdir(cwd)
        other = LaionDataset(rel, resolution=4, infinite=False, rank=0, world_size=1)
        assert sorted(s["caption"] for s in other.iter_consumer()) == sorted(CLEAN * 3)
    # pixels == an independent full decode of the ORIGINAL image file + the same transform with the
    # same random stream (the dataset's rng for seed 0, epoch 0, rank 0/1, worker 0/1; no caption
    # dropout, so the transform's crop and flip draws are the only ones).
    tf = ImageTransform(10, random_flip=True)
    rng = np.random.default_rng([0, 0, 0, 1, 0, 1])
    files = {c: src / rel for (_, rel, _), c in zip(GOOD, CLEAN)}
    for s in samples:
        expect = tf(_direct_decode(files[s["caption"]]), rng)
        np.testing.assert_array_equal(s["pixel_values"], expect)


def _direct_decode(path):
    """Independent reference decode: the whole file with Pillow, alpha composited onto white."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")


def _smooth_jpeg(width, height):
    """A smooth gradient JPEG: reduced-scale and full decodes differ only by resampling."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    wave = 127.5 + 100 * np.sin(np.pi * (x / width + y / height))
    arr = np.stack([255 * x / (width - 1), 255 * y / (height - 1), wave], -1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_round_trip_large_jpegs_within_tolerance_of_full_decode(tmp_path):
    """JPEGs much larger than R take the fast path (decode at a reduced DCT scale, then resize):
    the result may differ from a full decode + the same transform, by at most MAX_DIFF per value
    and MEAN_DIFF on average, in [-1, 1] units (0.16 = 20 grey levels, 0.05 = 6.4)."""
    MAX_DIFF, MEAN_DIFF = 0.16, 0.05
    sizes = [(96, 72), (72, 96), (160, 120), (64, 48)]  # 4:3, so both paths crop the same resized size
    items = [(f"big{i}", f"imgs/big{i}.jpg", _smooth_jpeg(w, h)) for i, (w, h) in enumerate(sizes)]
    jsonl = _make_jsonl(tmp_path / "src", items)
    res = create_pretraining_data(str(jsonl), str(tmp_path / "out"), num_workers=0, progress=False)
    assert res.written == 4
    ds = LaionDataset(res.filelist_list, resolution=16, random_flip=True, infinite=False, rank=0, world_size=1,
                      shuffle_files=False)
    samples = list(ds.iter_consumer())
    assert [s["caption"] for s in samples] == ["big0", "big1", "big2", "big3"]
    tf = ImageTransform(16, random_flip=True)
    rng = np.random.default_rng([0, 0, 0, 1, 0, 1])
    for s, (_, rel, _) in zip(samples, items):
        diff = np.abs(normalize_pixels(s["pixel_values"]) - tf.normalized(_direct_decode(tmp_path / "src" / rel), rng))
        assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (rel, diff.max(), diff.mean())


def test_filelists_from_another_datasets_folder_read_their_own_records(tmp_path, monkeypatch):
    """Two outputs with the same --output_name: out2's list read while the working directory is
    out1/filelist (where `custom_dataset.filelist` also exists) must give out2's records."""
    lists = {}
    for name, caps in (("out1", ["one-a", "one-b"]), ("out2", ["two-a", "two-b", "two-c"])):
        items = [(c, f"imgs/{c}.png", image_bytes(6, 6, "PNG", seed=i)) for i, c in enumerate(caps)]
        jsonl = _make_jsonl(tmp_path / f"src_{name}", items)
        res = create_pretraining_data(str(jsonl), str(tmp_path / name), num_workers=0, progress=False)
        lists[name] = (res.filelist_list, res.filelist, sorted(caps))
    monkeypatch.chdir(tmp_path / "out1" / "filelist")
    for listing in lists["out2"][:2]:
        ds = LaionDataset(listing, resolution=4, infinite=False, rank=0, world_size=1)
        assert sorted(s["caption"] for s in ds.iter_consumer()) == lists["out2"][2]
    monkeypatch.chdir(tmp_path / "out2" / "laion400m_format_data")  # part-000001 exists here too
    ds = LaionDataset(lists["out1"][0], resolution=4, infinite=False, rank=0, world_size=1)
    assert sorted(s["caption"] for s in ds.iter_consumer()) == lists["out1"][2]


def test_rerun_removes_stale_filelists_first(tmp_path, monkeypatch):
    """A re-run into the same folder that fails half-way has replaced part files: the previous
    run's filelists must be gone, not left listing a mix of old and new parts."""
    import ldm.data.prepare as prepare

    jsonl = _make_jsonl(tmp_path / "src", GOOD)
    out = tmp_path / "out"
    first = create_pretraining_data(str(jsonl), str(out), per_part_file_num=1, num_workers=0, progress=False)
    other = create_pretraining_data(str(jsonl), str(out), output_name="other", num_workers=0, progress=False)
    assert os.path.isfile(first.filelist) and os.path.isfile(first.filelist_list)
    real, calls = prepare.encode_image_file, []

    def failing(path, max_pixels):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(path, max_pixels)

    monkeypatch.setattr(prepare, "encode_image_file", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        create_pretraining_data(str(jsonl), str(out), per_part_file_num=1, num_workers=0, progress=False)
    assert sorted(os.listdir(out / "filelist")) == ["other.filelist", "other.filelist.list"]
    assert os.path.isfile(other.filelist_list)
    # a re-run that writes nothing also leaves no filelist of that name behind
    monkeypatch.setattr(prepare, "encode_image_file", real)
    create_pretraining_data(str(jsonl), str(out), per_part_file_num=1, num_workers=0, progress=False)
    assert os.path.isfile(first.filelist_list)
    bad = _make_jsonl(tmp_path / "src2", ["{not json"])
    assert create_pretraining_data(str(bad), str(out), num_workers=0, progress=False).written == 0
    assert sorted(os.listdir(out / "filelist")) == ["other.filelist", "other.filelist.list"]


def test_skips_counted_with_line_numbers(tmp_path):
    src = tmp_path / "src"
    jpeg = image_bytes(50, 40, "JPEG", seed=9)
    items = [
        GOOD[0],  # 1 ok
        "{not json",  # 2 bad_json
        json.dumps({"caption": "no image key"}),  # 3 missing_key
        json.dumps({"caption": 5, "image": "imgs/0.jpg"}),  # 4 missing_key (not a string)
        ("gone", "imgs/missing.jpg", None),  # 5 missing_image
        ("text file", "imgs/t.jpg", b"this is not an image"),  # 6 undecodable
        ("cut", "imgs/cut.jpg", jpeg[: len(jpeg) * 3 // 4]),  # 7 truncated_image
        ("big", "imgs/big.png", image_bytes(80, 80, "PNG", seed=5)),  # 8 too_large (max_pixels)
        "[1, 2]",  # 9 bad_json (not an object)
        GOOD[2],  # 10 ok
    ]
    jsonl = _make_jsonl(src, items)
    (src / "imgs" / "dir.jpg").mkdir()
    with open(jsonl, "a") as f:
        f.write(json.dumps({"caption": "a folder", "image": "imgs/dir.jpg"}) + "\n")  # 11 unreadable_image
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("ldm.data.prepare")
    logger.addHandler(handler)
    try:
        res = create_pretraining_data(str(jsonl), str(tmp_path / "out"), max_pixels=3000, progress=False)
    finally:
        logger.removeHandler(handler)
    assert res.written == 2
    assert res.skipped == {
        "bad_json": 2,
        "missing_key": 2,
        "missing_image": 1,
        "unreadable_image": 1,
        "undecodable": 1,
        "truncated_image": 1,
        "too_large": 1,
    }
    where = sorted(int(m.split(":")[1]) for m in seen if m.startswith(str(jsonl)))
    assert where == [2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert res.summary().startswith("written 2 records in 1 part file(s); skipped 9 (")


def test_process_pool_output_identical_and_plain_parts(tmp_path):
    jsonl = _make_jsonl(tmp_path / "src", GOOD)
    a = create_pretraining_data(str(jsonl), str(tmp_path / "a"), per_part_file_num=2, num_workers=0, progress=False)
    b = create_pretraining_data(str(jsonl), str(tmp_path / "b"), per_part_file_num=2, num_workers=2, progress=False)
    assert [os.path.basename(p) for p in a.parts] == ["part-000001", "part-000002", "part-000003"]
    for pa, pb in zip(a.parts, b.parts):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    assert not [f for f in os.listdir(tmp_path / "b" / "laion400m_format_data") if ".tmp" in f]


def test_cli_flags_and_exit_codes(tmp_path, monkeypatch, capsys):
    import create_pretraining_data as cli

    src = tmp_path / "src"
    os.makedirs(src / "imgs")
    (src / "imgs" / "x.jpg").write_bytes(GOOD[0][2])
    (src / "d.jsonl").write_text(json.dumps({"text": "custom keys", "path": "imgs/x.jpg"}) + "\n")
    monkeypatch.chdir(tmp_path)  # image path resolves against the jsonl's folder, not the cwd
    argv = ["--input_path", "src/d.jsonl", "--output_path", "out", "--output_name", "mine",
            "--caption_key", "text", "--image_key", "path", "--per_part_file_num", "7",
            "--num_repeat", "2", "--num_workers", "0"]
    assert cli.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "written 1 records in 1 part file(s); skipped 0 (none)"
    assert (tmp_path / "out" / "filelist" / "mine.filelist").read_text().splitlines() == [
        str(tmp_path / "out" / "laion400m_format_data" / "part-000001")
    ] * 2
    # default keys do not exist in this jsonl: nothing written -> exit 1, no filelist
    assert cli.main(["--input_path", "src/d.jsonl", "--output_path", "out2", "--num_workers", "0"]) == 1
    assert not os.path.exists(tmp_path / "out2" / "filelist" / "custom_dataset.filelist")
    with pytest.raises(FileNotFoundError):
        cli.main(["--input_path", "nope.jsonl", "--output_path", "out3"])


# --------------------------------------------------------------------------- img2dataset inputs (issue 15 item 2)
# captions without outer whitespace: a tar sample's .txt is stripped (ldm.data.tars.parse_sample)
SHARDED = [
    ("a red\tcar\non a road", "imgs/0.jpg", image_bytes(20, 10, "JPEG", seed=0)),
    ("中文 caption", "imgs/1.png", image_bytes(6, 5, "PNG", seed=1)),
    ("plain", "imgs/2.jpg", image_bytes(10, 16, "JPEG", seed=2)),
    ("webp", "imgs/3.webp", image_bytes(9, 12, "WEBP", seed=3)),
    ("five", "imgs/4.jpg", image_bytes(9, 13, "JPEG", seed=4)),
]


def _part_bytes(result):
    out = []
    for p in result.parts:
        with gzip.open(p, "rb") as f:
            out.append(f.read())
    return out


def test_tars_and_parquet_give_the_same_parts_as_the_jsonl(tmp_path):
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tar_fixtures import truncate, write_shard

    kw = dict(per_part_file_num=2, save_gzip_file=True, num_workers=0, progress=False)
    jsonl = _make_jsonl(tmp_path / "src", SHARDED)
    ref = create_pretraining_data(str(jsonl), str(tmp_path / "from_jsonl"), **kw)
    assert ref.written == 5 and ref.skipped == {}
    want = _part_bytes(ref)

    # webdataset shards (webdataset's TarWriter); one caption in .json only; then bad samples after them
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = []
    for j, (caption, rel, data) in enumerate(SHARDED):
        s = {"__key__": f"{j:09d}", os.path.splitext(rel)[1][1:]: data}
        s["json" if j == 1 else "txt"] = json.dumps({"caption": caption}).encode() if j == 1 else caption.encode()
        samples.append(s)
    write_shard(shards / "00000.tar", samples[:3])
    write_shard(shards / "00001.tar", samples[3:] + [{"__key__": "nocap", "jpg": SHARDED[0][2]}])
    bad = write_shard(shards / "00002.tar", [{"__key__": "cut", "jpg": image_bytes(40, 40, seed=9), "txt": b"cut"}])
    with tarfile.open(bad) as t:
        truncate(bad, t.getmembers()[0].offset_data + 50)
    for source in (shards, str(shards / "{00000..00002}.tar")):
        res = create_pretraining_data(str(source), str(tmp_path / "from_tars"), **kw)
        assert res.written == 5 and res.skipped == {"no_caption": 1, "truncated_tar": 1}
        assert _part_bytes(res) == want

    # parquet (img2dataset's columns jpg + caption, a failed download with a null image), 2 files
    pq_dir = tmp_path / "parquet"
    pq_dir.mkdir()
    rows = [(data, caption) for caption, _, data in SHARDED]
    pq.write_table(pa.table({"jpg": [r[0] for r in rows[:2]] + [None], "caption": [r[1] for r in rows[:2]] + ["x"],
                             "url": ["u"] * 3}), pq_dir / "00000.parquet")
    pq.write_table(pa.table({"jpg": [r[0] for r in rows[2:]], "caption": [r[1] for r in rows[2:]], "url": ["u"] * 3}),
                   pq_dir / "00001.parquet")
    res = create_pretraining_data(str(pq_dir), str(tmp_path / "from_parquet"), **kw)
    assert res.written == 5 and res.skipped == {"no_image": 1} and _part_bytes(res) == want
    # other column names through the flags (a Hugging Face style image struct), one file
    pq.write_table(pa.table({"image": [{"bytes": r[0], "path": None} for r in rows], "text": [r[1] for r in rows]}),
                   tmp_path / "hf.parquet")
    import create_pretraining_data as cli

    assert cli.main(["--input_path", str(tmp_path / "hf.parquet"), "--output_path", str(tmp_path / "from_hf"),
                     "--image_column", "image", "--caption_column", "text", "--per_part_file_num", "2",
                     "--save_gzip_file", "--num_workers", "0"]) == 0
    got = []
    for name in ("part-000001.gz", "part-000002.gz", "part-000003.gz"):
        with gzip.open(tmp_path / "from_hf" / "laion400m_format_data" / name, "rb") as f:
            got.append(f.read())
    assert got == want
    with pytest.raises(ValueError, match="no column 'jpg'.*--image_column"):
        create_pretraining_data(str(tmp_path / "hf.parquet"), str(tmp_path / "x"), **kw)


def test_bad_img2dataset_input_is_one_error_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "create_pretraining_data.py"), "--input_path",
                        str(tmp_path / "shards" / "{00000..00001}.tar"), "--output_path", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and str(tmp_path / "shards") in errors[0], r.stderr
