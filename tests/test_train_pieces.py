"""Generic training pieces (ldm/train): EMA callback, crash-safe checkpoints and rotation,
optimizer-state re-keying, parameter groups, numpy collate."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest


class _Tiny:
    def __new__(cls):
        import paddle.nn as nn

        class Tiny(nn.Layer):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 2)
                self.norm = nn.LayerNorm(2)

            def ema_parameters(self):
                return dict(self.named_parameters())

        return Tiny()


def test_ema_updates_every_step_and_round_trips(tmp_path):
    import paddle

    from ldm.train.callbacks import EMA_FILE, EMACallback

    paddle.seed(0)
    model = _Tiny()
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True, resume_from_checkpoint=None)
    state = SimpleNamespace(global_step=0)
    ema = EMACallback(decay=0.5)
    ema.on_train_begin(args, state, None, model=model)
    w0 = model.fc.weight.numpy().copy()
    expected = w0.copy()
    for step in range(1, 4):
        model.fc.weight.set_value(model.fc.weight + 1.0)
        state.global_step = step
        ema.on_step_end(args, state, None, model=model)
        expected = 0.5 * expected + 0.5 * model.fc.weight.numpy()
    np.testing.assert_allclose(ema.shadow["fc.weight"].numpy(), expected, rtol=1e-6)
    assert ema.num_updates == 3
    ckpt = tmp_path / "checkpoint-3"
    ema.on_save(args, state, None, model=model)
    assert (ckpt / EMA_FILE).is_file()
    # resume: a new callback restores the saved shadow (not a fresh copy of the weights)
    ema2 = EMACallback(decay=0.5)
    args.resume_from_checkpoint = str(ckpt)
    ema2.on_train_begin(args, state, None, model=model)
    np.testing.assert_array_equal(ema2.shadow["fc.weight"].numpy(), ema.shadow["fc.weight"].numpy())
    assert not np.allclose(ema2.shadow["fc.weight"].numpy(), model.fc.weight.numpy())


def test_checkpoint_completeness_resume_and_rotation(tmp_path):
    from ldm.train.checkpoint import (CheckpointMarkerCallback, find_resume_checkpoint, is_complete, resolve_resume,
                                      rotate_checkpoints)

    out = tmp_path
    assert find_resume_checkpoint(str(out)) is None and resolve_resume(str(out), None) is None
    args = SimpleNamespace(output_dir=str(out), should_save=True, save_total_limit=2)
    cb = CheckpointMarkerCallback()
    for step in (10, 20, 30):
        os.makedirs(out / f"checkpoint-{step}")
        cb.on_save(args, SimpleNamespace(global_step=step), None)
    assert sorted(os.listdir(out)) == ["checkpoint-20", "checkpoint-30"]  # rotated after completion
    os.makedirs(out / "checkpoint-40")  # killed mid-save: no marker
    assert not is_complete(str(out / "checkpoint-40"))
    assert find_resume_checkpoint(str(out)) == str(out / "checkpoint-30")
    assert resolve_resume(str(out), None) == str(out / "checkpoint-30")
    assert resolve_resume(str(out), None, overwrite_output_dir=True) is None
    assert resolve_resume(str(out), "auto") == str(out / "checkpoint-30")
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(str(out), str(out / "checkpoint-40"))
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(out / "nothing"), "auto")
    # rotation never deletes the only complete checkpoint and keeps `keep` complete ones
    assert rotate_checkpoints(str(out), 1) == [str(out / "checkpoint-20")]
    assert sorted(os.listdir(out)) == ["checkpoint-30", "checkpoint-40"]
    with open(out / "checkpoint-30" / "checkpoint_complete.json") as f:
        assert json.load(f) == {"global_step": 30}


def test_rename_optimizer_state():
    from ldm.train.checkpoint import rename_optimizer_state

    state = {"conv2d_1.w_0_moment1_0": 1, "conv2d_12.w_0_moment1_0": 2, "conv2d_1.w_0_beta1_pow_acc_0": 3,
             "master_weights": {"conv2d_1.w_0": 4}, "LR_Scheduler": {"last_epoch": 5}}
    out = rename_optimizer_state(state, {"conv2d_1.w_0": "conv2d_40.w_0", "conv2d_12.w_0": "conv2d_41.w_0"})
    assert out == {"conv2d_40.w_0_moment1_0": 1, "conv2d_41.w_0_moment1_0": 2, "conv2d_40.w_0_beta1_pow_acc_0": 3,
                   "master_weights": {"conv2d_40.w_0": 4}, "LR_Scheduler": {"last_epoch": 5}}


def test_param_groups_lr_scale_and_no_decay():
    from ldm.train.optim import build_param_groups

    a, b = _Tiny(), _Tiny()
    for p in b.norm.parameters():
        p.stop_gradient = True
    groups = build_param_groups({"unet": list(a.named_parameters()), "text_encoder": list(b.named_parameters())},
                                {"unet": 1e-4, "text_encoder": 1e-5}, base_learning_rate=1e-4, weight_decay=0.01)
    summary = [(g["learning_rate"], g["weight_decay"], len(g["params"])) for g in groups]
    assert summary == [(1.0, 0.01, 1), (1.0, 0.0, 3), (pytest.approx(0.1), 0.01, 1), (pytest.approx(0.1), 0.0, 1)]
    with pytest.raises(ValueError):
        build_param_groups({"x": []}, {}, 1e-4, 0.0)


def test_collate_keeps_strings():
    from ldm.data import collate

    batch = collate([{"pixel_values": np.zeros((3, 2, 2), "float32"), "input_ids": np.arange(4), "caption": "a"},
                           {"pixel_values": np.ones((3, 2, 2), "float32"), "input_ids": np.arange(4), "caption": "b"}])
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["input_ids"].dtype == np.int64
    assert batch["caption"] == ["a", "b"]


def test_group_learning_rates_reach_the_optimizer():
    """Paddle applies a group's `learning_rate` as a multiplier of the scheduled base rate."""
    import paddle

    from ldm.train.optim import build_param_groups

    paddle.seed(0)
    a, b = _Tiny(), _Tiny()
    groups = build_param_groups({"unet": list(a.named_parameters()), "text_encoder": list(b.named_parameters())},
                                {"unet": 1e-2, "text_encoder": 1e-3}, base_learning_rate=1e-2, weight_decay=0.0)
    opt = paddle.optimizer.AdamW(learning_rate=paddle.optimizer.lr.LambdaDecay(1e-2, lambda s: 1.0),
                                 parameters=groups, weight_decay=0.0)
    wa, wb = a.fc.weight.numpy().copy(), b.fc.weight.numpy().copy()
    x = paddle.ones([4, 3])
    (a.norm(a.fc(x)).sum() * 0 + a.fc(x).sum() + b.fc(x).sum()).backward()
    opt.step()
    # the first Adam step moves each weight by ~lr (sign of the gradient)
    step_a, step_b = np.abs(a.fc.weight.numpy() - wa), np.abs(b.fc.weight.numpy() - wb)
    np.testing.assert_allclose(step_a, np.full_like(step_a, 1e-2), rtol=1e-3)
    np.testing.assert_allclose(step_b, np.full_like(step_b, 1e-3), rtol=1e-3)


def test_checkpoint_state_is_read_without_running_pickled_code(tmp_path):
    """Optimizer / scheduler / RNG files of an older checkpoint go through the restricted unpickler
    (`paddle.load` itself is never replaced)."""
    import os
    import pickle

    import paddle
    import pytest

    from ldm.train.checkpoint import CheckpointStateCallback, read_legacy_state
    from ldm.weights import WeightsError

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "optimizer.pdopt", "wb") as f:
        pickle.dump({"linear_0.w_0_moment1_0": Payload()}, f)
    state = {"w": paddle.ones([2]), "LR_Scheduler": {"last_epoch": 3}}
    paddle.save(state, str(tmp_path / "good.pdopt"))
    paddle.seed(1)
    paddle.save({"cpu": paddle.framework.core.default_cpu_generator().get_state()}, str(tmp_path / "rng.pth"))
    load = paddle.load
    with pytest.raises(WeightsError, match="refusing to unpickle .*system"):
        read_legacy_state(str(tmp_path / "optimizer.pdopt"))
    good = read_legacy_state(str(tmp_path / "good.pdopt"))
    rng = read_legacy_state(str(tmp_path / "rng.pth"))
    assert not marker.exists()
    assert good["LR_Scheduler"] == {"last_epoch": 3} and good["w"].tolist() == [1.0, 1.0]
    paddle.framework.core.default_cpu_generator().set_state(rng["cpu"])
    a = paddle.rand([3]).numpy()
    paddle.seed(1)
    assert a.tolist() == paddle.rand([3]).numpy().tolist()
    assert paddle.load is load and paddle.load.__name__ == "load"  # never replaced
    # the checkpoint callback's loaders of older files use it
    import inspect

    for name in ("_load_optimizer", "_read_rng"):
        assert "read_legacy_state(" in inspect.getsource(getattr(CheckpointStateCallback, name))


def test_seeded_batch_sampler_order_depends_on_seed_and_epoch():
    from ldm.train.trainer import SeededBatchSampler

    data = list(range(32))

    def order(seed, epoch):
        s = SeededBatchSampler(data, batch_size=4, shuffle=True, drop_last=True, num_replicas=1, rank=0, seed=seed)
        s.set_epoch(epoch)
        return [i for b in s for i in b]

    assert order(1, 0) == order(1, 0) and sorted(order(1, 0)) == data  # deterministic, a permutation
    assert order(1, 0) != order(2, 0)  # the seed matters
    assert order(1, 0) != order(1, 1)  # and the epoch
