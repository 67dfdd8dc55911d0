"""The one weights stack end to end: files written by the pre-refactor writers (tests/data/old_format,
see its README) load bit-exactly; writer -> reader -> assigner round trips for every file kind with the
metadata schema checked; safetensors header defects are one WeightsError naming file and tensor; and
ldm/weights stays a leaf.

Expected values come from an independent reader (`_raw`, parsing the format from its spec), not
from the code under test."""
import ast
import json
import os
import shutil
import struct
import sys

import numpy as np
import paddle
import pytest

from ldm.cascade import loading
from ldm.cascade.stage_c import StageC
from ldm.weights import (
    FORMAT, SafetensorsReader, StateSource, WeightSource, WeightsError, assign_state_dict, load_state_dict,
    read_info, save_safetensors, weights_metadata,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = os.path.join(ROOT, "tests", "data", "old_format")
_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
       "U8": "u1", "BOOL": "?"}


def _raw(path):
    """({name: array}, metadata) straight from the bytes (bf16 widened to float32)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for k, e in header.items():
        b, end = e["data_offsets"]
        a = np.frombuffer(data[8 + n + b:8 + n + end], _NP[e["dtype"]]).reshape(e["shape"])
        out[k] = (a.astype(np.uint32) << 16).view(np.float32) if e["dtype"] == "BF16" else a
    return out, meta


def _raw_tags(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: e["dtype"] for k, e in header.items()}


def _assert_net_equals(net, tensors, skip=()):
    """Every tensor of `net` (but the `skip` suffixes) equals the file's, bit for bit, and nothing is left over."""
    state = {k: v for k, v in net.state_dict().items() if not (skip and k.endswith(skip))}
    want = {k: v for k, v in tensors.items() if not (skip and k.endswith(skip))}
    assert sorted(state) == sorted(want)
    for k, v in state.items():
        np.testing.assert_array_equal(v.numpy(), want[k], err_msg=k)


def _assert_schema(path, model, config=None):
    meta = _raw(path)[1]
    assert meta["format"] == FORMAT == "np" and meta["model"] == model
    if config is not None:
        assert json.loads(meta["config"]) == config


def _old(*parts):
    return os.path.join(OLD, *parts)


# ---------------------------------------------------------------------------------------------
# Stable Cascade networks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,load,model", [
    ("stage_c.safetensors", lambda p: loading.load_stage_c(p, preset=None), "stage_c"),  # convert_unet_weights
    ("checkpoint-2/stage_c.safetensors", lambda p: loading.load_stage_c(p, preset=None), "stage_c"),  # write_stage_c
    ("stage_b_bf16.safetensors", lambda p: loading.load_stage_b(p, preset=None), "stage_b"),  # bf16 storage
    ("stage_a.safetensors", loading.load_stage_a, "stage_a"),  # save_paddle_weights
    ("previewer.safetensors", loading.load_previewer, "previewer"),  # convert_previewer
])
def test_old_cascade_files_load_and_round_trip(tmp_path, name, load, model):
    path = _old(*name.split("/"))
    tensors, meta = _raw(path)
    old_config = json.loads(meta["config"])
    net = load(path)
    assert net.config.to_dict() == old_config and loading.model_name(net) == model
    _assert_net_equals(net, tensors)
    # the new writer: schema (format, model, config), same values, same storage type
    dtype = "bfloat16" if "bf16" in name else None
    new = str(tmp_path / "new.safetensors")
    loading.save_network(net, new, dtype=dtype)
    _assert_schema(new, model, old_config)
    assert _raw_tags(new) == _raw_tags(path)
    for k, v in _raw(new)[0].items():
        np.testing.assert_array_equal(v, tensors[k], err_msg=k)
    _assert_net_equals(load(new), tensors)


def test_old_training_checkpoint_restores_and_the_new_writer_matches(tmp_path):
    """stage_c.safetensors + stage_c_ema.safetensors of a Stage C checkpoint (train_c.write_stage_c)."""
    main, meta = _raw(_old("checkpoint-2", "stage_c.safetensors"))
    ema, _ = _raw(_old("checkpoint-2", "stage_c_ema.safetensors"))
    for k in main:
        np.testing.assert_array_equal(ema[k], main[k] * np.float32(0.5), err_msg=k)
    cfg = json.loads(meta["config"])
    net = StageC(cfg)  # as the trainer's load_trained restores into its network
    assign_state_dict(net, _old("checkpoint-2", "stage_c.safetensors"))
    _assert_net_equals(net, main)
    assert load_state_dict(_old("checkpoint-2", "stage_c_ema.safetensors")).keys() == ema.keys()
    # what the trainer writes now: (name, tensor) pairs, the EMA shadow replacing parameters
    path = str(tmp_path / "stage_c_ema.safetensors")
    shadow = {k: v * 0.5 for k, v in net.named_parameters()}
    items = [(k, shadow.get(k, v)) for k, v in net.state_dict().items()]
    save_safetensors(items, path, metadata=weights_metadata("stage_c", net.config))
    _assert_schema(path, "stage_c", cfg)
    back = loading.load_stage_c(path, preset=None)
    _assert_net_equals(back, ema)


def test_seed_pdparams_loads_through_the_restricted_unpickler():
    """The seed's PaddleMIX layout (.pdparams, unsplit in_proj leftovers next to q/k/v)."""
    main, meta = _raw(_old("checkpoint-2", "stage_c.safetensors"))
    with WeightSource(_old("stage_c_seed.pdparams")) as src:
        assert src.kind == "pdparams" and src.info.layout == "paddle"
        assert any(k.endswith("in_proj_weight") for k in src.keys())
    net = loading.build_stage_c(config=json.loads(meta["config"]), weights=_old("stage_c_seed.pdparams"))
    _assert_net_equals(net, main)


def test_effnet_in_the_old_converter_format_round_trips(tmp_path):
    """No fixture (a fixed ~20M parameter backbone): the old converter's exact metadata, written by the
    reference safetensors library."""
    from safetensors.numpy import save_file

    from ldm.cascade.effnet import EfficientNetEncoder

    paddle.seed(7)
    net = EfficientNetEncoder(c_latent=8)
    rng = np.random.default_rng(7)
    state = {k: (np.abs(rng.standard_normal(v.shape)) + 0.5 if k.endswith("_variance") else
                 rng.standard_normal(v.shape)).astype(np.float32) for k, v in net.state_dict().items()}
    old = str(tmp_path / "effnet_encoder.safetensors")
    save_file(state, old, metadata={"format": "np", "model": "effnet", "config": json.dumps({"c_latent": 8}),
                                    "source": "effnet_encoder.safetensors"})
    loaded = loading.load_effnet(old)
    assert loaded.config.c_latent == 8
    _assert_net_equals(loaded, state)
    new = str(tmp_path / "new.safetensors")
    loading.save_network(loaded, new)
    _assert_schema(new, "effnet", {"c_latent": 8})
    _assert_net_equals(loading.load_effnet(new), state)


def test_cascade_converter_output_schema(tmp_path):
    """convert_unet_weights writes the schema (+ the source layout as provenance)."""
    from ldm.cascade.convert import convert_unet_weights

    out = str(tmp_path / "c.safetensors")
    convert_unet_weights(_old("checkpoint-2", "stage_c.safetensors"), out, preset=None)
    cfg = json.loads(_raw(_old("stage_c.safetensors"))[1]["config"])
    _assert_schema(out, "stage_c", cfg)
    assert _raw(out)[1]["source_layout"] == "paddle"
    for k, v in _raw(out)[0].items():
        np.testing.assert_array_equal(v, _raw(_old("stage_c.safetensors"))[0][k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# CLIP folders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder,part", [("clip_text", "text"), ("clip_vision", "vision")])
def test_old_clip_folders_load_and_round_trip(tmp_path, folder, part):
    from ldm.clip import load_clip_text, load_clip_vision

    load = load_clip_text if part == "text" else load_clip_vision
    tensors, meta = _raw(_old(folder, "model.safetensors"))
    assert meta["format"] == "np"
    net = load(_old(folder))
    _assert_net_equals(net, tensors, skip=("position_ids",))
    # the new writer: the folder keeps loading here and in ppdiffusers' own from_pretrained
    new = tmp_path / folder
    shutil.copytree(_old(folder), new)
    save_safetensors(net.state_dict(), str(new / "model.safetensors"), metadata=weights_metadata(f"clip_{part}"))
    _assert_schema(str(new / "model.safetensors"), f"clip_{part}")
    _assert_net_equals(load(new), tensors, skip=("position_ids",))
    from ppdiffusers.transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    theirs = (CLIPTextModelWithProjection if part == "text" else CLIPVisionModelWithProjection).from_pretrained(str(new))
    _assert_net_equals(theirs, tensors, skip=("position_ids",))


def test_make_tiny_clip_text_writes_the_schema(tmp_path):
    from ldm.clip import load_clip_text, make_tiny_clip_text

    make_tiny_clip_text(tmp_path / "t", projection_dim=8, hidden_size=8, num_hidden_layers=1)
    _assert_schema(str(tmp_path / "t" / "model.safetensors"), "clip_text")
    _assert_net_equals(load_clip_text(tmp_path / "t"), _raw(str(tmp_path / "t" / "model.safetensors"))[0],
                       skip=("position_ids",))


# ---------------------------------------------------------------------------------------------
# SD UNet folders
# ---------------------------------------------------------------------------------------------
def test_old_sd_unet_folders_load_and_round_trip(tmp_path):
    from ppdiffusers import UNet2DConditionModel

    from ldm.sd.export import export_unet_to_diffusers
    from ldm.sd.loading import load_unet

    ours, meta = _raw(_old("sd_unet", "diffusion_paddle_model.safetensors"))  # ppdiffusers save_pretrained
    assert meta == {"format": "pd"}
    unet = load_unet(_old("sd_unet"))
    _assert_net_equals(unet, ours)
    ema, meta = _raw(_old("sd_ckpt", "unet_ema", "diffusion_paddle_model.safetensors"))  # the trainer's save_ema
    assert meta == {"format": "pd"}
    params = dict(unet.named_parameters())
    _assert_net_equals(load_unet(_old("sd_ckpt", "unet_ema")), ema)
    for k in params:
        np.testing.assert_array_equal(ema[k], ours[k] * np.float32(0.5), err_msg=k)
    exported, meta = _raw(_old("sd_export", "diffusion_pytorch_model.safetensors"))  # ldm.sd.export ("pt")
    assert meta == {"format": "pt"}
    _assert_net_equals(load_unet(_old("sd_export")), ours)
    # the new writers: EMA folder (schema, "np": ppdiffusers reads it as Paddle layout) and the export
    folder = tmp_path / "unet_ema"
    folder.mkdir()
    save_safetensors(unet.state_dict(), str(folder / "diffusion_paddle_model.safetensors"),
                     metadata=weights_metadata("sd_unet"))
    unet.save_config(str(folder))
    _assert_schema(str(folder / "diffusion_paddle_model.safetensors"), "sd_unet")
    _assert_net_equals(load_unet(str(folder)), ours)
    _assert_net_equals(UNet2DConditionModel.from_pretrained(str(folder)), ours)
    path = export_unet_to_diffusers(unet, str(tmp_path / "export"))
    new, meta = _raw(path)
    assert meta == {"format": "pt", "model": "sd_unet"} and new.keys() == exported.keys()
    for k in new:
        np.testing.assert_array_equal(new[k], exported[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# The reader: every old tag, shards, sources
# ---------------------------------------------------------------------------------------------
def test_read_info_knows_every_tag_written_so_far():
    cfg = json.dumps({"a": 1})
    old = read_info({"format": "ldm-cascade-paddle", "stage": "c", "config": cfg})
    new = read_info({"format": "np", "model": "stage_c", "config": cfg})
    assert (old.layout, old.model, old.config) == (new.layout, new.model, new.config) == ("paddle", "stage_c", {"a": 1})
    assert read_info({"format": "ldm-cascade-paddle", "stage": "b"}).model == "stage_b"
    assert read_info({"format": "pd"}).layout == read_info({"format": "np"}).layout == "paddle"
    assert read_info({"format": "pt"}).layout == "torch"
    assert read_info({}).layout is None and read_info(None).model is None
    with pytest.raises(WeightsError, match="f.safetensors.*not JSON"):
        read_info({"format": "np", "config": "{"}, "f.safetensors")
    with pytest.raises(WeightsError, match="stage"):
        read_info({"format": "ldm-cascade-paddle"})
    with pytest.raises(ValueError):
        weights_metadata("stage_c", {"a": 1}, format="pt")  # extra keys cannot overwrite the schema


def test_sharded_folder_and_index_read_as_one_file(tmp_path):
    tensors, _ = _raw(_old("stage_c.safetensors"))
    names = sorted(tensors)
    folder = tmp_path / "sharded"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_safetensors({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "np"})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for path in (str(folder), str(folder / "model.safetensors.index.json"), [str(folder / s) for s in shards]):
        got = load_state_dict(path)
        assert sorted(got) == names
        for k in names:
            np.testing.assert_array_equal(got[k], tensors[k], err_msg=k)
    cfg = json.loads(_raw(_old("stage_c.safetensors"))[1]["config"])
    _assert_net_equals(loading.build_stage_c(config=cfg, weights=str(folder)), tensors)
    # a tensor in two shards, a shard that is missing
    save_safetensors({names[0]: tensors[names[0]]}, str(tmp_path / "dup.safetensors"))
    with pytest.raises(WeightsError, match="two shards"):
        WeightSource([str(folder / "model-00001-of-00002.safetensors"), str(tmp_path / "dup.safetensors")])
    os.remove(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(WeightsError, match="missing"):
        WeightSource(str(folder))


def test_writer_streams_tensors_and_keeps_types(tmp_path):
    lin = paddle.nn.Linear(3, 2)
    state = {"w": lin.weight, "b16": lin.bias.astype("bfloat16"), "h": np.ones(3, np.float16),
             "i": np.arange(4, dtype=np.int64), "flag": np.array([True, False])}
    save_safetensors(state, str(tmp_path / "a.safetensors"), metadata=weights_metadata("x"))
    assert _raw_tags(str(tmp_path / "a.safetensors")) == {"w": "F32", "b16": "BF16", "h": "F16", "i": "I64",
                                                         "flag": "BOOL"}
    save_safetensors(state, str(tmp_path / "b.safetensors"), dtype="float16")
    assert _raw_tags(str(tmp_path / "b.safetensors")) == {"w": "F16", "b16": "F16", "h": "F16", "i": "I64",
                                                         "flag": "BOOL"}
    got = _raw(str(tmp_path / "a.safetensors"))[0]
    np.testing.assert_array_equal(got["w"], lin.weight.numpy())
    np.testing.assert_array_equal(got["b16"], StateSource(state).get("b16"))
    with pytest.raises(ValueError, match="storage dtype"):
        save_safetensors(state, str(tmp_path / "c.safetensors"), dtype="int8")


# ---------------------------------------------------------------------------------------------
# Header defects (issue 12, item 7): one WeightsError naming the file and the tensor
# ---------------------------------------------------------------------------------------------
def _file(path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def test_int_tag_on_a_float_parameter_is_refused(tmp_path):
    layer = paddle.nn.Linear(2, 2)
    before = layer.weight.numpy().copy()
    path = _file(tmp_path / "i32.safetensors", {"weight": {"dtype": "I32", "shape": [2, 2], "data_offsets": [0, 16]},
                                                "bias": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}},
                 np.arange(4, dtype=np.int32).tobytes() + np.zeros(2, np.float32).tobytes())
    with pytest.raises(WeightsError, match=r"(?s)i32\.safetensors.*weight: file I32 vs model float32"):
        assign_state_dict(layer, path)
    np.testing.assert_array_equal(layer.weight.numpy(), before)


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2],
      "data_offsets": [0, 8]}}, 8, r"'a' and 'b' share bytes"),  # aliased byte ranges
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2],
      "data_offsets": [4, 12]}}, 12, r"'a' and 'b' share bytes"),  # overlapping
    ({"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 8]}}, 8, r"'w'.*hold 8 bytes.*needs 36"),
    ({"w": {"dtype": "F32", "shape": [2]}}, 8, r"'w'.*no 'data_offsets'"),
    ({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, 8, r"'w'.*unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, r"'w'.*shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, r"'w'.*data_offsets"),
    ({"w": [1, 2]}, 0, r"'w'.*not an object"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, r"truncated.*'w'"),
    ({"__metadata__": {"format": 1}}, 0, r"__metadata__"),
    ([1, 2, 3], 0, r"a JSON list, not an object"),
    (b"[" * 100000 + b"]" * 100000, 0, r"nested too deeply"),
    (b"\xff\xfe{", 0, r"corrupt safetensors header"),
])
def test_header_defects_are_weights_errors(tmp_path, header, data, match):
    path = _file(tmp_path / "bad.safetensors", header, b"\0" * data)
    with pytest.raises(WeightsError, match=match) as e:
        with WeightSource(path) as src:
            src.state_dict()
    assert "bad.safetensors" in str(e.value)


def test_special_files_are_refused_before_opening(tmp_path):
    fifo = tmp_path / "stage_c.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError, match="not a regular file"):
        WeightSource(str(fifo))
    with pytest.raises(WeightsError, match="not a regular file"):
        SafetensorsReader(str(fifo))
    with pytest.raises(WeightsError, match="not found"):
        WeightSource(str(tmp_path / "absent.safetensors"))


# ---------------------------------------------------------------------------------------------
# ldm/weights is a leaf
# ---------------------------------------------------------------------------------------------
def test_weights_package_imports_only_numpy_paddle_stdlib_and_ldm_utils():
    """Every import statement of ldm/weights (function-level ones included, read from the AST)."""
    folder = os.path.join(ROOT, "ldm", "weights")
    allowed_third_party = {"numpy", "paddle"}
    bad = []
    for f in sorted(os.listdir(folder)):
        if not f.endswith(".py"):
            continue
        with open(os.path.join(folder, f), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside ldm.weights
                    continue
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if m.startswith("ldm"):
                    if not (m == "ldm.utils" or m.startswith("ldm.weights")):
                        bad.append((f, m))
                elif top not in allowed_third_party and top not in sys.stdlib_module_names and top != "__future__":
                    bad.append((f, m))
    assert bad == []
