"""Safetensors streaming IO (bf16 included), the restricted .pdparams reader and key checks."""
import os
import pickle

import numpy as np
import pytest

from ldm.weights import (
    SafetensorsReader,
    WeightsError,
    assign_state_dict,
    bf16_to_fp32,
    check_state_dict,
    fp32_to_bf16,
    load_pdparams,
    load_state_dict,
    save_safetensors,
)


def test_roundtrip_matches_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    sd = {"a.weight": rng.standard_normal((3, 5)).astype("float32"), "b": np.arange(7, dtype="int64"),
          "c": rng.standard_normal((2, 2)).astype("float16")}
    ours = tmp_path / "ours.safetensors"
    save_safetensors(sd, ours)
    back = load_file(str(ours))  # the reference reader reads our file
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    theirs = tmp_path / "theirs.safetensors"
    save_file(sd, str(theirs))  # and we read the reference writer's file
    mine = load_state_dict(theirs)
    assert list(mine) == list(sd) or set(mine) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(mine[k], sd[k])


def test_bf16_roundtrip_and_torch_agreement(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    x = torch.randn(4, 6, dtype=torch.float32)
    save_file({"w": x.to(torch.bfloat16)}, str(tmp_path / "t.safetensors"))
    with SafetensorsReader(tmp_path / "t.safetensors") as r:
        assert r.dtype("w") == "BF16" and r.shape("w") == (4, 6)
        got = r.get("w")
    np.testing.assert_array_equal(got, x.to(torch.bfloat16).float().numpy())
    # our fp32 -> bf16 rounding equals torch's (round to nearest even)
    y = torch.randn(1000) * 100
    np.testing.assert_array_equal(bf16_to_fp32(fp32_to_bf16(y.numpy())), y.to(torch.bfloat16).float().numpy())
    save_safetensors({"w": y.numpy()}, tmp_path / "o.safetensors", dtype="bfloat16")
    from safetensors.torch import load_file

    np.testing.assert_array_equal(load_file(str(tmp_path / "o.safetensors"))["w"].float().numpy(),
                                  y.to(torch.bfloat16).float().numpy())


def test_truncated_and_garbage_files_are_clear_errors(tmp_path):
    save_safetensors({"w": np.ones((100, 100), "float32")}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        SafetensorsReader(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not weights")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        SafetensorsReader(tmp_path / "junk.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "absent.safetensors")


def test_written_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_safetensors({"w": np.ones(2, "float32")}, tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "w.safetensors"
    with pytest.raises(RuntimeError):
        from ldm.weights import SafetensorsWriter

        with SafetensorsWriter(target, [("a", (2,), "F32"), ("b", (2,), "F32")]) as w:
            w.write("a", np.zeros(2, "float32"))
            raise RuntimeError("killed")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_pdparams_restricted_loader(tmp_path):
    import paddle

    sd = {"x.weight": paddle.randn([3, 4]), "y": paddle.arange(5)}
    paddle.save(sd, str(tmp_path / "m.pdparams"))
    got = load_pdparams(tmp_path / "m.pdparams")
    np.testing.assert_array_equal(got["x.weight"], sd["x.weight"].numpy())
    np.testing.assert_array_equal(got["y"], sd["y"].numpy())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.pdparams", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(WeightsError, match=r"refusing to unpickle .*system"):
        load_pdparams(tmp_path / "evil.pdparams")


def test_check_state_dict_lists_every_problem():
    with pytest.raises(WeightsError) as e:
        check_state_dict({"a": (1,), "b": (2, 3), "c": (4,)}, {"a": (1,), "b": (3, 2), "d": (5,)}, "f.safetensors")
    msg = str(e.value)
    assert "f.safetensors" in msg and "1 missing" in msg and "    c" in msg
    assert "1 unexpected" in msg and "    d" in msg and "b: file (3, 2) vs model (2, 3)" in msg


def test_assign_state_dict_casts_and_refuses_partial_loads():
    import paddle

    layer = paddle.nn.Linear(3, 2)
    w = np.arange(6, dtype="float64").reshape(3, 2)
    assign_state_dict(layer, [("weight", w), ("bias", np.ones(2))])
    np.testing.assert_array_equal(layer.weight.numpy(), w.astype("float32"))
    before = layer.weight.numpy().copy()
    with pytest.raises(WeightsError, match="missing"):
        assign_state_dict(layer, [("weight", w * 2)])
    np.testing.assert_array_equal(layer.weight.numpy(), before)  # nothing assigned
