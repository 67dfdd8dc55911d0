"""Paths with a scheme open through fsspec in every reader (issue 15 item 3), tested with fsspec's
in-memory filesystem (``memory://``): LAION part files and listings, tar shards (a tar, a folder, a
pattern), create_pretraining_data from a jsonl, tars and parquet; without fsspec, one clear error
naming the path and saying to install it."""
import gzip
import io
import json
import os
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

fsspec = pytest.importorskip("fsspec")

from laion_fixtures import image_bytes, record  # noqa: E402
from tar_fixtures import sample, write_shard  # noqa: E402

from ldm.data import fsio  # noqa: E402
from ldm.data.laion import LaionDataset  # noqa: E402
from ldm.data.prepare import create_pretraining_data  # noqa: E402
from ldm.data.tars import TarDataset, check_tars, is_tar_source  # noqa: E402


@pytest.fixture
def mem():
    """A fresh folder of fsspec's memory filesystem: (fs, "memory://<name>"); removed afterwards."""
    fs = fsspec.filesystem("memory")
    name = f"t{uuid.uuid4().hex[:8]}"
    yield fs, f"memory://{name}"
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _put(fs, url, data: bytes) -> str:
    with fsspec.open(url, "wb") as f:
        f.write(data)
    return url


def _captions(ds):
    return sorted(s["caption"] for s in ds.iter_consumer())


def test_scheme_detection_and_helpers(mem):
    fs, base = mem
    assert fsio.has_scheme("s3://bucket/x.tar") and fsio.has_scheme("https://h/p") and fsio.has_scheme(base)
    assert not fsio.has_scheme("/tmp/x.tar") and not fsio.has_scheme("shards/{0..1}.tar")
    _put(fs, f"{base}/a/x.bin", b"123")
    assert fsio.is_file(f"{base}/a/x.bin") and fsio.is_dir(f"{base}/a") and fsio.exists(f"{base}/a/x.bin")
    assert [p.rsplit("/", 1)[1] for p in fsio.list_dir(f"{base}/a")] == ["x.bin"]
    with fsio.open_file(fsio.list_dir(f"{base}/a")[0]) as f:
        assert f.read() == b"123"
    assert fsio.dirname(f"{base}/a/x.bin") == f"{base}/a" and fsio.join(f"{base}/a", "y") == f"{base}/a/y"


def test_laion_parts_and_listings_in_memory(mem):
    fs, base = mem
    lines = [record(f"m{j}", image_bytes(8, 8, "PNG", seed=j)) for j in range(5)]
    _put(fs, f"{base}/parts/part-0", gzip.compress(b"".join(lines[:3])))
    _put(fs, f"{base}/parts/part-1", b"".join(lines[3:]))  # plain
    _put(fs, f"{base}/parts/train.filelist", f"part-0\n{base}/parts/part-1\n".encode())  # relative + absolute
    _put(fs, f"{base}/train.filelist.list", f"{base}/parts/train.filelist 2\n".encode())
    for source in (f"{base}/train.filelist.list", f"{base}/parts/train.filelist"):
        ds = LaionDataset(source, resolution=8, infinite=False, rank=0, world_size=1)
        assert _captions(ds) == [f"m{j}" for j in range(5)]
    assert not is_tar_source(f"{base}/train.filelist.list")


def test_tar_shards_in_memory(mem, tmp_path):
    fs, base = mem
    caps = []
    for i in range(3):
        local = write_shard(tmp_path / f"{i:05d}.tar", [sample(f"{i}{j}", f"t{i}-{j}", seed=i * 10 + j) for j in range(3)])
        caps += [f"t{i}-{j}" for j in range(3)]
        _put(fs, f"{base}/shards/{i:05d}.tar", open(local, "rb").read())
    _put(fs, f"{base}/tars.filelist", "".join(f"{base}/shards/{i:05d}.tar\n" for i in range(3)).encode())
    for source in (f"{base}/shards", f"{base}/shards/{{00000..00002}}.tar", f"{base}/shards/*.tar",
                   f"{base}/tars.filelist"):
        assert is_tar_source(source), source
        ds = TarDataset(source, resolution=8, infinite=False, rank=0, world_size=1)
        assert _captions(ds) == sorted(caps), source
    rep = check_tars(f"{base}/shards", world_size=2, num_workers=2, resolution=8)
    assert rep["valid"] == 9 and rep["invalid"] == {}
    assert _captions(TarDataset(f"{base}/shards/00001.tar", resolution=8, infinite=False, rank=0,
                                world_size=1)) == [f"t1-{j}" for j in range(3)]


def test_create_pretraining_data_from_memory_inputs(mem, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, base = mem
    imgs = [image_bytes(10, 8, "JPEG", seed=j) for j in range(3)]
    for j, data in enumerate(imgs):
        _put(fs, f"{base}/src/imgs/{j}.jpg", data)
    jsonl = "".join(json.dumps({"caption": f"c{j}", "image": f"imgs/{j}.jpg"}) + "\n" for j in range(3))
    _put(fs, f"{base}/src/data.jsonl", jsonl.encode())
    local = write_shard(tmp_path / "s.tar", [sample(f"{j}", f"c{j}", image=imgs[j]) for j in range(3)])
    _put(fs, f"{base}/shards/00000.tar", open(local, "rb").read())
    buf = io.BytesIO()
    pq.write_table(pa.table({"jpg": imgs, "caption": [f"c{j}" for j in range(3)]}), buf)
    _put(fs, f"{base}/pq/00000.parquet", buf.getvalue())
    parts = {}
    for name, source in (("jsonl", f"{base}/src/data.jsonl"), ("tar", f"{base}/shards/{{00000..00000}}.tar"),
                         ("parquet", f"{base}/pq")):
        res = create_pretraining_data(source, str(tmp_path / name), per_part_file_num=10, num_workers=0,
                                      progress=False)
        assert res.written == 3 and res.skipped == {}, name
        parts[name] = open(res.parts[0], "rb").read()
    assert parts["jsonl"] == parts["tar"] == parts["parquet"]


def test_scheme_path_without_fsspec_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec -> ImportError
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    url = "s3://bucket/shards/00000.tar"
    with pytest.raises(fsio.MissingFsspecError, match=r"s3://bucket/shards/00000.tar.*pip install fsspec"):
        fsio.open_file(url)
    with pytest.raises(fsio.MissingFsspecError, match="pip install fsspec"):
        LaionDataset("s3://bucket/train.filelist.list", resolution=8)
    for source in ("s3://bucket/shards/{00000..00009}.tar", "s3://bucket/shards"):
        with pytest.raises(fsio.MissingFsspecError, match="pip install fsspec"):
            is_tar_source(source)  # the trainers' kind choice does not hide it
        with pytest.raises(fsio.MissingFsspecError, match="pip install fsspec"):
            TarDataset(source, resolution=8)
    from ldm.utils import run_main

    import create_pretraining_data as cli

    assert run_main(cli.main, ["--input_path", "s3://bucket/data.jsonl", "--output_path", "/tmp/never"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: s3://bucket/data.jsonl") and "pip install fsspec" in err[0]
