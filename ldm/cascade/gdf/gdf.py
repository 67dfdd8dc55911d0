"""GDF: composes a schedule, an input scaler, a target, a noise condition and a loss weight.

Follows Stability-AI/StableCascade ``gdf/__init__.py`` (``GDF.diffuse``, ``undiffuse``,
``sample``). Differences from the original, all deliberate:
- every quantity is computed in float32; model outputs are cast to float32 before the update
  (optionally the model is fed ``model_dtype`` inputs), so fp16/bf16 models are safe;
- noise comes from an injected source (``noise``: seed, per-image seeds or ``noise_fn``);
- classifier-free guidance can run cond and uncond as one batched call (``batch_cfg=True``,
  the original's only mode) or as two calls; outside the cfg window the model sees only the
  conditional inputs (the original passed the concatenated ones there);
- ``cfg == 1`` skips the unconditional pass (the guided prediction equals the conditional one);
- ``cfg_rho_per_sample`` optionally rescales with per-image stds instead of the batch std.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import paddle

from .samplers import DDPMSampler, NoiseSpec, _bcast, make_noise_fn
from .schedules import BaseSchedule

CFG_RHO_EPS = 1e-9  # added to the guided std in the cfg_rho rescale, as in the original


class Diffused(NamedTuple):
    """What ``GDF.diffuse`` returns (a tuple, so it unpacks like the original's)."""
    noised: paddle.Tensor      # [B, ...] a * x0 + b * epsilon
    epsilon: paddle.Tensor     # [B, ...] the noise used
    target: paddle.Tensor      # [B, ...] the training target (epsilon for EpsilonTarget)
    logSNR: paddle.Tensor      # [B]
    noise_cond: paddle.Tensor  # [B] the network's r input
    loss_weight: paddle.Tensor  # [B]


def _std(x: paddle.Tensor, axis=None) -> paddle.Tensor:
    """Unbiased standard deviation (torch.std's default); paddle's Tensor.std logs a dtype warning."""
    mean = x.mean(axis=axis, keepdim=axis is not None)
    n = x.numel() if axis is None else x.shape[axis]
    return (((x - mean) ** 2).sum(axis=axis) / (float(n) - 1.0)).sqrt()


def _zeros_like(v):
    if isinstance(v, paddle.Tensor):
        return paddle.zeros_like(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_zeros_like(e) for e in v)
    if isinstance(v, dict):
        return {k: _zeros_like(e) for k, e in v.items()}
    return v


def _concat(c, u, name):
    """[cond; uncond] along the batch for tensors (recursing into lists and dicts)."""
    if isinstance(c, paddle.Tensor):
        if not isinstance(u, paddle.Tensor):
            raise ValueError(f"conditioning '{name}': conditional is a Tensor, unconditional is {type(u).__name__}")
        return paddle.concat([c, u.astype(c.dtype)], axis=0)
    if isinstance(c, (list, tuple)):
        return type(c)(_concat(ci, ui, f"{name}[{i}]") for i, (ci, ui) in enumerate(zip(c, u)))
    if isinstance(c, dict):
        return {k: _concat(c[k], u.get(k, _zeros_like(c[k])), f"{name}.{k}") for k in c}
    return c


class GDF:
    """Generic diffusion framework.

    Args:
        schedule: t -> logSNR (e.g. ``CosineSchedule(clamp_range=[1e-4, 0.9999])``).
        input_scaler: logSNR -> (a, b) (e.g. ``VPScaler()``).
        target: training target and its inverses (e.g. ``EpsilonTarget()``).
        noise_cond: logSNR -> the network's ``r`` (e.g. ``CosineTNoiseCond()``).
        loss_weight: logSNR -> per-sample loss weight (``P2LossWeight()``, ``AdaptiveLossWeight()``).
        offset_noise: scale of an extra per-(sample, channel) constant noise added in ``diffuse``.
    """

    def __init__(self, schedule: BaseSchedule, input_scaler, target, noise_cond, loss_weight, offset_noise: float = 0.0):
        self.schedule = schedule
        self.input_scaler = input_scaler
        self.target = target
        self.noise_cond = noise_cond
        self.loss_weight = loss_weight
        self.offset_noise = float(offset_noise)

    # ------------------------------------------------------------------ training
    def diffuse(self, x0: paddle.Tensor, *, epsilon: Optional[paddle.Tensor] = None, t=None,
                shift: float = 1.0, loss_shift: float = 1.0, offset: Optional[paddle.Tensor] = None) -> Diffused:
        """Noise a clean batch for training.

        x0 [B, C, ...]; epsilon defaults to paddle.randn; t (float, [B] or None = random per
        sample); the schedule is shifted by ``shift`` and the loss weight evaluated at
        logSNR + 2 ln(loss_shift). Returns ``Diffused`` (all float32).
        """
        if x0.ndim < 2:
            raise ValueError(f"diffuse: x0 must be [B, C, ...], got shape {list(x0.shape)}")
        x0 = x0.astype("float32")
        bsz = x0.shape[0]
        if epsilon is None:
            epsilon = paddle.randn(x0.shape, dtype="float32")
        elif list(epsilon.shape) != list(x0.shape):
            raise ValueError(f"diffuse: epsilon shape {list(epsilon.shape)} != x0 shape {list(x0.shape)}")
        epsilon = epsilon.astype("float32")
        if self.offset_noise > 0:
            if offset is None:
                offset = paddle.randn([bsz, x0.shape[1]] + [1] * (x0.ndim - 2), dtype="float32")
            epsilon = epsilon + offset.astype("float32") * self.offset_noise
        if isinstance(t, int) and not isinstance(t, bool):
            t = float(t)  # an int would mean "batch size" to the schedule
        log_snr = self.schedule(bsz if t is None else t, shift=shift)
        if log_snr.shape[0] == 1 and bsz > 1:
            log_snr = log_snr.expand([bsz])
        if log_snr.shape[0] != bsz:
            raise ValueError(f"diffuse: {log_snr.shape[0]} times for a batch of {bsz}")
        a, b = self.input_scaler(log_snr)
        a, b = _bcast(a, x0.ndim), _bcast(b, x0.ndim)
        target = self.target(x0, epsilon, log_snr, a, b)
        return Diffused(x0 * a + epsilon * b, epsilon, target, log_snr, self.noise_cond(log_snr),
                        self.loss_weight(log_snr, shift=loss_shift))

    def undiffuse(self, x: paddle.Tensor, log_snr: paddle.Tensor, pred: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """(x0, epsilon) implied by a prediction ``pred`` of the target at ``log_snr``."""
        a, b = self.input_scaler(log_snr)
        a, b = _bcast(a, x.ndim), _bcast(b, x.ndim)
        return self.target.x0(x, pred, log_snr, a, b), self.target.epsilon(x, pred, log_snr, a, b)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def guide(pred_cond: paddle.Tensor, pred_uncond: paddle.Tensor, cfg: float, cfg_rho: float,
              per_sample: bool = False) -> paddle.Tensor:
        """Classifier-free guidance with std rescaling.

        g = lerp(uncond, cond, cfg) = uncond + cfg * (cond - uncond);
        rho > 0: pred = rho * g * std(cond) / (std(g) + 1e-9) + (1 - rho) * g, with unbiased
        stds over the whole batch tensor (the original) or per image (``per_sample``).
        """
        guided = pred_uncond + cfg * (pred_cond - pred_uncond)
        if cfg_rho > 0:
            if per_sample:
                std_pos = _bcast(_std(pred_cond.reshape([pred_cond.shape[0], -1]), axis=1), guided.ndim)
                std_cfg = _bcast(_std(guided.reshape([guided.shape[0], -1]), axis=1), guided.ndim)
            else:
                std_pos, std_cfg = _std(pred_cond), _std(guided)
            return cfg_rho * (guided * std_pos / (std_cfg + CFG_RHO_EPS)) + guided * (1.0 - cfg_rho)
        return guided

    def sample(self, model: Callable, model_inputs: Dict[str, Any], shape: Optional[Sequence[int]] = None,
               unconditional_inputs: Optional[Dict[str, Any]] = None, *, sampler=None,
               schedule: Optional[BaseSchedule] = None, t_start: float = 1.0, t_end: float = 0.0,
               timesteps: int = 20, x_init: Optional[paddle.Tensor] = None,
               cfg: Union[None, float, Sequence[float]] = 3.0, cfg_t_stop: Optional[float] = None,
               cfg_t_start: Optional[float] = None, cfg_rho: float = 0.7, sampler_params: Optional[dict] = None,
               shift: float = 1.0, noise: NoiseSpec = None, batch_cfg: bool = True,
               cfg_rho_per_sample: bool = False, model_dtype: Optional[str] = None,
               callback: Optional[Callable[[dict], None]] = None
               ) -> Iterator[Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]]:
        """Generator over the reverse process; yields ``(x0, x, pred)`` (float32) after each step.

        model(x, r, **inputs) predicts the target; r = noise_cond(logSNR) of shape [B].
        Times run over linspace(t_start, t_end, timesteps + 1) through ``schedule`` (default
        the GDF's) shifted by ``shift``. cfg None: no guidance; a pair (c1, c0) interpolates
        c1 * t + c0 * (1 - t); guidance applies while cfg_t_stop <= t <= cfg_t_start (each
        bound optional). ``unconditional_inputs`` default to zeros like ``model_inputs``.
        ``noise``: see ``make_noise_fn``; it draws the initial x (unless ``x_init``) and the
        sampler noise. ``callback(info)`` gets a dict with step, t, t_next, logSNR, x0, x, pred.
        The final image is the last yielded x0 (as in the original). ``send({...})`` may
        replace cfg, cfg_rho, sampler, model_inputs, unconditional_inputs or x between steps.
        """
        if int(timesteps) != timesteps or timesteps < 1:
            raise ValueError(f"timesteps must be a positive int, got {timesteps}")
        for name, v in (("t_start", t_start), ("t_end", t_end)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0.0 <= float(cfg_rho) <= 1.0:
            raise ValueError(f"cfg_rho must be in [0, 1], got {cfg_rho}")
        if isinstance(cfg, (list, tuple)) and len(cfg) != 2:
            raise ValueError(f"cfg must be a float or a pair (at t=1, at t=0), got {cfg}")
        if x_init is None and shape is None:
            raise ValueError("sample: give either shape or x_init")
        noise_fn = make_noise_fn(noise)
        sampler = DDPMSampler(self) if sampler is None else sampler
        sampler_params = {} if sampler_params is None else dict(sampler_params)
        schedule = self.schedule if schedule is None else schedule
        model_inputs = dict(model_inputs or {})

        r_range = paddle.linspace(float(t_start), float(t_end), int(timesteps) + 1, dtype="float32")
        t_values = r_range.tolist()
        log_snr_range = schedule(r_range, shift=shift)  # [T + 1]
        x = sampler.init_x(list(shape), noise_fn) if x_init is None else x_init.astype("float32").clone()
        bsz = x.shape[0]
        if unconditional_inputs is None:
            unconditional_inputs = _zeros_like(model_inputs)

        def call(xin, r, inputs):
            if model_dtype is not None:
                xin, r = xin.astype(model_dtype), r.astype(model_dtype)
            return model(xin, r, **inputs).astype("float32")

        for i in range(int(timesteps)):
            t_now = t_values[i]
            log_snr = log_snr_range[i].expand([bsz])
            log_snr_next = log_snr_range[i + 1].expand([bsz])
            r = self.noise_cond(log_snr)
            in_window = (cfg_t_stop is None or t_now >= cfg_t_stop) and (cfg_t_start is None or t_now <= cfg_t_start)
            cfg_val = cfg
            if isinstance(cfg_val, (list, tuple)):
                cfg_val = cfg_val[0] * t_now + cfg_val[1] * (1.0 - t_now)
            if cfg_val is not None and in_window and float(cfg_val) != 1.0:
                if batch_cfg:
                    both = {k: _concat(v, unconditional_inputs.get(k, _zeros_like(v)), k) for k, v in model_inputs.items()}
                    out = call(paddle.concat([x, x], axis=0), paddle.concat([r, r], axis=0), both)
                    pred_c, pred_u = out[:bsz], out[bsz:]
                else:
                    pred_c = call(x, r, model_inputs)
                    pred_u = call(x, r, {k: unconditional_inputs.get(k, _zeros_like(v)) for k, v in model_inputs.items()})
                pred = self.guide(pred_c, pred_u, float(cfg_val), float(cfg_rho), cfg_rho_per_sample)
            else:
                pred = call(x, r, model_inputs)
            x0, epsilon = self.undiffuse(x, log_snr, pred)
            x = sampler(x, x0, epsilon, log_snr, log_snr_next, noise_fn, **sampler_params)
            if callback is not None:
                callback({"step": i, "t": t_now, "t_next": t_values[i + 1], "logSNR": log_snr,
                          "x0": x0, "x": x, "pred": pred})
            altered = yield (x0, x, pred)
            if altered is not None:
                cfg = altered.get("cfg", cfg)
                cfg_rho = altered.get("cfg_rho", cfg_rho)
                sampler = altered.get("sampler", sampler)
                model_inputs = altered.get("model_inputs", model_inputs)
                unconditional_inputs = altered.get("unconditional_inputs", unconditional_inputs)
                x = altered.get("x", x)

    def sample_final(self, *args, **kwargs) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Run ``sample`` to the end and return the last ``(x0, x, pred)``; x0 is the image latent."""
        last = None
        for last in self.sample(*args, **kwargs):
            pass
        return last
