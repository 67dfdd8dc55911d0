"""Smoke test of benchmarks/bench_dataloader.py: makes data, runs all three pipelines, prints JSON."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_dataloader_smoke(tmp_path, capsys):
    path = os.path.join(ROOT, "benchmarks", "bench_dataloader.py")
    spec = importlib.util.spec_from_file_location("bench_dataloader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(
        ["--make_data", str(tmp_path / "data"), "--num_images", "3", "--per_part", "2", "--resolution", "64",
         "--samples", "4", "--rounds", "1"]
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    for key in ("samples_per_s", "paddlemix_samples_per_s", "decode_only_samples_per_s"):
        assert result[key] > 0
    assert result["ours_vs_paddlemix"] > 0 and result["ours_vs_decode_only"] > 0
    parts = os.listdir(tmp_path / "data" / "laion400m_format_data")
    assert len([p for p in parts if p.startswith("part-")]) == 2  # 3 images, 2 per part


def test_bench_dataloader_workers_smoke(tmp_path):
    """The DataLoader figures (issue 15 item 4): uint8 batches through a worker, then the step's normalisation."""
    path = os.path.join(ROOT, "benchmarks", "bench_dataloader.py")
    spec = importlib.util.spec_from_file_location("bench_dataloader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    file_list = bench.make_data(str(tmp_path / "data"), 4, 2)
    for handover in ("uint8", "float32"):
        result = bench.main(["--file_list", file_list, "--resolution", "64", "--samples", "4", "--rounds", "1",
                             "--num_workers", "1", "--batch_size", "2", "--handover", handover])
        dl = result["dataloader"]
        assert result["samples_per_s_basis"] == "wall_clock_dataloader" and dl["handover"] == handover
        for key in ("loader", "with_step_normalize"):
            assert dl[key]["samples_per_s"] > 0 and dl[key]["vs_1proc_cpu_rate"] > 0
            assert dl[key]["main_cpu_ms_per_sample"] >= 0
