"""The Stable Cascade networks go through their layers (issue 10 item 1), CPU, tiny sizes.

- every sub-layer of StageC / StageB / StageA / EfficientNetEncoder / Previewer (each Linear,
  Conv2D, LayerNorm, BatchNorm, GRN, Embedding, activation, ...) runs in one forward, in train
  and in eval mode, with the CPU kernels off and on (no layer is bypassed, none is dead);
- attention: paddle's scaled_dot_product_attention vs the matmul fallback (and the CPU kernel),
  alone and inside AttnBlock with and without self-attention, max abs diff <= 1e-5; the fallback
  is chosen when the op raises;
- an adapter-style wrapper installed on every Linear of StageC (as LoRA libraries do) changes the
  output when random and leaves it bit-identical when zero-initialised;
- the CPU kernel switch gives the plain path's outputs and gradients.
"""
import os

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from ldm.cascade import attention as attention_mod
from ldm.cascade import cpu_kernels
from ldm.cascade.common import AttnBlock, GlobalResponseNorm
from ldm.cascade.effnet import EfficientNetEncoder
from ldm.cascade.previewer import Previewer_tiny
from ldm.cascade.stage_a import StageA_tiny
from ldm.cascade.stage_b import StageB_tiny
from ldm.cascade.stage_c import StageC_tiny

ATOL = 1e-5


@pytest.fixture(params=[False, True], ids=["plain", "cpu_kernels"])
def kernels(request):
    old = cpu_kernels.set_fast_cpu_kernels(request.param)
    yield request.param
    cpu_kernels.set_fast_cpu_kernels(old)


def _randomise(net, seed, scale=0.3):
    """Non-zero random values everywhere (the reference init zeroes GRN, mappers and outputs)."""
    rng = np.random.default_rng(seed)
    with paddle.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_variance"):
                p.set_value(rng.uniform(0.5, 1.5, p.shape).astype(np.float32))
            else:
                p.set_value((rng.standard_normal(p.shape) * scale).astype(np.float32))
    for name, b in net.named_buffers():
        if name.endswith("_variance"):
            b.set_value(rng.uniform(0.5, 1.5, b.shape).astype(np.float32))
    return net


def _t(rng, *shape):
    return paddle.to_tensor(rng.standard_normal(shape).astype(np.float32))


def _stage_c_inputs(rng, b=2, size=6):
    return (_t(rng, b, 16, size, size), paddle.to_tensor(rng.random(b).astype(np.float32)), _t(rng, b, 5, 32),
            _t(rng, b, 1, 32), _t(rng, b, 1, 32))


def _stage_c():
    paddle.seed(0)
    return _randomise(StageC_tiny(), 1)


def _stage_b():
    paddle.seed(0)
    return _randomise(StageB_tiny(), 2)


NETWORKS = {
    "stage_c": (_stage_c, lambda net, rng: net(*_stage_c_inputs(rng))),
    "stage_b": (_stage_b, lambda net, rng: net(_t(rng, 2, 4, 8, 8), paddle.to_tensor(rng.random(2).astype(np.float32)),
                                              _t(rng, 2, 16, 3, 3), _t(rng, 2, 1, 32), _t(rng, 2, 3, 4, 4))),
    "stage_a": (lambda: _randomise(StageA_tiny(), 3), lambda net, rng: net(_t(rng, 1, 3, 16, 16), quantize=True)[0]),
    "effnet": (lambda: _randomise(EfficientNetEncoder(), 4, scale=0.05), lambda net, rng: net(_t(rng, 1, 3, 64, 64))),
    "previewer": (lambda: _randomise(Previewer_tiny(), 5), lambda net, rng: net(_t(rng, 1, 16, 3, 3))),
}


def _leaf_layers(net):
    """Every layer that owns a parameter itself, and every LayerNorm (non-affine ones own none)."""
    out = {}
    for name, layer in net.named_sublayers(include_self=True):
        if layer.parameters(include_sublayers=False) or isinstance(layer, nn.LayerNorm):
            out[name] = layer
    return out


def _callable_layers(net):
    """Every sub-layer but the plain containers (LayerList / LayerDict have no forward)."""
    return {name: layer for name, layer in net.named_sublayers() if not isinstance(layer, (nn.LayerList, nn.LayerDict))}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_layer_runs_in_one_forward(name, kernels):
    build, run = NETWORKS[name]
    net = build()
    layers = _callable_layers(net)  # hooks on every one of them: no dead sub-layers either
    kinds = {type(layer) for layer in _leaf_layers(net).values()}
    assert any(issubclass(k, nn.Linear) for k in kinds) or name in ("effnet", "previewer")
    assert any(issubclass(k, nn.Conv2D) for k in kinds)
    assert set(_leaf_layers(net)) - {""} <= set(layers)
    for mode in ("train", "eval"):
        getattr(net, mode)()
        fired = set()
        hooks = [layer.register_forward_post_hook(lambda lyr, i, o, n=n: fired.add(n)) for n, layer in layers.items()]
        try:
            with paddle.no_grad():
                run(net, np.random.default_rng(0))
        finally:
            for h in hooks:
                h.remove()
        missed = sorted(set(layers) - fired)
        assert not missed, f"{name} ({mode}): {len(missed)} of {len(layers)} layers never ran: {missed[:8]}"


def test_hook_sees_stage_c_layer_norms_and_grn():
    net = _stage_c()
    names = _leaf_layers(net)
    assert any(isinstance(v, GlobalResponseNorm) for v in names.values())
    assert sum(isinstance(v, nn.LayerNorm) for v in names.values()) >= 8  # embedding, blocks, scalers, clf, clip_norm
    assert "clip_norm" in names


def test_dropout_is_the_identity_in_eval_only():
    from ldm.cascade.common import Dropout

    x = paddle.ones([4, 256])
    d = Dropout(0.5)
    d.eval()
    assert d(x) is x
    d.train()
    paddle.seed(0)
    y = d(x).numpy()
    assert (y == 0).any() and np.allclose(y[y != 0], 2.0)


# -- attention -------------------------------------------------------------------------------
def _qkv(rng, b=2, lq=12, lk=17, h=3, d=8):
    return _t(rng, b, lq, h, d), _t(rng, b, lk, h, d), _t(rng, b, lk, h, d)


def test_attention_implementations_agree():
    q, k, v = _qkv(np.random.default_rng(0))
    sdpa = attention_mod.sdpa_attention(q, k, v).numpy()
    mm = attention_mod.matmul_attention(q, k, v).numpy()
    per_head = cpu_kernels.attention(q, k, v).numpy()
    # independent numpy reference
    qn, kn, vn = (t.numpy().transpose(0, 2, 1, 3).astype(np.float64) for t in (q, k, v))
    s = qn @ kn.transpose(0, 1, 3, 2) / np.sqrt(qn.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    ref = ((w / w.sum(-1, keepdims=True)) @ vn).transpose(0, 2, 1, 3)
    assert sdpa.shape == mm.shape == per_head.shape == ref.shape
    for out in (sdpa, mm, per_head):
        assert np.abs(out - ref).max() <= ATOL


@pytest.mark.parametrize("impl", ["sdpa", "matmul", "cpu_kernel"])
def test_attention_dropout(impl):
    fn = {"sdpa": attention_mod.sdpa_attention, "matmul": attention_mod.matmul_attention,
          "cpu_kernel": cpu_kernels.attention}[impl]
    q, k, v = _qkv(np.random.default_rng(1))
    plain = fn(q, k, v).numpy()
    assert np.array_equal(fn(q, k, v, dropout_p=0.5, training=False).numpy(), plain)  # eval: no dropout
    paddle.seed(3)
    dropped = fn(q, k, v, dropout_p=0.5, training=True).numpy()
    assert dropped.shape == plain.shape and np.isfinite(dropped).all()
    assert np.abs(dropped - plain).max() > 1e-3


@pytest.fixture
def calls(monkeypatch):
    """Count which implementation `attention()` runs; a fresh record of SDPA failures."""
    seen = {"sdpa": 0, "matmul": 0}
    monkeypatch.setattr(attention_mod, "_sdpa_failed", set())
    for name, attr in (("sdpa", "sdpa_attention"), ("matmul", "matmul_attention")):
        real = getattr(attention_mod, attr)

        def counted(*a, _real=real, _name=name, **kw):
            seen[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(attention_mod, attr, counted)
    old = cpu_kernels.set_fast_cpu_kernels(False)
    yield seen
    cpu_kernels.set_fast_cpu_kernels(old)


def _force_fallback(monkeypatch):
    def unsupported(*a, **kw):
        raise NotImplementedError("scaled_dot_product_attention: not on this build")

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", unsupported)


@pytest.mark.parametrize("self_attn", [True, False], ids=["self_attn", "cond_only"])
def test_attn_block_sdpa_vs_fallback(self_attn, calls, monkeypatch):
    paddle.seed(0)
    block = _randomise(AttnBlock(16, 12, nhead=4, self_attn=self_attn), 6).eval()
    rng = np.random.default_rng(2)
    x, cond = _t(rng, 2, 16, 5, 4), _t(rng, 2, 7, 12)
    with paddle.no_grad():
        via_sdpa = block(x, cond).numpy()
        assert calls == {"sdpa": 1, "matmul": 0}
        _force_fallback(monkeypatch)
        via_fallback = block(x, cond).numpy()  # the op raises: fallback, remembered
        again = block(x, cond).numpy()
    assert calls == {"sdpa": 2, "matmul": 2}  # the second call does not try the op again
    assert np.abs(via_sdpa - via_fallback).max() <= ATOL
    assert np.array_equal(via_fallback, again)
    # self-attention: the image tokens are keys too, so the output depends on the other pixels
    # even with the conditioning fixed; the cond-only block maps each pixel on its own
    bump = np.zeros(x.shape, np.float32)
    bump[:, :, 0, 0] = rng.standard_normal([2, 16])  # not constant over channels (the norm removes that)
    x2 = x + paddle.to_tensor(bump)
    with paddle.no_grad():
        moved = np.abs(block(x2, cond).numpy() - via_fallback)[:, :, 1:, :].max()
    assert (moved > 1e-4) == self_attn


def test_stage_c_sdpa_vs_fallback(calls, monkeypatch):
    net = _stage_c().eval()
    args = _stage_c_inputs(np.random.default_rng(3))
    with paddle.no_grad():
        via_sdpa = net(*args).numpy()
        _force_fallback(monkeypatch)
        via_fallback = net(*args).numpy()
    assert calls["matmul"] > 0
    assert np.abs(via_sdpa - via_fallback).max() <= ATOL


def test_no_device_type_branches():
    root = os.path.dirname(os.path.abspath(attention_mod.__file__))
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                assert "is_cpu_place" not in text and "is_gpu_place" not in text, f


# -- adapters ----------------------------------------------------------------------------------
class LowRankAdapter(nn.Layer):
    """What a LoRA library installs: the original Linear plus a low-rank down/up pair."""

    def __init__(self, base: nn.Linear, rank: int = 2, zero: bool = True):
        super().__init__()
        c_in, c_out = base.weight.shape
        self.base = base
        self.down = nn.Linear(c_in, rank, bias_attr=False)
        self.up = nn.Linear(rank, c_out, bias_attr=False)
        if zero:
            nn.initializer.Constant(0.0)(self.up.weight)
        else:
            nn.initializer.Normal(0.0, 0.5)(self.up.weight)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.base(x) + self.up(self.down(x))


def install_adapters(net: nn.Layer, **kw) -> list:
    """Replace every nn.Linear sub-layer attribute on its parent by an adapter around it."""
    targets = [name for name, layer in net.named_sublayers() if isinstance(layer, nn.Linear)]
    adapters = []
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = net
        for part in parent_name.split(".") if parent_name else ():
            parent = getattr(parent, part)
        adapter = LowRankAdapter(getattr(parent, attr), **kw)
        setattr(parent, attr, adapter)
        assert getattr(parent, attr) is adapter
        adapters.append(adapter)
    return adapters


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_adapters_on_every_stage_c_linear(mode, kernels):
    args = _stage_c_inputs(np.random.default_rng(4))
    net = getattr(_stage_c(), mode)()
    n_linear = sum(isinstance(m, nn.Linear) for m in net.sublayers())
    with paddle.no_grad():
        before = net(*args).numpy()
        paddle.seed(7)
        adapters = install_adapters(net, zero=True)
        assert len(adapters) == n_linear > 20
        getattr(net, mode)()
        zero = net(*args).numpy()
        assert all(a.calls >= 1 for a in adapters)  # (blocks of repeated levels run more than once)
        assert np.array_equal(zero, before)  # zero-initialised adapters: bit-identical
        for a in adapters:
            nn.initializer.Normal(0.0, 0.05)(a.up.weight)
        changed = net(*args).numpy()
    assert np.abs(changed - before).max() > 1e-3


# -- the CPU kernel switch --------------------------------------------------------------------
def _run_with_grads(net, args, fast: bool):
    old = cpu_kernels.set_fast_cpu_kernels(fast)
    try:
        out = net(*args)
        (out * out).mean().backward()
        grads = {n: p.grad.numpy().copy() for n, p in net.named_parameters() if p.grad is not None}
        net.clear_gradients()
        return out.numpy(), grads
    finally:
        cpu_kernels.set_fast_cpu_kernels(old)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cpu_kernels_match_plain_path(mode):
    net = getattr(_stage_c(), mode)()
    args = _stage_c_inputs(np.random.default_rng(5))
    plain, g_plain = _run_with_grads(net, args, False)
    fast, g_fast = _run_with_grads(net, args, True)
    assert np.abs(plain - fast).max() <= ATOL
    assert set(g_plain) == set(g_fast) and len(g_plain) == len(net.parameters())
    for n in g_plain:
        scale = max(1.0, float(np.abs(g_plain[n]).max()))
        assert np.abs(g_plain[n] - g_fast[n]).max() <= 1e-4 * scale, n


def test_cpu_kernel_pieces_match_plain():
    rng = np.random.default_rng(6)
    lin = nn.Linear(8, 5)
    wrapped = cpu_kernels.Linear(8, 5)
    wrapped.weight.set_value(lin.weight)
    wrapped.bias.set_value(lin.bias)
    grn = _randomise(GlobalResponseNorm(6), 7)
    x, h = _t(rng, 2, 3, 4, 8), _t(rng, 2, 3, 4, 6)
    h[:, :, :, 1] = 0.0  # an all-zero channel (the masked sqrt)
    outs = {}
    for fast in (False, True):
        old = cpu_kernels.set_fast_cpu_kernels(fast)
        outs[fast] = (wrapped(x).numpy(), grn(h).numpy())
        cpu_kernels.set_fast_cpu_kernels(old)
    assert np.abs(outs[False][0] - lin(x).numpy()).max() <= ATOL
    for a, b in zip(outs[False], outs[True]):
        assert np.abs(a - b).max() <= ATOL


def test_switch_reads_environment():
    import subprocess
    import sys

    code = "from ldm.cascade import cpu_kernels as k; print(k.fast_cpu_kernels_enabled())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for value, expected in (("1", "True"), ("0", "False")):
        env = dict(os.environ, **{cpu_kernels.ENV_VAR: value})
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == expected
