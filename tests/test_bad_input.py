"""Bad data and weight inputs (issue 12 items 5, 6, 7, 9): each test reproduces one defect found
by the bad-input campaign; special files are refused (never opened, so nothing hangs), messages
name the file and quote at most ~200 characters of any line."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from ldm.data.laion import LaionDataError, LaionDataset, expand_file_list, sniff_file_kind
from ldm.utils import QUOTE_LIMIT, shorten, special_file_problem
from laion_fixtures import image_bytes, record, write_filelist, write_part


def _no_hang(fn, seconds=20):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "hung on a special file"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _fifo(path):
    os.mkfifo(path)
    return str(path)


# --------------------------------------------------------------------------- helpers


def test_shorten_cuts_and_says_how_long():
    assert shorten("abc") == "abc"
    cut = shorten("x" * 10_000_000)
    assert len(cut) < QUOTE_LIMIT + 40 and cut.endswith("(10000000 characters)")
    assert shorten(b"y" * 5000).endswith("(5000 bytes)")


def test_special_file_problem(tmp_path):
    f = tmp_path / "a"
    f.write_text("x")
    assert special_file_problem(str(f)) is None
    assert special_file_problem(str(tmp_path / "missing")) is None
    assert "folder" in special_file_problem(str(tmp_path))
    assert special_file_problem(str(tmp_path), folder=True) is None
    assert "device" in special_file_problem("/dev/zero")
    assert "FIFO" in special_file_problem(_fifo(tmp_path / "p"))
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert "symbolic links" in special_file_problem(str(tmp_path / "loop"))


# --------------------------------------------------------------------------- item 5: long caption


def test_part_file_with_huge_first_caption_is_a_part_file(tmp_path):
    caption = "x" * 70_000  # over the 64 KiB sniff window, no whitespace
    part = write_part(tmp_path / "part-0", [record(caption, image_bytes(8, 8, "PNG")),
                                            record("second", image_bytes(8, 8, "PNG", seed=1))])
    assert sniff_file_kind(part) == "part"
    ds = LaionDataset(part, resolution=8, infinite=False, shuffle_files=False, rank=0, world_size=1)
    captions = [s["caption"] for s in ds.iter_consumer()]
    assert captions == [caption, "second"]


def test_long_line_no_newline_shorter_than_window_is_a_part_file(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(b"y" * 5000)  # one 5000-character "path": no listing line is that long
    assert sniff_file_kind(str(p)) == "part"


def test_error_quoting_a_huge_listing_line_is_cut(tmp_path):
    part = write_part(tmp_path / "part-0", [record("a", image_bytes(8, 8, "PNG"))])
    listing = tmp_path / "x.filelist"
    listing.write_text(f"{part}\n" + "/nope/" + "z" * 1_000_000 + "\n")
    with pytest.raises(LaionDataError) as e:
        expand_file_list(str(listing))
    msg = str(e.value)
    assert len(msg) < 1000 and f"{listing}:2" in msg and "not found" in msg


# --------------------------------------------------------------------------- item 6: special files (data)


def test_dev_zero_listed_in_a_filelist_is_refused(tmp_path):
    listing = write_filelist(tmp_path / "x.filelist", ["/dev/zero"])
    with pytest.raises(LaionDataError, match=r"x\.filelist:1: listed /dev/zero is a device"):
        _no_hang(lambda: expand_file_list(listing))


def test_fifo_listed_or_given_is_refused(tmp_path):
    fifo = _fifo(tmp_path / "part-0")
    listing = write_filelist(tmp_path / "x.filelist", [fifo])
    with pytest.raises(LaionDataError, match="is a FIFO"):
        _no_hang(lambda: expand_file_list(listing))
    with pytest.raises(LaionDataError, match="is a FIFO"):
        _no_hang(lambda: LaionDataset(fifo, rank=0, world_size=1))
    with pytest.raises(LaionDataError, match="is a device"):
        _no_hang(lambda: LaionDataset("/dev/zero", rank=0, world_size=1))


def _folder(tmp_path):
    from PIL import Image

    root = tmp_path / "ds"
    root.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "a.jpg")
    (root / "a.txt").write_text("red")
    return root


def test_folder_dataset_skips_special_files_and_symlink_loops(tmp_path, caplog):
    from ldm.data.folder import FolderDataset

    root = _folder(tmp_path)
    os.symlink(root / "loop.jpg", root / "loop.jpg")  # ELOOP
    (root / "loop.txt").write_text("loop")
    _fifo(root / "fifo.jpg")
    (root / "fifo.txt").write_text("fifo")
    os.symlink("/dev/zero", root / "zero.jpg")
    (root / "zero.txt").write_text("zero")
    _fifo(root / "a2.txt")
    ds = _no_hang(lambda: FolderDataset(str(root), resolution=16))
    assert ds.samples == [(str(root / "a.jpg"), "red")]


def test_check_data_folder_with_special_files(tmp_path):
    from ldm.data.check import check_folder

    root = _folder(tmp_path)
    os.symlink(root / "loop.jpg", root / "loop.jpg")
    _fifo(root / "b.jpg")
    (root / "b.txt").write_text("b")
    report = _no_hang(lambda: check_folder(str(root), resolution=16))
    assert report["valid"] == 1


def test_create_pretraining_data_refuses_special_inputs(tmp_path):
    from ldm.data.prepare import create_pretraining_data

    jsonl = tmp_path / "in.jsonl"
    good = tmp_path / "ok.png"
    good.write_bytes(image_bytes(8, 8, "PNG"))
    jsonl.write_text(json.dumps({"caption": "zero", "image": "/dev/zero"}) + "\n"
                     + json.dumps({"caption": "ok", "image": str(good)}) + "\n")
    result = _no_hang(lambda: create_pretraining_data(str(jsonl), str(tmp_path / "out"), num_workers=0,
                                                      progress=False))
    assert result.written == 1 and result.skipped == {"unreadable_image": 1}
    with pytest.raises(ValueError, match="is a device"):
        create_pretraining_data("/dev/zero", str(tmp_path / "out2"), progress=False)
    with pytest.raises(ValueError, match="is a FIFO"):
        _no_hang(lambda: create_pretraining_data(_fifo(tmp_path / "f.jsonl"), str(tmp_path / "o3"), progress=False))


# --------------------------------------------------------------------------- item 9: messages (data)


def test_missing_absolute_path_in_a_filelist_names_listing_and_line(tmp_path):
    part = write_part(tmp_path / "part-0", [record("a", image_bytes(8, 8, "PNG"))])
    listing = write_filelist(tmp_path / "x.filelist", [part, str(tmp_path / "gone" / "part-1")])
    with pytest.raises(LaionDataError, match=r"x\.filelist:2: listed file .*gone/part-1.* not found"):
        expand_file_list(listing)


def test_missing_caption_error_names_the_flag(tmp_path):
    from PIL import Image

    from ldm.data.folder import FolderDataset

    root = _folder(tmp_path)
    Image.new("RGB", (16, 16)).save(root / "b.jpg")
    with pytest.raises(ValueError, match="--skip_missing_captions True"):
        FolderDataset(str(root), resolution=16)


# --------------------------------------------------------------------------- item 6: special files (weights)


def _tiny_stage_c(path):
    import paddle

    from ldm.cascade.loading import save_network
    from ldm.cascade.stage_c import STAGE_C_PRESETS, StageC

    paddle.seed(0)
    save_network(StageC(STAGE_C_PRESETS["tiny"]), str(path))
    return str(path)


def test_fifo_weight_file_is_refused_by_every_loader(tmp_path):
    from ldm.cascade import components as cp
    from ldm.cascade.loading import load_stage_c
    from ldm.cascade.settings import CascadeConfig
    from ldm.weights import WeightSource, WeightsError, load_pdparams

    fifo = _fifo(tmp_path / "stage_c_lite.safetensors")
    with pytest.raises(WeightsError, match="not a regular file"):
        _no_hang(lambda: load_stage_c(fifo, preset=None))
    with pytest.raises(WeightsError, match="not a regular file"):
        _no_hang(lambda: load_pdparams(_fifo(tmp_path / "x.pdparams")))
    model_dir = tmp_path / "unet"
    model_dir.mkdir()
    _fifo(model_dir / "model.safetensors")
    with pytest.raises(WeightsError, match="not a regular file"):
        _no_hang(lambda: WeightSource(str(model_dir)))
    cfg = CascadeConfig(weights_path=str(tmp_path))
    with pytest.raises(WeightsError, match=r"stage_c_lite\.safetensors is a FIFO"):
        _no_hang(lambda: cp.resolve_weights(cfg, ("stage_c",)))
    text = tmp_path / "clip_text"
    text.mkdir()
    _fifo(text / "vocab.json")
    (text / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(WeightsError, match=r"vocab\.json is a FIFO"):
        _no_hang(lambda: cp.resolve_weights(cfg, ("tokenizer",)))


# --------------------------------------------------------------------------- item 7: NaN / Inf


def _with_nan(src, dst, name_part="weight"):
    from ldm.weights import WeightSource, save_safetensors

    with WeightSource(src) as s:
        state, meta = s.state_dict(), dict(s.metadata)
    name = next(k for k, v in state.items() if name_part in k and v.dtype.kind == "f" and v.size > 1)
    state[name] = state[name].copy()
    state[name].flat[0] = np.nan
    state[name].flat[1] = np.inf
    save_safetensors(state, str(dst), metadata=meta)  # writing a checkpoint: not refused
    return str(dst), name


def test_conversion_refuses_nan_and_inf_naming_the_tensor(tmp_path):
    from ldm.cascade.convert import convert_unet_weights
    from ldm.weights import WeightsError, save_safetensors

    bad, name = _with_nan(_tiny_stage_c(tmp_path / "good.safetensors"), tmp_path / "bad.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(WeightsError, match=rf"bad\.safetensors.*tensor '{name}' holds 2 NaN/Inf"):
        convert_unet_weights(bad, str(out), stage="c", preset=None, source_format="paddle")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(WeightsError, match="'w' holds 1 NaN/Inf"):
        save_safetensors({"w": np.array([1.0, np.nan], np.float32)}, str(out), finite=True)
    save_safetensors({"i": np.array([1, 2], np.int64)}, str(out), finite=True)  # ints are never "non-finite"


def test_conversion_script_prints_one_error_line(tmp_path):
    import subprocess
    import sys

    bad, name = _with_nan(_tiny_stage_c(tmp_path / "good.safetensors"), tmp_path / "bad.safetensors")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "convert_unet_weight.py")
    proc = subprocess.run([sys.executable, script, "--input", bad, "--output", str(tmp_path / "o.safetensors"),
                           "--stage", "c", "--source_format", "paddle"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert name in proc.stderr and "NaN/Inf" in proc.stderr


def test_merging_refuses_nan(tmp_path):
    lora = pytest.importorskip("ldm.lora")
    from ldm.weights import WeightsError

    bad, name = _with_nan(_tiny_stage_c(tmp_path / "good.safetensors"), tmp_path / "bad.safetensors")
    out = tmp_path / "merged.safetensors"
    with pytest.raises(WeightsError, match=rf"tensor '{name}' holds 2 NaN/Inf"):
        lora.merge_lora(bad, [], str(out))
    assert not out.exists()


def test_load_warns_naming_the_nan_tensor(tmp_path):
    import logging

    from ldm.cascade.stage_c import STAGE_C_PRESETS, StageC
    from ldm.weights import assign_state_dict

    bad, name = _with_nan(_tiny_stage_c(tmp_path / "good.safetensors"), tmp_path / "bad.safetensors")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("ldm.weights.assign")
    handler = Keep(level=logging.WARNING)
    log.addHandler(handler)
    try:
        assign_state_dict(StageC(STAGE_C_PRESETS["tiny"]), bad)
    finally:
        log.removeHandler(handler)
    assert [m for m in records if name in m and "2 NaN/Inf" in m and "bad.safetensors" in m], records


# --------------------------------------------------------------------------- item 9: messages (weights)


def test_empty_vocab_json_is_named(tmp_path):
    from ldm.clip import load_tokenizer
    from ldm.weights import WeightsError

    (tmp_path / "vocab.json").write_text("")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(WeightsError, match=r"vocab\.json: not valid JSON \(empty file\)"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"vocab\.json: empty"):
        load_tokenizer(str(tmp_path))


def test_malformed_unet_config_is_named(tmp_path):
    from ldm.sd.loading import load_unet
    from ldm.weights import WeightsError

    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(WeightsError, match=r"config\.json: not valid JSON"):
        load_unet(str(tmp_path))
    with pytest.raises(WeightsError, match=r"config\.json: not valid JSON"):
        load_unet(str(tmp_path / "config.json"))


def test_inference_refuses_a_fifo_image(tmp_path):
    import inference

    fifo = _fifo(tmp_path / "ref.png")
    with pytest.raises(ValueError, match=r"ref\.png is a FIFO"):
        _no_hang(lambda: inference.main(["--preset", "tiny", "--image", fifo, "--output_dir", str(tmp_path)]))
    with pytest.raises(ValueError, match="/dev/zero is a device"):
        _no_hang(lambda: inference.main(["--preset", "tiny", "--init_image", "/dev/zero"]))


def test_eval_inputs_refuse_special_files(tmp_path):
    from ldm.eval.images import load_image
    from ldm.eval.sweep import read_captions

    with pytest.raises(ValueError, match="captions file .* is a FIFO"):
        _no_hang(lambda: read_captions(_fifo(tmp_path / "c.tsv")))
    with pytest.raises(ValueError, match="image /dev/zero is a device"):
        _no_hang(lambda: load_image("/dev/zero"))


def test_generate_sd_refuses_a_fifo_prompt_file(tmp_path, capsys):
    from scripts import generate_sd

    with pytest.raises(SystemExit):
        _no_hang(lambda: generate_sd.parse_args(["--pretrained_model_name_or_path", str(tmp_path),
                                                 "--prompt_file", _fifo(tmp_path / "p.txt")]))
    assert "is a FIFO" in capsys.readouterr().err
