"""create_pretraining_data.py / ldm.data.prepare: layout, round trip into the dataset, skips."""
import base64
import collections
import gzip
import json
import logging
import os

import numpy as np
import pytest

from laion_fixtures import image_bytes
from ldm.data.laion import LaionDataset
from ldm.data.prepare import create_pretraining_data
from ldm.data.transforms import ImageTransform, decode_image


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


GOOD = [
    ("a red\tcar\non a road\r\n", "imgs/0.jpg", image_bytes(20, 14, "JPEG", seed=0)),
    ("中文 caption", "imgs/1.png", image_bytes(6, 5, "PNG", seed=1)),  # smaller than R: upscaled
    ("plain", "imgs/2.jpg", image_bytes(16, 16, "JPEG", seed=2)),
    ("rgba", "imgs/3.png", image_bytes(9, 12, "PNG", seed=3, mode="RGBA")),
    ("five", "imgs/4.jpg", image_bytes(11, 13, "JPEG", seed=4)),
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
    assert (out / "filelist" / "custom_dataset.filelist.list").read_text() == "custom_dataset.filelist\n"
    listed = (out / "filelist" / "custom_dataset.filelist").read_text().splitlines()
    assert listed == [f"../laion400m_format_data/part-00000{i}.gz" for i in (1, 2, 3)] * 3

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
    ds = LaionDataset(res.filelist_list, resolution=10, center_crop=True, infinite=False, rank=0, world_size=1)
    samples = list(ds.iter_consumer())
    counts = collections.Counter(s["caption"] for s in samples)
    assert counts == collections.Counter({c: 3 for c in CLEAN})  # num_repeat=3: three passes
    # relative file-list paths from other working directories
    for cwd, rel in [(out, "filelist/custom_dataset.filelist.list"), (out / "filelist", "custom_dataset.filelist"),
                     (out / "laion400m_format_data", "../filelist/custom_dataset.filelist.list")]:
        monkeypatch.chdir(cwd)
        other = LaionDataset(rel, resolution=4, infinite=False, rank=0, world_size=1)
        assert sorted(s["caption"] for s in other.iter_consumer()) == sorted(CLEAN * 3)
    tf = ImageTransform(10, center_crop=True)
    by_caption = {c: data for (_, _, data), c in zip(GOOD, CLEAN)}
    for s in samples:
        expect = tf(decode_image(by_caption[s["caption"]], target_short_side=10), None)
        np.testing.assert_array_equal(s["pixel_values"], expect)


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
        "../laion400m_format_data/part-000001"
    ] * 2
    # default keys do not exist in this jsonl: nothing written -> exit 1, no filelist
    assert cli.main(["--input_path", "src/d.jsonl", "--output_path", "out2", "--num_workers", "0"]) == 1
    assert not os.path.exists(tmp_path / "out2" / "filelist" / "custom_dataset.filelist")
    with pytest.raises(FileNotFoundError):
        cli.main(["--input_path", "nope.jsonl", "--output_path", "out3"])
