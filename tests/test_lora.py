"""LoRA (ldm/lora.py, ldm/train/lora.py, scripts/merge_lora.py, inference.py --lora), tiny networks, CPU.

- a fresh (zero lora_down) adapter gives bit-identical outputs, for every target set;
- a Stage C LoRA run trains only the adapters (the base stays bit-identical), checkpoints hold
  only them, and a resumed run equals the straight one bit for bit (adapters, EMA, community file);
- the community file of a run, applied to the base network, predicts like the adapters, and
  merging it (ours and the original layout) equals applying it (max abs diff <= 1e-5);
- a community-format file written here from original-layout names, split as ComfyUI maps them
  (in_proj -> to_q / to_k / to_v), changes exactly the targeted modules by scale * alpha / r * up @ down;
- unknown keys, shapes that do not fit, other prefixes and the official positional format are
  errors naming the key.
"""
import os

import numpy as np
import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "demo_dataset")

import train_stage_c_trainer as script_c  # noqa: E402
from ldm import lora  # noqa: E402
from ldm.weights import WeightsError, load_state_dict, save_safetensors  # noqa: E402


def tiny_c():
    from ldm.cascade.presets import tiny_builders

    return tiny_builders()["stage_c"]()


def c_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal([2, 16, 3, 3], dtype=np.float32))
    r = paddle.to_tensor([0.3, 0.8], dtype="float32")
    text, pooled, img = (paddle.to_tensor(rng.standard_normal(s, dtype=np.float32))
                         for s in ([2, 77, 32], [2, 1, 32], [2, 1, 32]))
    return (x, r), dict(clip_text=text, clip_text_pooled=pooled, clip_img=img)


def run_c(net, seed=0):
    a, kw = c_inputs(seed)
    net.eval()
    with paddle.no_grad():
        return net(*a, **kw).numpy()


@pytest.mark.parametrize("targets", lora.TARGETS)
def test_fresh_adapter_is_bit_identical(targets):
    net = tiny_c()
    before = run_c(net)
    names = {k for k, _ in net.named_parameters()}
    paths = lora.add_lora(net, lora.LoRASpec(4, 1.0, targets), seed=0)
    assert paths and all(isinstance(m, (lora.LoRALinear, lora.LoRAConv2D)) for m in lora.lora_modules(net).values())
    assert np.array_equal(run_c(net), before)
    # the base names are unchanged; only lora_down / lora_up are new
    after = {k for k, _ in net.named_parameters()}
    assert names <= after and all(".lora_" in k for k in after - names)
    if targets == "attention":
        assert all(p.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj") for p in paths)


def lora_argv(out, *extra):
    return ["--do_train", "--dataset_path", DEMO, "--output_dir", str(out), "--model_version", "tiny",
            "--resolution", "64", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
            "--logging_steps", "1", "--seed", "3", "--report_to", "none", "--disable_tqdm", "True",
            "--image_logging_steps", "0", "--lora_rank", "4", "--lora_alpha", "2", "--lora_targets", "linear",
            "--multi_aspect_ratio", "1", *extra]  # square crops: numbers as before buckets


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A straight 4-step Stage C LoRA run and one stopped at 2 and resumed to 4."""
    from paddlenlp.trainer import TrainerCallback

    from ldm.train import trainer as trainer_mod

    tmp = tmp_path_factory.mktemp("lora_runs")
    common = ["--max_steps", "4", "--save_steps", "2", "--use_ema", "True", "--ema_decay", "0.5"]
    straight = tmp / "straight"
    trainer = script_c.main(lora_argv(straight, *common))

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    orig_init = trainer_mod.DiffusionTrainer.__init__
    trainer_mod.DiffusionTrainer.__init__ = lambda self, *a, callbacks=None, **kw: orig_init(
        self, *a, callbacks=list(callbacks) + [StopAt2()], **kw)
    try:
        script_c.main(lora_argv(tmp / "resumed", *common))
    finally:
        trainer_mod.DiffusionTrainer.__init__ = orig_init
    resumed = script_c.main(lora_argv(tmp / "resumed", *common))
    return tmp, trainer, resumed


def test_lora_run_trains_only_adapters_and_resumes_exactly(lora_runs):
    tmp, trainer, resumed = lora_runs
    straight = tmp / "straight"
    assert resumed.state.global_step == 4
    files = set(os.listdir(straight))
    assert {"stage_c_trainable.safetensors", "stage_c_trainable_ema.safetensors", "stage_c_lora.safetensors",
            "stage_c_lora_ema.safetensors"} <= files and "stage_c.safetensors" not in files
    trainable = load_state_dict(str(straight / "stage_c_trainable.safetensors"))
    assert trainable and all(".lora_" in k for k in trainable)
    # base weights bit-identical to the preset, the adapters moved
    base = dict(tiny_c().named_parameters())
    net = trainer.model.stage_c
    for k, p in net.named_parameters():
        if ".lora_" in k:
            continue
        assert np.array_equal(p.numpy(), base[k].numpy()), k
    downs = [v for k, v in trainable.items() if k.endswith(".lora_down") and ".attention." in k]
    assert downs and all(float(np.abs(d).max()) > 0 for d in downs)  # (a Linear fed zeros, e.g. the image
    # embedding mapper without image embeddings, gets no gradient)
    # resume == straight, bit for bit
    for name in ("stage_c_trainable.safetensors", "stage_c_trainable_ema.safetensors", "stage_c_lora.safetensors",
                 "stage_c_lora_ema.safetensors"):
        a, b = load_state_dict(str(straight / name)), load_state_dict(str(tmp / "resumed" / name))
        assert sorted(a) == sorted(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), (name, k)
    # the optimiser state holds only the adapters (4 x 2 moments per adapter tensor at most)
    opt = load_state_dict(str(straight / "checkpoint-4" / "optimizer.safetensors"))
    n_params = sum(int(np.prod(v.shape)) for v in trainable.values())
    assert sum(int(np.prod(v.shape)) for v in opt.values()) <= 3 * n_params + 64


def test_apply_and_merge_equal_the_adapters(lora_runs, tmp_path):
    from ldm.cascade.convert import convert_unet_weights, export_unet_weights
    from ldm.cascade.loading import load_stage_c, save_network

    tmp, trainer, _ = lora_runs
    file = str(tmp / "straight" / "stage_c_lora.safetensors")
    want = run_c(trainer.model.stage_c, seed=1)  # the trained adapters, unmerged
    applied = tiny_c()
    changed = lora.apply_lora(applied, file, "c", 1.0)
    assert len(changed) == len(lora.lora_modules(trainer.model.stage_c))
    np.testing.assert_allclose(run_c(applied, seed=1), want, atol=1e-5, rtol=0)
    assert float(np.abs(run_c(tiny_c(), seed=1) - want).max()) > 1e-4  # the LoRA matters
    # merge into our layout and into the original layout (fused in_proj), with a scale
    base = tiny_c()
    ours, orig = str(tmp_path / "base.safetensors"), str(tmp_path / "base_orig.safetensors")
    save_network(base, ours)
    export_unet_weights(base, "c", "original", orig)
    from scripts.merge_lora import main as merge

    merge(["--base", ours, "--lora", file + ":0.5", "--lora", file + ":0.5", "--output", str(tmp_path / "m.safetensors")])
    merged = load_stage_c(str(tmp_path / "m.safetensors"), "tiny")
    np.testing.assert_allclose(run_c(merged, seed=1), want, atol=1e-5, rtol=0)
    summary = merge(["--base", orig, "--lora", file, "--output", str(tmp_path / "mo.safetensors")])
    assert summary["layout"] == "original"
    assert any(k.endswith("in_proj_weight") for k in load_state_dict(str(tmp_path / "mo.safetensors")))
    convert_unet_weights(str(tmp_path / "mo.safetensors"), str(tmp_path / "mo_paddle.safetensors"), stage="c", preset="tiny")
    np.testing.assert_allclose(run_c(load_stage_c(str(tmp_path / "mo_paddle.safetensors"), "tiny"), seed=1), want,
                               atol=1e-5, rtol=0)
    diff = str(tmp_path / "base_diffusers.safetensors")  # diffusers names (to_q / to_out.0), torch [out, in]
    export_unet_weights(base, "c", "diffusers", diff)
    assert merge(["--base", diff, "--lora", file, "--output", str(tmp_path / "md.safetensors")])["layout"] == "diffusers"
    convert_unet_weights(str(tmp_path / "md.safetensors"), str(tmp_path / "md_paddle.safetensors"), stage="c", preset="tiny")
    np.testing.assert_allclose(run_c(load_stage_c(str(tmp_path / "md_paddle.safetensors"), "tiny"), seed=1), want,
                               atol=1e-5, rtol=0)
    # bfloat16 output keeps the names; unchanged tensors are the base's, rounded
    merge(["--base", ours, "--lora", file, "--output", str(tmp_path / "mb.safetensors"), "--dtype", "bfloat16"])
    from ldm.weights import WeightSource

    with WeightSource(str(tmp_path / "mb.safetensors")) as src:
        assert {src.dtype(k) for k in src.keys()} == {"BF16"} and sorted(src.keys()) == sorted(load_state_dict(ours))
    # inference.py --lora FILE:SCALE builds the same Stage C
    import inference

    args = inference.parse_args(["--preset", "tiny", "--lora", file + ":1.0"])
    comps = inference.run_components(inference.C.CASCADE, args)
    np.testing.assert_allclose(run_c(comps.get("stage_c"), seed=1), want, atol=1e-5, rtol=0)


def _comfy_file(tmp_path, rng, rank=3, alpha=1.5):
    """A kohya/OneTrainer-style file written from the ORIGINAL-layout names of a tiny Stage C, mapped as
    ComfyUI does: in_proj_weight -> attention.attn.to_q/to_k/to_v, other weights by their module path."""
    from ldm.cascade.convert import export_unet_weights

    base = tiny_c()
    orig = str(tmp_path / "orig.safetensors")
    export_unet_weights(base, "c", "original", orig)
    shapes = {k: v.shape for k, v in load_state_dict(orig).items()}
    attn = sorted(k for k in shapes if k.endswith(".attention.attn.in_proj_weight"))[0]
    lin = sorted(k for k in shapes if k.endswith(".channelwise.0.weight"))[0]
    conv = "embedding.1.weight"
    assert len(shapes[conv]) == 4
    pre = attn[:-len(".in_proj_weight")]
    c = shapes[attn][1]
    targets = {  # community module -> (our parameter, torch [out, in(, kh, kw)])
        f"{pre}.to_k".replace(".", "_"): (pre.replace(".attention.attn", ".attention.attn.k_proj") + ".weight", (c, c)),
        f"{pre}.out_proj".replace(".", "_"): (pre + ".out_proj.weight", shapes[pre + ".out_proj.weight"]),
        lin[:-len(".weight")].replace(".", "_"): (lin, shapes[lin]),
        conv[:-len(".weight")].replace(".", "_"): (conv, shapes[conv]),
    }
    state, expected = {}, {}
    for name, (ours, tshape) in targets.items():
        down = rng.standard_normal((rank,) + tuple(tshape[1:]), dtype=np.float32)
        up = rng.standard_normal((tshape[0], rank) + (1,) * (len(tshape) - 2), dtype=np.float32)
        key = "lora_prior_unet_" + name
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = np.asarray(alpha, np.float32)
        d = (up.reshape(tshape[0], rank) @ down.reshape(rank, -1)).reshape(tshape) * (alpha / rank)
        expected[ours] = d.T if len(tshape) == 2 else d  # paddle Linear [in, out]
    path = str(tmp_path / "comfy.safetensors")
    save_safetensors(state, path, metadata={"format": "pt"})
    return path, expected, state


def test_community_file_changes_exactly_the_targeted_modules(tmp_path):
    path, expected, _ = _comfy_file(tmp_path, np.random.default_rng(5))
    base = {k: v.numpy() for k, v in tiny_c().named_parameters()}
    net = tiny_c()
    lora.apply_lora(net, path, "c", strength=0.7)
    got = {k: v.numpy() for k, v in net.named_parameters()}
    for k in base:
        if k in expected:
            np.testing.assert_allclose(got[k] - base[k], 0.7 * expected[k], atol=1e-5, rtol=1e-5)
        else:
            assert np.array_equal(got[k], base[k]), k
    assert ".attention.attn.k_proj.weight" in " ".join(expected)
    # the same file with the lora_unet_ prefix (ComfyUI accepts both for Stage C); not for Stage B
    state = load_state_dict(path)
    alt = str(tmp_path / "alt.safetensors")
    save_safetensors({k.replace("lora_prior_unet_", "lora_unet_"): v for k, v in state.items()}, alt)
    net2 = tiny_c()
    lora.apply_lora(net2, alt, "c", strength=0.7)
    assert all(np.array_equal(got[k], v.numpy()) for k, v in net2.named_parameters())
    with pytest.raises(WeightsError, match="lora_prior_unet_"):
        lora.apply_lora(tiny_c(), path, "b")


def test_errors_name_the_key(tmp_path):
    path, _, state = _comfy_file(tmp_path, np.random.default_rng(6))
    key = next(k for k in state if k.endswith("lora_down.weight"))
    cases = {
        "unknown": ({**state, "lora_prior_unet_down_blocks_9_0_nothing.lora_down.weight": np.zeros((3, 4), np.float32),
                     "lora_prior_unet_down_blocks_9_0_nothing.lora_up.weight": np.zeros((4, 3), np.float32)},
                    "down_blocks_9_0_nothing.*matches no module"),
        "shape": ({**state, key: np.zeros((3, 7), np.float32)}, key[:-len(".lora_down.weight")] + ".*does not fit"),
        "text encoder": ({**state, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                          np.zeros((3, 4), np.float32)}, "lora_te_text_model_encoder_layers_0_mlp_fc1"),
        "official": ({"0.lora_down": np.zeros((4, 8), np.float32), "0.lora_up": np.zeros((24, 4), np.float32)},
                     "official Stable Cascade LoRA format"),
    }
    base = {k: v.numpy() for k, v in tiny_c().named_parameters()}
    for name, (st, match) in cases.items():
        p = str(tmp_path / f"{name}.safetensors")
        save_safetensors(st, p)
        net = tiny_c()
        with pytest.raises(WeightsError, match=match):
            lora.apply_lora(net, p, "c")
        assert all(np.array_equal(v.numpy(), base[k]) for k, v in net.named_parameters()), name  # nothing applied
    from scripts.merge_lora import main as merge
    from ldm.cascade.loading import save_network

    save_network(tiny_c(), str(tmp_path / "base.safetensors"))
    with pytest.raises(WeightsError, match="matches no module"):
        merge(["--base", str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "unknown.safetensors"),
               "--output", str(tmp_path / "never.safetensors")])
    assert not os.path.exists(tmp_path / "never.safetensors")


def test_parse_lora_arg_and_spec():
    assert lora.parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert lora.parse_lora_arg("a.safetensors:0.6") == ("a.safetensors", 0.6)
    assert lora.parse_lora_arg("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    assert lora.parse_lora_arg("d/a.safetensors:-1e-1") == ("d/a.safetensors", -0.1)
    assert lora.community_name("down_blocks.0.1.attention.attn.q_proj") == "down_blocks_0_1_attention_attn_to_q"
    assert lora.community_name("up_blocks.1.0.attention.attn.out_proj") == "up_blocks_1_0_attention_attn_out_proj"
    with pytest.raises(ValueError, match="targets"):
        lora.LoRASpec(4, 1.0, "convs")
    from ldm.train.stage_c import parse_stage_c_args

    m, _, _ = parse_stage_c_args(["--output_dir", "/tmp/x", "--lora_rank", "4"])
    assert (m.lora_rank, m.lora_alpha, m.lora_targets) == (4, 1.0, "attention")
    with pytest.raises(ValueError, match="lora_targets"):
        parse_stage_c_args(["--output_dir", "/tmp/x", "--lora_rank", "4", "--lora_targets", "x"])



def _bf16_lora_task():
    from ldm.train.lora import enable_lora
    from ldm.train.task import TrainingTask

    class Task(TrainingTask):
        def __init__(self):
            super().__init__()
            self.add_trained("stage_c", tiny_c())

    task = Task()
    enable_lora(task, "stage_c", "c", lora.LoRASpec(4, 1.0, "attention"))
    return task


def _has_bf16_matmul():
    try:
        x = paddle.ones([2, 2], "float32").astype("bfloat16")
        paddle.matmul(x, x)
        return True
    except (RuntimeError, NotImplementedError, ValueError):  # e.g. Paddle CPU: no bfloat16 matmul kernel
        return False


def test_cast_frozen_base_keeps_adapters_float32():
    """--lora_rank with --bf16 on a CUDA build: the frozen base is stored in bfloat16, the adapters
    (master weights) stay float32 (ldm.train.lora.cast_frozen_base, called directly here on CPU)."""
    from ldm.train.lora import cast_frozen_base
    from ldm.train.task import TrainingTask

    with pytest.raises(ValueError, match="no LoRA adapters"):
        cast_frozen_base(TrainingTask(), "bfloat16")
    task = _bf16_lora_task()
    n = cast_frozen_base(task, "bfloat16")
    params = dict(task.stage_c.named_parameters())
    adapters = {k for k in params if ".lora_" in k}
    assert adapters and n == len(params) - len(adapters)
    assert all(params[k].dtype == paddle.float32 and not params[k].stop_gradient for k in adapters)
    assert all(p.dtype == paddle.bfloat16 and p.stop_gradient for k, p in params.items() if k not in adapters)
    assert task.base_dtype == "bfloat16" and set(task.trainable_parameters()) == {"stage_c." + k for k in adapters}


@pytest.mark.skipif(not _has_bf16_matmul(), reason="this Paddle build has no bfloat16 matmul kernel (CPU)")
def test_bf16_base_forward_runs_under_autocast():
    """The adapters' forward over a bfloat16 base under bf16 autocast (the Trainer's --bf16 step)."""
    from ldm.train.lora import cast_frozen_base

    task = _bf16_lora_task()
    cast_frozen_base(task, "bfloat16")
    a, kw = c_inputs()
    with paddle.no_grad(), paddle.amp.auto_cast(dtype="bfloat16", level="O1"):
        out = task.stage_c(*a, **kw)
    assert np.isfinite(out.astype("float32").numpy()).all()
