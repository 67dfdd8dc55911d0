"""scripts/check_data.py: one sharded pass, exact counts, JSON last line, --strict exit codes."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from laion_fixtures import image_bytes, make_parts, record, write_filelist, write_part

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("check_data", os.path.join(ROOT, "scripts", "check_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(argv, capsys):
    code = _load_script().main(argv)
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def mixed_list(tmp_path):
    parts = make_parts(tmp_path / "parts", [6, 9])  # 20 records: every consumer of 8 gets a valid one
    bad = write_part(
        tmp_path / "parts" / "bad",
        [
            record("good", image_bytes(seed=1)),  # 1
            b"short\tNONE\n",  # 2 too_few_columns
            b"b64\tNONE\t!!!\n",  # 3 bad_base64
            record("junk", b"not an image"),  # 4 undecodable
            b"only one column\n",  # 5 too_few_columns
        ],
    )
    return write_filelist(tmp_path / "d.filelist", parts + [bad]), bad


def test_file_list_report_2_ranks_4_workers(mixed_list, capsys):
    fl, bad = mixed_list
    code, rep = _run(["--file_list", fl, "--world_size", "2", "--num_workers", "4", "--resolution", "8"], capsys)
    assert code == 0
    assert (rep["records"], rep["valid"]) == (20, 16)
    assert rep["invalid"] == {
        "bad_base64": {"count": 1, "first": f"{bad}:3"},
        "too_few_columns": {"count": 2, "first": f"{bad}:2"},
        "undecodable": {"count": 1, "first": f"{bad}:4"},
    }
    assert [(c["rank"], c["worker"]) for c in rep["per_consumer"]] == [(r, w) for r in range(2) for w in range(4)]
    assert sum(c["valid"] for c in rep["per_consumer"]) == 16
    assert sum(c["records"] for c in rep["per_consumer"]) == 20
    code, _ = _run(["--file_list", fl, "--world_size", "2", "--num_workers", "4", "--resolution", "8", "--strict"], capsys)
    assert code == 1


def test_strict_clean_and_starved_consumer(tmp_path, capsys):
    (part,) = make_parts(tmp_path / "parts", [3])
    code, rep = _run(["--file_list", part, "--strict", "--resolution", "8"], capsys)
    assert (code, rep["records"], rep["valid"], rep["invalid"]) == (0, 3, 3, {})
    # 3 records for 4 consumers: one would have nothing to stream in training -> exit 2
    code, rep = _run(["--file_list", part, "--world_size", "2", "--num_workers", "2", "--resolution", "8"], capsys)
    assert code == 2 and rep["consumers_without_valid"] == 1
    assert sorted(c["valid"] for c in rep["per_consumer"]) == [0, 1, 1, 1]


def test_unreadable_data_still_ends_with_json_error(tmp_path, capsys):
    parts = make_parts(tmp_path / "parts", [2])
    fl = write_filelist(tmp_path / "d.filelist", [parts[0], "missing-part"])
    for argv in (["--file_list", fl], ["--file_list", str(tmp_path / "nope.filelist.list")],
                 ["--dataset_path", str(tmp_path / "no_such_folder")]):
        code, rep = _run(argv + ["--resolution", "8"], capsys)
        assert code == 3
        assert (rep["records"], rep["valid"], rep["invalid"], rep["per_consumer"]) == (0, 0, {}, [])
        assert rep["error"]
    code, rep = _run(["--file_list", fl], capsys)
    assert "LaionDataError" in rep["error"] and "missing-part" in rep["error"]


def test_cli_subprocess_last_line_is_json(mixed_list):
    fl, _ = mixed_list
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "check_data.py"), "--file_list", fl, "--resolution", "8"],
        capture_output=True, text=True, env=env, cwd=os.path.dirname(fl), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (rep["records"], rep["valid"]) == (20, 16)


def test_folder_report(tmp_path, capsys):
    pytest.importorskip("ldm.data.folder")
    root = tmp_path / "folder"
    root.mkdir()
    for i in range(4):
        (root / f"{i:04d}.jpg").write_bytes(image_bytes(12, 10, "JPEG", seed=i))
        (root / f"{i:04d}.txt").write_text(f"caption {i}", encoding="utf-8")
    (root / "nocap.png").write_bytes(image_bytes(seed=9, fmt="PNG"))  # missing_caption
    (root / "junk.jpg").write_bytes(b"not a jpeg")  # undecodable
    (root / "junk.txt").write_text("junk")
    (root / "gbk.png").write_bytes(image_bytes(seed=8, fmt="PNG"))
    (root / "gbk.txt").write_bytes(b"\xff\xfe\xfa bad")  # non_utf8
    code, rep = _run(["--dataset_path", str(root), "--world_size", "2", "--num_workers", "2", "--resolution", "8"], capsys)
    assert code == 0
    assert (rep["records"], rep["valid"]) == (7, 4)
    assert rep["invalid"] == {
        "missing_caption": {"count": 1, "first": str(root / "nocap.png")},
        "non_utf8": {"count": 1, "first": rep["invalid"]["non_utf8"]["first"]},
        "undecodable": {"count": 1, "first": str(root / "junk.jpg")},
    }
    assert rep["invalid"]["non_utf8"]["first"].startswith(str(root / "gbk.txt") + ":1")
    assert [c["valid"] for c in rep["per_consumer"]] == [1, 1, 1, 1]
    code, _ = _run(["--dataset_path", str(root), "--strict", "--resolution", "8"], capsys)
    assert code == 1


def test_tar_shards_report_counts_by_reason(tmp_path, capsys):
    """Tar shards (issue 15 item 1) through --dataset_path (a folder) and --file_list (patterns):
    the counts of tests/test_tar_dataset.py's bad shards, exit codes as for part files."""
    from test_tar_dataset import bad_shards

    folder, valid, counts = bad_shards(tmp_path / "bad")
    code, rep = _run(["--dataset_path", str(folder), "--world_size", "2", "--num_workers", "2", "--resolution", "8"],
                     capsys)
    assert code == 0 and rep["valid"] == len(valid) and rep["shards"] == 3
    assert {k: v["count"] for k, v in rep["invalid"].items()} == counts
    assert rep["invalid"]["no_caption"]["first"] == f"{folder / 'b-00000.tar'}:2"
    assert sum(c["valid"] for c in rep["per_consumer"]) == len(valid) and len(rep["per_consumer"]) == 4
    code, rep = _run(["--file_list", str(folder / "*.tar"), "--resolution", "8", "--strict"], capsys)
    assert code == 1 and rep["records"] == len(valid) + sum(counts.values())
    code, rep = _run(["--file_list", str(folder / "a-{00000..00001}.tar")], capsys)  # a-00001.tar is missing
    assert code == 3 and "LaionDataError" in rep["error"] and "a-00001.tar" in rep["error"]
