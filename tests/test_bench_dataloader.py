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
    for key in ("samples_per_s", "paddlemix_samples_per_s", "decode_only_samples_per_s",
                "decode_to_array_samples_per_s", "ours_vs_paddlemix", "ours_vs_decode_only", "ours_vs_decode_to_array"):
        assert result[key] > 0
    assert set(result["rounds_samples_per_s"]) == {"ours", "paddlemix", "decode_only", "decode_to_array"}
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
        assert dl["loader_kind"] == "trainer" and dl["shm_buffers"] == 4 and dl["warmup"]["samples_per_s"] > 0
        for key in ("loader", "with_step_normalize"):
            assert dl[key]["samples_per_s"] > 0 and dl[key]["vs_1proc_cpu_rate"] > 0
            assert dl[key]["main_cpu_ms_per_sample"] >= 0
            assert dl[key]["workers_page_faults_per_sample"] >= 0  # the worker processes were found (/proc)


def test_bench_dataloader_plain_paddle_loader(tmp_path):
    """`--loader paddle` (the loader before the trainer's worker setup) runs for comparison."""
    path = os.path.join(ROOT, "benchmarks", "bench_dataloader.py")
    spec = importlib.util.spec_from_file_location("bench_dataloader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    file_list = bench.make_data(str(tmp_path / "data"), 4, 2)
    result = bench.main(["--file_list", file_list, "--resolution", "64", "--samples", "4", "--rounds", "1",
                         "--num_workers", "1", "--batch_size", "2", "--loader", "paddle", "--warmup", "2"])
    assert result["dataloader"]["loader_kind"] == "paddle" and result["dataloader"]["loader"]["samples_per_s"] > 0
    assert result["dataloader"]["with_step_normalize"]["samples_per_s"] > 0
