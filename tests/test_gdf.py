"""GDF (ldm/cascade/gdf) against closed forms computed here in numpy (float64), stored values,
and diffusers' DDPMWuerstchenScheduler on the same fake model, timesteps and noise."""
import math

import numpy as np
import paddle
import pytest

from ldm.cascade.gdf import (GDF, AdaptiveLossWeight, CosineSchedule, CosineTNoiseCond, DDIMSampler, P2LossWeight,
                             VPScaler, make_noise_fn, stable_cascade_gdf)

S = 0.008
LO, HI = 1e-4, 0.9999
TS = [0.0, 1e-4, 0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.995, 1.0]


# ---------------------------------------------------------------- closed forms (numpy, float64)
def np_alpha_bar(t):
    t = np.asarray(t, dtype=np.float64)
    v = np.cos((t + S) / (1 + S) * np.pi / 2) ** 2 / np.cos(S / (1 + S) * np.pi / 2) ** 2
    return np.clip(v, LO, HI)


def np_logsnr(t, shift=1.0):
    ab = np_alpha_bar(t)
    lim = math.log(LO / (1 - LO)), math.log(HI / (1 - HI))
    return np.clip(np.log(ab / (1 - ab)) + 2 * math.log(1 / shift), *lim)


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_cosine_t(logsnr):
    min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2
    var = np.clip(np_sigmoid(logsnr), 0, 1)
    return np.clip(np.arccos(np.sqrt(var * min_var)) / (np.pi / 2) * (1 + S) - S, 0, 1)


def np_ddim_step(x, eps, ab, ab_prev, z, eta=1.0):
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
    return x0, np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * z


def sc(x):
    """A one-element Tensor -> float."""
    return float(x.numpy().reshape(-1)[0])


def pt(a):
    return paddle.to_tensor(np.asarray(a, dtype=np.float32))


# ---------------------------------------------------------------- formulas
@pytest.mark.parametrize("shift", [1.0, 2.0, 0.5])
def test_cosine_schedule_closed_form(shift):
    sched = CosineSchedule(clamp_range=[LO, HI])
    got = sched(pt(TS), shift=shift).numpy().astype(np.float64)
    want = np_logsnr(TS, shift)
    # float32 rounding of 1 - 0.9999 moves logSNR by up to ~2e-4 at the clamp; alpha_bar is exact
    np.testing.assert_allclose(got, want, atol=3e-4, rtol=0)
    np.testing.assert_allclose(np_sigmoid(got), np_sigmoid(want), atol=2e-7, rtol=0)
    if shift != 1.0:  # away from the clamps the shift is exactly 2 ln(1/shift)
        base = sched(pt([0.3, 0.5, 0.7])).numpy()
        np.testing.assert_allclose(sched(pt([0.3, 0.5, 0.7]), shift=shift).numpy() - base,
                                   [2 * math.log(1 / shift)] * 3, atol=2e-6)


def test_cosine_schedule_limits_and_random_t_stored():
    sched = CosineSchedule(clamp_range=[LO, HI])
    # stored float32 values of [logSNR(1), logSNR(0)] (closed form: -/+ ln(0.9999 / 1e-4) = 9.21024)
    np.testing.assert_allclose(sched.limits, [-9.210240364074707, 9.210074424743652], atol=1e-6)
    # shifted values stay inside the unshifted limits (the original clamps after the shift)
    assert sc(sched(pt([1.0]), shift=2.0)) == pytest.approx(sched.limits[0], abs=1e-6)
    assert sc(sched(pt([0.0]), shift=0.5)) == pytest.approx(sched.limits[1], abs=1e-6)
    paddle.seed(0)
    ls = sched(4096)  # batch size -> random t in [0.001, 1]
    assert ls.shape == [4096]
    t = np_cosine_t(ls.numpy().astype(np.float64))
    assert t.min() >= 0.001 - 1e-4 and t.max() <= 1.0
    with pytest.raises(ValueError):
        CosineSchedule(clamp_range=[0.5, 0.1])


def test_vp_scaler_and_noise_cond_closed_form():
    ls = np.array([-12.0, -9.21, -3.0, -0.5, 0.0, 0.7, 4.0, 9.21, 12.0])
    a, b = VPScaler()(pt(ls))
    np.testing.assert_allclose(a.numpy(), np.sqrt(np_sigmoid(ls)), atol=1e-6)
    np.testing.assert_allclose(b.numpy(), np.sqrt(np_sigmoid(-ls)), atol=1e-6)
    r = CosineTNoiseCond()(pt(ls)).numpy()
    # acos near 1 is ill-conditioned: float32 gives ~2e-6 at logSNR beyond the clamp
    np.testing.assert_allclose(r, np_cosine_t(ls), atol=5e-6)
    assert r.min() >= 0.0 and r.max() <= 1.0
    # r inverts the schedule away from the clamps; at t=1 the clamp gives the stored 0.9935832
    sched = CosineSchedule()
    mid = [0.05, 0.3, 0.5, 0.8, 0.95]
    np.testing.assert_allclose(CosineTNoiseCond()(sched(pt(mid))).numpy(), mid, atol=5e-6)
    assert sc(CosineTNoiseCond()(sched(pt([1.0])))) == pytest.approx(0.9935832, abs=2e-6)
    # the noise cond's own shift undoes a schedule shift: logSNR + 2 ln(shift)
    np.testing.assert_allclose(CosineTNoiseCond(shift=2.0)(sched(pt(mid), shift=2.0)).numpy(), mid, atol=5e-6)


def test_p2_loss_weight_closed_form():
    ls = np.array([-9.21, -2.0, 0.0, 1.5, 9.21])
    np.testing.assert_allclose(P2LossWeight()(pt(ls)).numpy(), 1 / (1 + np.exp(ls)), rtol=1e-5)
    np.testing.assert_allclose(P2LossWeight()(pt(ls), shift=2.0).numpy(),
                               1 / (1 + np.exp(ls + 2 * math.log(2.0))), rtol=1e-5)
    np.testing.assert_allclose(P2LossWeight(k=2.0, gamma=0.5, s=0.5)(pt(ls)).numpy(),
                               (2 + np.exp(0.5 * ls)) ** -0.5, rtol=1e-5)


def test_adaptive_loss_weight_buckets():
    lw = AdaptiveLossWeight()
    edges = np.linspace(-10, 10, 299)
    np.testing.assert_allclose(lw.bucket_ranges, edges, atol=1e-5)
    assert lw.bucket_losses.shape == (300,) and np.all(lw.bucket_losses == 1)
    ls = np.array([-20.0, -10.0, -9.99, 0.0, 0.01, 3.3, 10.0, 10.5, 3.3], dtype=np.float32)
    loss = np.array([0.5, 2.0, 4.0, 0.25, 0.1, 8.0, 0.01, 3.0, 0.9], dtype=np.float32)
    # the bucket of v is the number of edges strictly below v (left searchsorted), 0..299
    idx = np.array([int(np.sum(edges.astype(np.float32) < v)) for v in ls])
    assert idx.tolist() == [0, 0, 1, 149, 150, 199, 298, 299, 199]
    np.testing.assert_array_equal(lw.bucket_index(pt(ls)), idx)
    lw.update_buckets(pt(ls), pt(loss), beta=0.9)
    want = np.ones(300)
    for i, l in zip(idx, loss):  # each update reads the old value; the last duplicate wins
        want[i] = 1 * 0.9 + l * 0.1
    np.testing.assert_allclose(lw.bucket_losses, want, rtol=1e-6)
    assert np.sum(lw.bucket_losses != 1) == 7  # 9 samples, buckets 0 and 199 hit twice
    lw.update_buckets(pt([0.0]), pt([0.25]))  # default beta 0.99
    want[149] = want[149] * 0.99 + 0.25 * 0.01
    np.testing.assert_allclose(lw.bucket_losses[149], want[149], rtol=1e-6)
    w = lw(pt(ls)).numpy()
    np.testing.assert_allclose(w, np.clip(1 / want[idx], 1e-7, 1e7), rtol=1e-6)
    lw2 = AdaptiveLossWeight()
    lw2.set_state_dict(lw.state_dict())
    np.testing.assert_array_equal(lw2.bucket_losses, lw.bucket_losses)
    with pytest.raises(ValueError):
        lw.update_buckets(pt([0.0, 1.0]), pt([1.0]))


@pytest.mark.parametrize("shift,loss_shift", [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0)])
def test_diffuse_closed_form(shift, loss_shift):
    gdf = stable_cascade_gdf()
    rng = np.random.default_rng(0)
    t = np.array([1.0, 0.7, 0.5, 0.2, 0.0])
    x0 = rng.standard_normal((5, 3, 2, 2))
    eps = rng.standard_normal((5, 3, 2, 2))
    noised, e, target, ls, r, w = gdf.diffuse(pt(x0), epsilon=pt(eps), t=pt(t), shift=shift, loss_shift=loss_shift)
    want_ls = np_logsnr(t, shift)
    ab = np_sigmoid(want_ls)[:, None, None, None]
    np.testing.assert_allclose(ls.numpy(), want_ls, atol=3e-4)
    np.testing.assert_allclose(noised.numpy(), np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=1e-5)
    np.testing.assert_array_equal(target.numpy(), eps.astype(np.float32))
    np.testing.assert_array_equal(e.numpy(), eps.astype(np.float32))
    np.testing.assert_allclose(r.numpy(), np_cosine_t(want_ls), atol=3e-6)
    np.testing.assert_allclose(w.numpy(), 1 / (1 + np.exp(want_ls + 2 * math.log(loss_shift))), rtol=2e-4)
    if shift == 1.0:  # interior times come back as r
        np.testing.assert_allclose(r.numpy()[1:4], t[1:4], atol=5e-6)
    # stored values (shift 1, t = 0.5): logSNR, r, P2 weight
    d = gdf.diffuse(pt(x0[:1]), epsilon=pt(eps[:1]), t=0.5)
    np.testing.assert_allclose([sc(d.logSNR), sc(d.noise_cond), sc(d.loss_weight)],
                               [-0.02462679, 0.5, 0.50615638], atol=2e-6)


def test_diffuse_random_t_and_validation():
    gdf = stable_cascade_gdf()
    paddle.seed(3)
    out = gdf.diffuse(paddle.ones([3, 2, 4, 4]))
    assert [list(v.shape) for v in out] == [[3, 2, 4, 4]] * 3 + [[3]] * 3
    assert all(v.dtype == paddle.float32 for v in out)
    with pytest.raises(ValueError):
        gdf.diffuse(paddle.ones([3, 2, 4, 4]), epsilon=paddle.ones([3, 2, 4, 5]))
    with pytest.raises(ValueError):
        gdf.diffuse(paddle.ones([3, 2, 4, 4]), t=[0.1, 0.2])


# ---------------------------------------------------------------- sampling
class Noise:
    """A noise_fn that hands out pre-drawn arrays and records the shapes asked for."""

    def __init__(self, arrays):
        self.arrays, self.shapes = list(arrays), []

    def __call__(self, shape):
        self.shapes.append(list(shape))
        return pt(self.arrays.pop(0))


def test_one_ddpm_step_closed_form():
    gdf = stable_cascade_gdf()
    rng = np.random.default_rng(1)
    x, z = rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((2, 2, 3, 3))
    model = lambda x, r, c: paddle.tanh(x) * 0.5 + c * r.reshape([-1, 1, 1, 1])
    c = rng.standard_normal((2, 2, 3, 3))
    noise = Noise([z])
    x0, x_new, pred = next(gdf.sample(model, {"c": pt(c)}, x_init=pt(x), timesteps=1, t_start=0.6, t_end=0.3,
                                      cfg=None, noise=noise))
    assert noise.shapes == [[2, 2, 3, 3]]  # one draw: the step (x_init given)
    ab, ab_prev = np_alpha_bar(0.6), np_alpha_bar(0.3)
    eps = np.tanh(x) * 0.5 + c * 0.6
    want_x0, want_x = np_ddim_step(x, eps, ab, ab_prev, z)
    np.testing.assert_allclose(pred.numpy(), eps, atol=2e-6)
    np.testing.assert_allclose(x0.numpy(), want_x0, atol=1e-5)
    np.testing.assert_allclose(x_new.numpy(), want_x, atol=1e-5)
    # eta = 0 (DDIM) draws nothing and is deterministic
    _, x_ddim, _ = next(gdf.sample(model, {"c": pt(c)}, x_init=pt(x), timesteps=1, t_start=0.6, t_end=0.3,
                                   cfg=None, noise=Noise([]), sampler=DDIMSampler(gdf)))
    np.testing.assert_allclose(x_ddim.numpy(), np_ddim_step(x, eps, ab, ab_prev, z, eta=0.0)[1], atol=1e-5)


@pytest.mark.parametrize("rho,per_sample", [(0.0, False), (0.7, False), (0.7, True)])
def test_cfg_and_cfg_rho_formula(rho, per_sample):
    rng = np.random.default_rng(2)
    pc, pu = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    got = GDF.guide(pt(pc), pt(pu), 4.0, rho, per_sample).numpy()
    g = pu + 4.0 * (pc - pu)
    if rho > 0:
        ax = (1, 2, 3) if per_sample else None
        ratio = np.std(pc, axis=ax, ddof=1, keepdims=per_sample) / (np.std(g, axis=ax, ddof=1, keepdims=per_sample) + 1e-9)
        g = rho * g * ratio + (1 - rho) * g
    np.testing.assert_allclose(got, g, rtol=1e-5, atol=1e-5)


def test_sample_cfg_batched_equals_two_calls_and_uncond_default_zeros():
    gdf = stable_cascade_gdf()
    calls = []

    def model(x, r, clip, pooled):
        calls.append(x.shape[0])
        return paddle.tanh(x) + clip * r.reshape([-1, 1, 1, 1]) + pooled.mean(axis=1).reshape([-1, 1, 1, 1])

    rng = np.random.default_rng(3)
    cond = {"clip": pt(rng.standard_normal((2, 2, 3, 3))), "pooled": pt(rng.standard_normal((2, 5)))}
    runs = {}
    for batch_cfg in (True, False):
        infos = []
        *_, last = gdf.sample(model, cond, [2, 2, 3, 3], timesteps=3, cfg=3.0, cfg_rho=0.7, shift=2.0,
                              noise=[11, 12], batch_cfg=batch_cfg, callback=infos.append)
        runs[batch_cfg] = last
        assert [i["step"] for i in infos] == [0, 1, 2]
    assert calls == [4, 4, 4] + [2] * 6
    for a, b in zip(runs[True], runs[False]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    # explicit zero unconditional inputs give the same result as the default
    zeros = {k: paddle.zeros_like(v) for k, v in cond.items()}
    last = gdf.sample_final(model, cond, [2, 2, 3, 3], zeros, timesteps=3, cfg=3.0, cfg_rho=0.7, shift=2.0, noise=[11, 12])
    np.testing.assert_allclose(last[0].numpy(), runs[True][0].numpy(), atol=1e-6)


def test_per_image_seeds_and_fp16_model():
    gdf = stable_cascade_gdf()
    dtypes = []

    def model(x, r, c):
        dtypes.append(x.dtype)
        return (paddle.tanh(x.astype("float32")) * 0.3 + c).astype("float16")

    c = pt(np.linspace(-1, 1, 2 * 2 * 2 * 2).reshape(2, 2, 2, 2))
    both = gdf.sample_final(model, {"c": c}, [2, 2, 2, 2], timesteps=4, cfg=2.0, cfg_rho=0.7,
                            cfg_rho_per_sample=True, noise=[5, 6], model_dtype="float16")
    one = gdf.sample_final(model, {"c": c[1:]}, [1, 2, 2, 2], timesteps=4, cfg=2.0, cfg_rho=0.7,
                           cfg_rho_per_sample=True, noise=[6], model_dtype="float16")
    assert set(dtypes) == {paddle.float16}
    assert all(v.dtype == paddle.float32 for v in both)
    np.testing.assert_allclose(both[0].numpy()[1:], one[0].numpy(), atol=1e-6)
    with pytest.raises(ValueError):
        make_noise_fn([1, 2])([3, 2])


def test_sample_stored_values():
    """A seeded 4-step run (numpy PCG64 stream, fixed fake model): regression guard."""
    gdf = stable_cascade_gdf()
    model = lambda x, r, c: paddle.tanh(x) * 0.5 + c * r.reshape([-1, 1, 1, 1])
    c = pt(np.array([0.5, -0.25, 1.0, 0.0]).reshape(1, 4, 1, 1))
    x0, x, pred = gdf.sample_final(model, {"c": c}, [1, 4, 1, 1], timesteps=4, cfg=4.0, cfg_rho=0.7,
                                   shift=2.0, noise=1234)
    # values are large because the fake model is no denoiser (x0 = (x - b eps) / a with a ~ 0.01 at t=1)
    np.testing.assert_allclose(x0.numpy().ravel(), [-276.73715, 293.96786, -90.069244, -86.042175], rtol=2e-5)
    np.testing.assert_allclose(x.numpy().ravel(), [-276.71878, 293.87079, -89.990524, -86.035332], rtol=2e-5)


def test_ideal_denoiser_recovers_x0_at_every_step():
    """A model that knows x0 = c and reads its noise level from r alone (a^2 = alpha_bar(r))
    must give x0 == c at every step: checks that r, the scalers and the shift agree."""
    gdf = stable_cascade_gdf()
    min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2

    def model(x, r, c):
        ab = (paddle.cos((r + S) / (1 + S) * math.pi / 2) ** 2 / min_var).reshape([-1, 1, 1, 1])
        return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    c = pt(np.random.default_rng(4).standard_normal((2, 3, 2, 2)))
    for shift in (1.0, 2.0):
        for x0, _, _ in gdf.sample(model, {"c": c}, [2, 3, 2, 2], timesteps=6, cfg=None, shift=shift, noise=9):
            np.testing.assert_allclose(x0.numpy(), c.numpy(), atol=1e-4)


def test_sample_validation():
    gdf = stable_cascade_gdf()
    m = lambda x, r: x
    for kw in ({"timesteps": 0}, {"cfg_rho": 1.5}, {"t_start": 1.5}, {"noise": "seed"}, {"cfg": [1, 2, 3]}):
        with pytest.raises(ValueError):
            next(gdf.sample(m, {}, [1, 1, 2, 2], **kw))
    with pytest.raises(ValueError):
        next(gdf.sample(m, {}))


# ---------------------------------------------------------------- diffusers DDPMWuerstchenScheduler
R_MAX = 0.99  # the fake model reads min(r, 0.99): at t = 1 the two sides pass different r


def _fake_models():
    """The same near-ideal epsilon model in paddle and torch: the noise that would turn
    x0* = 0.5 * clip into x at alpha_bar(min(r, 0.99)), plus 0.1 tanh(x)."""
    import torch
    min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2

    def pd_model(x, r, clip):
        ab = (paddle.cos((r.clip(max=R_MAX) + S) / (1 + S) * math.pi / 2) ** 2 / min_var).reshape([-1, 1, 1, 1])
        return (x - ab.sqrt() * 0.5 * clip) / (1 - ab).sqrt() + 0.1 * paddle.tanh(x)

    def th_model(x, r, clip):
        ab = (torch.cos((r.clamp(max=R_MAX) + S) / (1 + S) * math.pi / 2) ** 2 / min_var).reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * 0.5 * clip) / (1 - ab).sqrt() + 0.1 * torch.tanh(x)

    return pd_model, th_model


@pytest.mark.parametrize("t_start", [1.0, 0.9])
def test_sampling_matches_diffusers_ddpm_wuerstchen(t_start):
    """GDF(shift=1, cfg_rho=0, DDPM sampler) vs diffusers' DDPMWuerstchenScheduler driven the way
    diffusers' Stable Cascade pipelines drive it (r = t, cfg = lerp(uncond, cond, w)), with the
    same fake model, the same t grid and the same noise (one torch generator per side, same seed).

    The two updates are algebraically identical: diffusers' DDPM posterior
    mu = (x - (1 - alpha) eps / sqrt(1 - abar)) / sqrt(alpha), std^2 = (1 - alpha)(1 - abar')/(1 - abar)
    (alpha = abar / abar') equals GDF's DDIM eta=1 step, and both clamp abar to [1e-4, 0.9999].
    Known differences: (1) at t = 1 the network input r differs (diffusers passes r = 1, GDF
    passes CosineTNoiseCond(logSNR(1)) = 0.99358 because of the clamp; elsewhere they agree to
    ~5e-6), so the fake model reads min(r, 0.99); (2) on the last step (to t = 0) diffusers adds
    no noise while GDF adds sigma * z (sigma ~ 5e-3..1e-2 since abar(0) is clamped to 0.9999);
    GDF's result is the last x0, which carries no such noise.
    """
    import torch
    from diffusers.schedulers.scheduling_ddpm_wuerstchen import DDPMWuerstchenScheduler

    steps, cfg, seed = 8, 3.0, 20
    rng = np.random.default_rng(5)
    x_init = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    clip = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    pd_model, th_model = _fake_models()
    t_grid = paddle.linspace(t_start, 0.0, steps + 1, dtype="float32").numpy()

    # diffusers
    sched = DDPMWuerstchenScheduler()
    sched.set_timesteps(timesteps=torch.from_numpy(t_grid))
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(x_init)
    th_clip = torch.cat([torch.from_numpy(clip), torch.zeros(2, 3, 4, 4)])
    ref = []
    for t in sched.timesteps[:-1]:
        r = t.expand(2)
        cond, uncond = th_model(torch.cat([x, x]), torch.cat([r, r]), th_clip).chunk(2)
        x = sched.step(torch.lerp(uncond, cond, cfg), r, x, generator=gen).prev_sample
        ref.append(x.numpy())

    # GDF with the same noise stream
    gen2, drawn = torch.Generator().manual_seed(seed), []

    def noise_fn(shape):
        drawn.append(torch.randn(shape, generator=gen2).numpy())
        return pt(drawn[-1])

    gdf = stable_cascade_gdf()
    run = list(gdf.sample(pd_model, {"clip": pt(clip)}, x_init=pt(x_init), timesteps=steps, t_start=t_start,
                          t_end=0.0, cfg=cfg, cfg_rho=0.0, shift=1.0, noise=noise_fn))
    out = [x.numpy() for _, x, _ in run]
    assert len(out) == len(ref) == steps and len(drawn) == steps
    assert 0.5 < np.abs(ref[-1]).max() < 10  # a bounded trajectory: 1e-4 is a meaningful bound
    for i in range(steps - 1):
        np.testing.assert_allclose(out[i], ref[i], atol=1e-4, rtol=0, err_msg=f"step {i}")
    ab, ab_prev = np_alpha_bar(t_grid[-2]), np_alpha_bar(0.0)
    sigma = np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
    assert 1e-3 < sigma < 2e-2
    np.testing.assert_allclose(out[-1] - sigma * drawn[-1], ref[-1], atol=1e-4, rtol=0)
    assert np.abs(out[-1] - ref[-1]).max() > 1e-3  # the last-step noise is a real difference
    print("max |gdf - diffusers| over steps 0..N-2:", max(np.abs(o - r).max() for o, r in zip(out[:-1], ref[:-1])))
