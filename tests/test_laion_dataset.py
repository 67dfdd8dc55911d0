"""LAION part-file dataset: exact sharding, bad-record counters, listings, determinism, workers."""
import collections
import gzip
import io
import os

import numpy as np
import pytest

from laion_fixtures import image_bytes, make_parts, record, write_filelist, write_part
from ldm.data import collate
from ldm.data.laion import LaionDataError, LaionDataset, expand_file_list
from ldm.data.transforms import ImageTransform, normalize_pixels


def _captions(ds, worker=0, num_workers=1, epoch=None):
    return [s["caption"] for s in ds.iter_consumer(worker, num_workers, epoch=epoch)]


# ----------------------------------------------------------------------------- sharding grid
GRID = [
    # (records per part file, world_size, num_workers)
    ([5], 2, 4),  # 1 file x 2 ranks x 4 workers (the seed's hang case)
    ([5], 1, 1),
    ([3], 3, 2),  # fewer records than consumers: some consumers get nothing
    ([4, 1, 3], 2, 2),
    ([2, 3, 1, 4, 2], 2, 3),
    ([1, 2, 3, 4, 1, 2, 3, 4], 2, 2),  # 8 files, 4 consumers: whole-file dealing only
    ([3, 3, 3, 3, 3, 3, 3, 3, 3], 2, 4),  # 9 files, 8 consumers: 8 whole + 1 shared by record
]


@pytest.mark.parametrize("sizes,world,workers", GRID)
@pytest.mark.parametrize("shuffle", [True, False])
def test_sharding_grid_reads_every_record_exactly_once(tmp_path, sizes, world, workers, shuffle):
    parts = make_parts(tmp_path / "parts", sizes)
    fl = write_filelist(tmp_path / "d.filelist", parts)
    expected = collections.Counter(f"f{i}-r{j}" for i, n in enumerate(sizes) for j in range(n))
    got = collections.Counter()
    total_records = 0
    for rank in range(world):
        ds = LaionDataset(fl, resolution=8, infinite=False, rank=rank, world_size=world, shuffle_files=shuffle, seed=3)
        for w in range(workers):
            got.update(_captions(ds, w, workers))
            total_records += ds.stats.records
    assert got == expected
    assert total_records == sum(sizes)


def test_duplicate_filelist_lines_are_repeated_passes(tmp_path):
    # The seed's --num_repeat trick: 1 part file listed 3 times, 2 ranks x 4 workers.
    (part,) = make_parts(tmp_path / "parts", [5])
    fl = write_filelist(tmp_path / "d.filelist", [part] * 3)
    got = collections.Counter()
    for rank in range(2):
        ds = LaionDataset(fl, resolution=8, infinite=False, rank=rank, world_size=2)
        for w in range(4):
            got.update(_captions(ds, w, 4))
    assert got == collections.Counter({f"f0-r{j}": 3 for j in range(5)})


class _PidLaion(LaionDataset):
    """Tags each sample with the worker process id, to prove real workers did the reading."""

    def iter_consumer(self, worker=0, num_workers=1, epoch=None):
        for s in super().iter_consumer(worker, num_workers, epoch):
            s["pid"] = np.int64(os.getpid())
            s["worker"] = np.int64(worker)
            yield s


def test_real_dataloader_two_workers_collate(tmp_path):
    import paddle

    parts = make_parts(tmp_path / "parts", [5, 2])
    fl = write_filelist(tmp_path / "d.filelist", parts)
    ds = _PidLaion(fl, resolution=8, infinite=False, rank=0, world_size=1)
    loader = paddle.io.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    captions, shapes, pids, workers = [], set(), set(), set()
    for batch in loader:
        assert str(batch["pixel_values"].dtype).endswith("uint8")  # the schema: uint8 [B, H, W, 3]
        pv = normalize_pixels(batch["pixel_values"])  # what the training step does, where the batch lives
        shapes.add(tuple(pv.shape[1:]))
        assert str(pv.dtype).endswith("float32")
        captions.extend(batch["caption"])
        pids.update(np.asarray(batch["pid"]).tolist())
        workers.update(np.asarray(batch["worker"]).tolist())
    assert shapes == {(3, 8, 8)}
    assert workers == {0, 1} and len(pids) == 2 and os.getpid() not in pids
    assert sorted(captions) == sorted([f"f0-r{j}" for j in range(5)] + ["f1-r0", "f1-r1"])


# ----------------------------------------------------------------------------- bad records
def test_every_bad_record_kind_counted(tmp_path):
    good = image_bytes(12, 10, "JPEG", seed=1)
    jpeg = image_bytes(40, 30, "JPEG", seed=2)
    lines = [
        record("ok one", good),  # 1
        b"only\tNONE\n",  # 2 too_few_columns
        b"\xff\xfe caption\tNONE\t" + record("", good).split(b"\t")[2],  # 3 non_utf8
        b"bad b64\tNONE\t@@not*base64@@\n",  # 4 bad_base64
        record("not an image", b"hello, definitely not an image"),  # 5 undecodable
        record("cut jpeg", jpeg[: len(jpeg) // 2]),  # 6 truncated_image
        record("huge", image_bytes(100, 100, "PNG", seed=3)),  # 7 too_large (max_pixels below)
        b"\n",  # 8 blank: not a record
        record("中文标题".encode("gb18030"), good),  # 9 GB18030 caption: valid
        record("rgba png", image_bytes(9, 9, "PNG", seed=4, mode="RGBA")),  # 10 valid
    ]
    plain = write_part(tmp_path / "plain.part", lines)
    # gzip: a complete member with 2 good records, then a second member cut in half.
    member2 = gzip.compress(record("lost", image_bytes(30, 30, "PNG", seed=5)))
    gz_path = tmp_path / "cut.gz"
    gz_path.write_bytes(gzip.compress(record("g1", good) + record("g2", good)) + member2[: len(member2) // 2])
    fl = write_filelist(tmp_path / "d.filelist", [plain, str(gz_path)])

    ds = LaionDataset(fl, resolution=8, infinite=False, rank=0, world_size=1, max_pixels=5000, shuffle_files=False)
    caps = _captions(ds)
    assert caps == ["ok one", "中文标题", "rgba png", "g1", "g2"]
    st = ds.stats
    assert st.invalid == {
        "too_few_columns": 1,
        "non_utf8": 1,
        "bad_base64": 1,
        "undecodable": 1,
        "truncated_image": 1,
        "too_large": 1,
        "truncated_gzip": 1,
    }
    assert st.first_example == {
        "too_few_columns": f"{plain}:2",
        "non_utf8": f"{plain}:3",
        "bad_base64": f"{plain}:4",
        "undecodable": f"{plain}:5",
        "truncated_image": f"{plain}:6",
        "too_large": f"{plain}:7",
        "truncated_gzip": f"{gz_path}:3",
    }
    assert (st.records, st.valid) == (12, 5)  # 9 records in plain (1 blank line), 3 in gzip
    # max_pixels=None disables the guard: the 100x100 image becomes valid.
    ds2 = LaionDataset(fl, resolution=8, infinite=False, rank=0, world_size=1, max_pixels=None, shuffle_files=False)
    assert "huge" in _captions(ds2) and "too_large" not in ds2.stats.invalid


def test_consumer_without_valid_records_raises_naming_files(tmp_path):
    bad = write_part(tmp_path / "bad.part", [b"x\tNONE\t@@@\n", b"y\tNONE\n"])
    ds = LaionDataset(bad, resolution=8, infinite=True, rank=0, world_size=1)
    with pytest.raises(LaionDataError, match="bad.part"):
        next(iter(ds))
    ds = LaionDataset(bad, resolution=8, infinite=False, rank=0, world_size=1)
    with pytest.raises(LaionDataError, match="no valid sample"):
        list(iter(ds))


def test_consumer_without_records_single_pass_ends_infinite_raises(tmp_path):
    (part,) = make_parts(tmp_path / "parts", [1])
    ds = LaionDataset(part, resolution=8, infinite=False, rank=1, world_size=2)
    assert list(iter(ds)) == []
    ds = LaionDataset(part, resolution=8, infinite=True, rank=1, world_size=2)
    with pytest.raises(LaionDataError, match="rank 1/2"):
        next(iter(ds))


def test_fewer_records_than_consumers_error_says_so(tmp_path):
    # 3 records over 2 ranks x 4 workers: 3 consumers train, 5 stop with an explicit error.
    (part,) = make_parts(tmp_path / "parts", [3])
    outcomes = collections.Counter()
    for rank in range(2):
        ds = LaionDataset(part, resolution=8, infinite=True, rank=rank, world_size=2)
        for w in range(4):
            it = ds.iter_consumer(w, 4)
            try:
                next(it)
                outcomes["sample"] += 1
            except LaionDataError as e:
                msg = str(e)
                assert "fewer records than the 8 consumers (2 rank(s) x 4 DataLoader worker(s))" in msg, msg
                assert "fewer DataLoader workers (--dataloader_num_workers)" in msg, msg
                outcomes["error"] += 1
    assert outcomes == {"sample": 3, "error": 5}
    # the consumer that gets only an invalid record names the same way out
    bad = write_part(tmp_path / "bad", [record("ok", image_bytes(seed=1)), b"x\tNONE\t@@@\n"])
    ds = LaionDataset(bad, resolution=8, infinite=True, rank=0, world_size=1)
    with pytest.raises(LaionDataError, match=r"fewer valid records than the 2 consumers .*fewer DataLoader workers"):
        next(ds.iter_consumer(1, 2))


# ----------------------------------------------------------------------------- listings
def test_gzip_detected_by_magic_not_name(tmp_path):
    lines = [record("a", image_bytes(seed=1)), record("b", image_bytes(seed=2))]
    gz_named_txt = write_part(tmp_path / "part.txt", lines, gzipped=True)
    plain_named_gz = write_part(tmp_path / "part.gz", lines, gzipped=False)
    for path in (gz_named_txt, plain_named_gz):
        ds = LaionDataset(path, resolution=8, infinite=False, rank=0, world_size=1, shuffle_files=False)
        assert _captions(ds) == ["a", "b"]


def test_filelist_list_resolution_cwd_first_then_own_folder(tmp_path, monkeypatch):
    parts = make_parts(tmp_path / "data" / "parts", [2, 3])
    lists = tmp_path / "data" / "filelist"
    lists.mkdir()
    # relative to the filelist's folder
    write_filelist(lists / "a.filelist", [os.path.relpath(parts[0], lists)])
    # relative to the working directory (the seed's demo data is written this way)
    write_filelist(lists / "b.filelist", [os.path.join("data", "parts", os.path.basename(parts[1]))])
    with open(lists / "train.filelist.list", "w") as f:
        f.write("a.filelist 2.5\nb.filelist\n")
    monkeypatch.chdir(tmp_path)
    entries = expand_file_list(str(lists / "train.filelist.list"))
    assert [e.weight for e in entries] == [2.5, 1.0]
    ds = LaionDataset(str(lists / "train.filelist.list"), resolution=8, infinite=False, rank=0, world_size=1)
    assert sorted(_captions(ds)) == ["f0-r0", "f0-r1", "f1-r0", "f1-r1", "f1-r2"]
    # From elsewhere the cwd-relative entry cannot resolve: a clear error naming it.
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    with pytest.raises(LaionDataError, match=r"b\.filelist.*data/parts/part-00001"):
        LaionDataset(str(lists / "train.filelist.list"), resolution=8, rank=0, world_size=1)


def test_tab_before_weight_is_a_listing(tmp_path):
    parts = make_parts(tmp_path / "parts", [2, 1])
    write_filelist(tmp_path / "a.filelist", [parts[0]])
    write_filelist(tmp_path / "b.filelist", [parts[1]])
    fll = tmp_path / "x.filelist.list"
    fll.write_text("a.filelist\t2\nb.filelist \t 0.5\n")
    entries = expand_file_list(str(fll))
    assert [(e.path, e.weight) for e in entries] == [(parts[0], 2.0), (parts[1], 0.5)]
    ds = LaionDataset(str(fll), resolution=8, infinite=False, rank=0, world_size=1)
    assert sorted(_captions(ds)) == ["f0-r0", "f0-r1", "f1-r0"]


@pytest.mark.parametrize("first", [b"broken line without tabs\n", b"broken\n", b"cut\tNONE\n"])
def test_plain_part_file_with_bad_first_line_is_a_part_file(tmp_path, first):
    good = [record(f"ok{i}", image_bytes(seed=i)) for i in range(3)]
    part = write_part(tmp_path / "part-00000", [first] + good)
    fl = write_filelist(tmp_path / "d.filelist", [part])
    for path in (part, fl):
        assert [e.path for e in expand_file_list(path)] == [part]
        ds = LaionDataset(path, resolution=8, infinite=False, rank=0, world_size=1)
        assert _captions(ds) == ["ok0", "ok1", "ok2"]
        assert ds.stats.invalid == {"too_few_columns": 1}
        assert ds.stats.first_example == {"too_few_columns": f"{part}:1"}


def test_zero_weight_drops_filelist_and_bad_weight_rejected(tmp_path):
    parts = make_parts(tmp_path / "parts", [1, 1])
    write_filelist(tmp_path / "a.filelist", [parts[0]])
    write_filelist(tmp_path / "b.filelist", [parts[1]])
    fll = tmp_path / "x.filelist.list"
    fll.write_text("a.filelist 1\nb.filelist 0\n")
    assert [e.path for e in expand_file_list(str(fll))] == [parts[0]]
    fll.write_text("a.filelist -1\n")
    with pytest.raises(LaionDataError, match="weight"):
        expand_file_list(str(fll))
    with pytest.raises(LaionDataError, match="does not exist"):
        expand_file_list(str(tmp_path / "missing.filelist"))


# ----------------------------------------------------------------------------- samples
def test_sample_pixels_match_direct_decode_and_transform(tmp_path):
    from PIL import Image

    # short sides <= R: no reduced-scale decode, so a direct full decode must match exactly
    data = [image_bytes(20, 10, "JPEG", seed=7), image_bytes(5, 6, "PNG", seed=8)]  # 2nd smaller than R: upscaled
    part = write_part(tmp_path / "p", [record(f"c{i}", d) for i, d in enumerate(data)])
    ds = LaionDataset(part, resolution=10, random_flip=True, infinite=False, rank=0, world_size=1)
    samples = list(ds.iter_consumer())
    assert [s["caption"] for s in samples] == ["c0", "c1"]
    tf = ImageTransform(10, random_flip=True)
    rng = np.random.default_rng([0, 0, 0, 1, 0, 1])  # the dataset's stream for (seed, epoch, rank, W, worker, N)
    for s, d in zip(samples, data):
        assert s["pixel_values"].dtype == np.uint8 and s["pixel_values"].shape == (10, 10, 3)  # the schema
        x = normalize_pixels(s["pixel_values"])
        assert x.dtype == np.float32 and x.shape == (3, 10, 10)
        direct = Image.open(io.BytesIO(d)).convert("RGB")
        np.testing.assert_array_equal(x, tf.normalized(direct, rng))
        assert -1.0 <= x.min() and x.max() <= 1.0


# tokenization and caption dropout moved to the SD training step: tests/test_sd_captions.py


def test_deterministic_and_infinite(tmp_path):
    parts = make_parts(tmp_path / "parts", [3, 2, 2], img_side=16)
    fl = write_filelist(tmp_path / "d.filelist", parts)

    def take(n, **kw):
        ds = LaionDataset(fl, resolution=8, random_flip=True, seed=11, rank=0, world_size=1, shuffle_buffer=3, **kw)
        it = ds.iter_consumer(0, 1)
        return [next(it) for _ in range(n)]

    a, b = take(14), take(14)
    assert [s["caption"] for s in a] == [s["caption"] for s in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["pixel_values"], y["pixel_values"])
    # infinite: two full passes of 7 records, each pass covers every record once
    caps = [s["caption"] for s in a]
    assert sorted(caps[:7]) == sorted(caps[7:]) and len(set(caps)) == 7
    # epochs are distinct but each is a full pass (fixed seed: this is not flaky)
    ds = LaionDataset(fl, resolution=8, random_flip=True, seed=11, rank=0, world_size=1, infinite=False)
    e0, e1 = list(ds.iter_consumer(0, 1, epoch=0)), list(ds.iter_consumer(0, 1, epoch=1))
    assert sorted(s["caption"] for s in e0) == sorted(s["caption"] for s in e1)
    assert [s["caption"] for s in e0] != [s["caption"] for s in e1]


def test_collate_shapes():
    batch = [
        {"pixel_values": np.zeros((3, 4, 4), np.float32), "caption": "a", "input_ids": np.arange(5)},
        {"pixel_values": np.ones((3, 4, 4), np.float32), "caption": "b", "input_ids": np.arange(5)},
    ]
    out = collate(batch)
    assert out["pixel_values"].shape == (2, 3, 4, 4) and out["input_ids"].shape == (2, 5)
    assert out["caption"] == ["a", "b"]


def test_fast_base64_same_bytes_and_same_rejections_as_stdlib_strict():
    """The image column's decoder (pybase64 when installed) against the stdlib's strict mode on
    valid columns and on mutated ones (a byte changed, inserted or cut; padding moved): the same
    bytes, or a binascii.Error from both."""
    import base64
    import binascii

    from ldm.data import laion

    if laion._pybase64 is None:
        pytest.skip("pybase64 not installed (the stdlib decoder is then the only one)")

    def outcome(fn, data):
        try:
            return fn(memoryview(data))
        except (binascii.Error, ValueError):
            return "error"

    rng = np.random.default_rng(0)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \n\t*-_."
    counts = collections.Counter()
    for n in list(range(0, 12)) + [100, 1000, 74_000]:
        column = base64.b64encode(rng.bytes(n))
        variants = [column]
        for _ in range(40 if n < 1000 else 8):
            b = bytearray(column)
            op = rng.integers(4)
            pos = int(rng.integers(0, len(b) + 1))
            ch = alphabet[int(rng.integers(len(alphabet)))]
            if op == 0 and b:
                b[min(pos, len(b) - 1)] = ch
            elif op == 1:
                b.insert(pos, ch)
            elif op == 2 and b:
                del b[min(pos, len(b) - 1)]
            else:
                b = b.rstrip(b"=") + b"=" * int(rng.integers(0, 4))
            variants.append(bytes(b))
        for v in variants:
            want = outcome(laion._b64decode_stdlib, v)
            assert outcome(laion._b64decode_strict, v) == want, v[:40]
            counts["error" if want == "error" else "ok"] += 1
    assert counts["ok"] > 50 and counts["error"] > 200, counts  # both kinds were exercised


def test_part_file_records_decode_through_pybase64(monkeypatch):
    """The installed fast decoder is the one parse_record uses (requirements.txt installs it)."""
    import base64

    from ldm.data import laion

    if laion._pybase64 is None:
        pytest.skip("pybase64 not installed")
    calls = []
    real = laion._pybase64.b64decode
    monkeypatch.setattr(laion._pybase64, "b64decode", lambda data, **kw: calls.append(kw) or real(data, **kw))
    caption, data = laion.parse_record(b"a cat\tNONE\t" + base64.b64encode(b"jpeg bytes") + b"\n")
    assert (caption, data) == ("a cat", b"jpeg bytes")
    assert calls == [{"validate": True}]
