"""The training task base (ldm/train/task.py) and DiffusionTrainer on a toy task (CPU, seconds):

- frozen parts get no gradients and stay in eval mode after `.train()` (and after a wrapper sets
  `training` on every sublayer);
- an adapter-only selection (base frozen, an extra zero-initialised sub-layer trains) trains,
  optimises, averages and saves only the adapter, and its checkpoint resumes;
- resume mid-epoch equals the uninterrupted run bit for bit (dropout, the task's own noise, data
  order, epoch bookkeeping);
- DiffusionTrainer overrides only PaddleNLP's public extension points, nothing is replaced at run
  time (`paddle.load`, optimizer methods, network methods), and no checkpoint file is a pickle.
"""
import ast
import json
import os
import pickle

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddlenlp.trainer import Trainer, TrainerCallback

from ldm.train.args import DiffusionTrainingArguments
from ldm.train.callbacks import standard_callbacks
from ldm.train.task import TrainingTask
from ldm.train.trainer import DiffusionTrainer, SeededBatchSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC_EXTENSION_POINTS = {"__init__", "compute_loss", "get_train_dataloader", "log", "_save", "_load_from_checkpoint"}


class Adapter(nn.Layer):
    """A zero-initialised residual branch (what a LoRA adds to a layer)."""

    def __init__(self, c):
        super().__init__()
        self.down = nn.Linear(c, 2)
        self.up = nn.Linear(2, c, weight_attr=nn.initializer.Constant(0.0), bias_attr=False)

    def forward(self, x):
        return self.up(self.down(x))


class Net(nn.Layer):
    def __init__(self, adapter=False):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(16, 8), nn.Dropout(0.3), nn.Linear(8, 16)
        self.adapter = Adapter(16) if adapter else None

    def forward(self, z):  # (B, 16)
        out = self.fc2(self.drop(self.fc1(z)))
        return out if self.adapter is None else out + self.adapter(z)


class ToyTask(TrainingTask):
    """Frozen conv + BatchNorm + dropout encoder, a trained MLP; loss = MSE(net(z + noise), z)."""

    rng_tag = 7

    def __init__(self, adapter=False, seed=0, rank=0):
        super().__init__(seed=seed, rank=rank)
        paddle.seed(0)
        self.add_frozen("encoder", nn.Sequential(nn.Conv2D(3, 1, 1), nn.BatchNorm2D(1), nn.Dropout(0.5)))
        self.add_trained("net", Net(adapter))
        if adapter:
            self.select_trainable(lambda name, p: name.startswith("net.adapter."))

    def forward(self, pixel_values, caption, **unused):
        with paddle.no_grad():
            z = self.encoder(paddle.to_tensor(pixel_values)).flatten(1)  # (B, 16)
        noise = paddle.to_tensor(self.rng.standard_normal(z.shape, dtype=np.float32))
        return ((self.net(z + noise) - z) ** 2).mean()


def dataset(n=8):
    rng = np.random.default_rng(0)
    return [{"pixel_values": rng.random([3, 4, 4], dtype=np.float32), "caption": f"image {i}"} for i in range(n)]


def training_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=6, save_steps=3,
                logging_steps=1, seed=3, report_to="none", disable_tqdm=True, image_logging_steps=0, use_ema=True,
                ema_decay=0.5, save_total_limit=1, lr_scheduler_type="linear", warmup_steps=1)
    base.update(kw)
    return DiffusionTrainingArguments(**base)


def run(out, task=None, resume=None, stop_at=None, **kw):
    task = task or ToyTask()
    args = training_args(out, **kw)
    callbacks, ema = standard_callbacks(args)
    if stop_at:
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **k):
                control.should_training_stop = control.should_training_stop or state.global_step == stop_at

        callbacks.append(Stop())
    trainer = DiffusionTrainer(model=task, args=args, train_dataset=dataset(), callbacks=callbacks)
    trainer.set_optimizer_grouped_parameters(list(task.trainable_parameters().values()))
    return trainer.fit(resume, ema), ema


def test_frozen_parts_stay_eval_without_gradients():
    task = ToyTask()
    bn = task.encoder[1]
    mean0 = bn._mean.numpy().copy()
    task.train()
    assert task.net.training and not any(m.training for m in [task.encoder, *task.encoder.sublayers()])
    nn.Layer.train(task)  # what a wrapper does: `training` on every sublayer, our train() bypassed
    x = np.random.default_rng(1).random([4, 3, 4, 4], dtype=np.float32)
    loss = task(x, ["a"] * 4)
    assert not task.encoder.training and not bn.training  # back in eval before the forward ran
    loss.backward()
    assert all(p.stop_gradient and p.grad is None for p in task.encoder.parameters())
    assert all(p.grad is not None for p in task.net.parameters())
    assert np.array_equal(bn._mean.numpy(), mean0)  # BatchNorm statistics not updated
    with paddle.no_grad():
        a, b = (task.encoder(paddle.to_tensor(x)).numpy() for _ in range(2))
    assert np.array_equal(a, b)  # the frozen dropout is off
    assert set(task.trainable_parameters()) == {f"net.{k}" for k, _ in task.net.named_parameters()}
    assert [type(m) for m in task.frozen] == [nn.Sequential]


def test_adapter_only_run_trains_and_saves_only_the_adapter(tmp_path):
    task = ToyTask(adapter=True)
    base = {k: p.numpy().copy() for k, p in task.net.named_parameters() if not k.startswith("adapter.")}
    adapter = {"adapter.down.weight", "adapter.down.bias", "adapter.up.weight"}
    assert set(task.trainable_parameters()) == {f"net.{k}" for k in adapter}
    trainer, ema = run(tmp_path / "out", task=task)
    after = dict(task.net.named_parameters())
    assert all(np.array_equal(after[k].numpy(), v) for k, v in base.items())  # base bit-identical
    assert float(after["adapter.up.weight"].abs().sum()) > 0  # the adapter trained
    ckpt = tmp_path / "out" / "checkpoint-6"
    from ldm.weights import load_state_dict

    for name in ("net_trainable.safetensors", "net_trainable_ema.safetensors"):
        assert set(load_state_dict(ckpt / name)) == adapter
    assert not (ckpt / "net.safetensors").exists()
    opt = load_state_dict(ckpt / "optimizer.safetensors")
    assert opt and all(k.startswith("net.adapter.") for k in opt), sorted(opt)
    assert set(ema.shadow) == set(task.trainable_parameters())
    # resume: a fresh task gets the adapter back from the checkpoint (the base stays as built)
    fresh = ToyTask(adapter=True)
    fresh.load_trained(str(ckpt))
    for k, p in fresh.net.named_parameters():
        np.testing.assert_array_equal(p.numpy(), after[k].numpy(), err_msg=k)
    with pytest.raises(FileNotFoundError):
        ToyTask().load_trained(str(ckpt))  # a full-network task finds no full file there


def test_resume_mid_epoch_equals_straight_run(tmp_path):
    straight, _ = run(tmp_path / "straight")
    run(tmp_path / "resumed", stop_at=3)  # 8 samples, batch 2: step 3 is inside epoch 1
    assert sorted(os.listdir(tmp_path / "resumed")) and (tmp_path / "resumed" / "checkpoint-3").is_dir()
    resumed, _ = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-3"))
    for k, p in straight.model.named_parameters():
        np.testing.assert_array_equal(p.numpy(), dict(resumed.model.named_parameters())[k].numpy(), err_msg=k)
    a = json.load(open(tmp_path / "straight" / "checkpoint-6" / "trainer_state.json"))
    b = json.load(open(tmp_path / "resumed" / "checkpoint-6" / "trainer_state.json"))
    assert a["global_step"] == b["global_step"] == 6 and a["epoch"] == pytest.approx(b["epoch"]) == 1.5
    strip = lambda h: [{k: v for k, v in x.items() if "runtime" not in k and "per_second" not in k  # noqa: E731
                        and k != "data_wait_fraction"} for x in h if "loss" in x]
    assert strip(a["log_history"]) == strip(b["log_history"])  # losses, learning rates, epochs, grad norms
    assert json.load(open(tmp_path / "straight" / "checkpoint-6" / "train_state_rank0.json")) == json.load(
        open(tmp_path / "resumed" / "checkpoint-6" / "train_state_rank0.json"))


def test_no_checkpoint_file_is_a_pickle_and_nothing_is_replaced(tmp_path):
    load, set_state = paddle.load, paddle.optimizer.AdamW.set_state_dict
    trainer, _ = run(tmp_path / "out", max_steps=3)
    run(tmp_path / "out", resume=str(tmp_path / "out" / "checkpoint-3"), max_steps=4, save_steps=4)
    assert paddle.load is load and paddle.optimizer.AdamW.set_state_dict is set_state
    assert "set_state_dict" not in vars(trainer.optimizer)
    for folder in ("checkpoint-4", "."):
        for name in os.listdir(tmp_path / "out" / folder):
            path = tmp_path / "out" / folder / name
            if path.is_file():
                with open(path, "rb") as f:
                    assert f.read(1) != b"\x80", f"{path} is a pickle"  # every pickle protocol >= 2 starts so
    assert pickle.dumps(0)[:1] == b"\x80"


def test_trainer_overrides_only_public_extension_points():
    trainer_api = {n for n in dir(Trainer) if callable(getattr(Trainer, n, None))}
    overridden = {n for n, v in vars(DiffusionTrainer).items() if callable(v) and n in trainer_api}
    assert overridden <= PUBLIC_EXTENSION_POINTS, overridden - PUBLIC_EXTENSION_POINTS


def test_training_code_assigns_no_methods_at_run_time():
    """No monkeypatching in ldm/train: no assignment to an attribute of an imported module, and no
    function or lambda assigned to an attribute (as `paddle.load = ...` or `net._run_block = ...` did)."""
    folder = os.path.join(ROOT, "ldm", "train")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
        modules = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                   if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        functions = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Assign, ast.AugAssign)):
                continue
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if not isinstance(target, ast.Attribute):
                    continue
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                where = f"{name}:{node.lineno}"
                assert not (isinstance(root, ast.Name) and root.id in modules), f"{where} assigns into a module"
                value = node.value
                assert not isinstance(value, ast.Lambda), f"{where} assigns a lambda to an attribute"
                assert not (isinstance(value, ast.Name) and value.id in functions), f"{where} assigns a function"


def test_seeded_sampler_resumes_at_its_position_and_sets_the_dataset_epoch():
    class Data(list):
        epoch = None

        def set_epoch(self, e):
            self.epoch = e

    def sampler():
        return SeededBatchSampler(Data(range(12)), batch_size=2, shuffle=True, drop_last=True, num_replicas=1,
                                  rank=0, seed=5)

    straight = sampler()
    epochs = []
    for e in range(3):
        straight.set_epoch(e)
        epochs.append([list(b) for b in straight])
        assert straight.dataset.epoch == e
    resumed = sampler()
    resumed.start_at(1, 4)  # 6 batches per epoch: 1 epoch and 4 batches done
    assert resumed.dataset.epoch == 1
    assert [list(b) for b in resumed] == epochs[1][4:]  # the rest of epoch 1
    resumed.set_epoch(1)  # the Trainer's loop epoch 1 = data epoch 2
    assert resumed.dataset.epoch == 2 and [list(b) for b in resumed] == epochs[2]
    with pytest.raises(ValueError):
        resumed.start_at(0, 6)
