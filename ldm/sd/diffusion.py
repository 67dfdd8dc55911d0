"""DDPM training pieces of Stable Diffusion v1: schedule, noising, targets, Min-SNR weights.

Facts followed (formulas only): diffusers `DDPMScheduler` ("scaled_linear" betas, `add_noise`,
`get_velocity`), diffusers `training_utils.compute_snr`, and the Min-SNR paper
(Hang et al. 2023, arXiv:2303.09556): weight = min(SNR, gamma) / SNR for an epsilon target and
min(SNR, gamma) / (SNR + 1) for a v target, computed PER SAMPLE. (PaddleMIX's version reduces
the batch with `.min(axis=1)[0]` and so applies the first sample's weight to the whole batch;
not reproduced.)

The random tensors (noise, offset noise, perturbation noise, timesteps) are arguments, so the
formulas can be checked against the reference on identical inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import paddle

__all__ = ["DDPMSchedule", "TrainingTerms", "training_terms", "weighted_mse", "TARGETS", "LOSS_WEIGHTS"]


@dataclass(frozen=True)
class DDPMSchedule:
    """The SD v1 training schedule (values of the released `scheduler_config.json`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    @classmethod
    def from_config(cls, config: dict | None) -> "DDPMSchedule":
        if not config:
            return cls()
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
        return cls(**{k: config[k] for k in keys if k in config})

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float64 cumulative products of (1 - beta)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float32) ** 2
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        else:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported (scaled_linear, linear)")
        # float32 like the reference scheduler, so the values match it bit for bit
        return np.cumprod(1.0 - betas.astype(np.float32), axis=0).astype(np.float32)


def _per_sample(values: paddle.Tensor, t: paddle.Tensor, ndim: int) -> paddle.Tensor:
    """Gather values[t] -> [B, 1, 1, ...] broadcastable over a [B, ...] tensor of `ndim` dims."""
    out = paddle.gather(values, t)  # (B,)
    return out.reshape([-1] + [1] * (ndim - 1))


def _epsilon_target(latents, noise, sqrt_a, sqrt_1ma):
    return noise


def _v_target(latents, noise, sqrt_a, sqrt_1ma):
    # v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0   (Salimans & Ho 2022, eq. in sec. 4)
    return sqrt_a * noise - sqrt_1ma * latents


def _epsilon_weight(snr, gamma):
    return paddle.minimum(snr, paddle.full_like(snr, gamma)) / snr


def _v_weight(snr, gamma):
    return paddle.minimum(snr, paddle.full_like(snr, gamma)) / (snr + 1.0)


TARGETS = {"epsilon": _epsilon_target, "v_prediction": _v_target}
LOSS_WEIGHTS = {"epsilon": _epsilon_weight, "v_prediction": _v_weight}


@dataclass
class TrainingTerms:
    noisy_latents: paddle.Tensor  # (B, C, H, W) model input
    target: paddle.Tensor  # (B, C, H, W)
    weights: Optional[paddle.Tensor]  # (B,) Min-SNR weights, None = uniform


def training_terms(
    latents: paddle.Tensor,
    noise: paddle.Tensor,
    timesteps: paddle.Tensor,
    alphas_cumprod: paddle.Tensor,
    prediction_type: str = "epsilon",
    noise_offset: float = 0.0,
    offset_noise: Optional[paddle.Tensor] = None,
    input_perturbation: float = 0.0,
    perturbation_noise: Optional[paddle.Tensor] = None,
    snr_gamma: Optional[float] = None,
) -> TrainingTerms:
    """Noisy input, target and per-sample weights of one DDPM training step.

    latents (B,C,H,W) already scaled; noise (B,C,H,W) ~ N(0,1); timesteps (B,) int64 in [0, T);
    offset_noise (B,C,1,1) used when noise_offset > 0; perturbation_noise (B,C,H,W) used when
    input_perturbation > 0 (it perturbs only the model input: the target keeps the clean noise).
    """
    if prediction_type not in TARGETS:
        raise ValueError(f"prediction_type must be one of {sorted(TARGETS)}, got {prediction_type!r}")
    if latents.shape != noise.shape:
        raise ValueError(f"latents {latents.shape} and noise {noise.shape} differ in shape")
    if noise_offset > 0:
        if offset_noise is None:
            raise ValueError("noise_offset > 0 needs offset_noise of shape (B, C, 1, 1)")
        noise = noise + noise_offset * offset_noise  # (B, C, H, W)
    model_noise = noise
    if input_perturbation > 0:
        if perturbation_noise is None:
            raise ValueError("input_perturbation > 0 needs perturbation_noise shaped like the latents")
        model_noise = noise + input_perturbation * perturbation_noise
    acp = alphas_cumprod.astype(latents.dtype)
    sqrt_a = _per_sample(acp.sqrt(), timesteps, latents.ndim)  # (B, 1, 1, 1)
    sqrt_1ma = _per_sample((1.0 - acp).sqrt(), timesteps, latents.ndim)
    noisy = sqrt_a * latents + sqrt_1ma * model_noise  # q(x_t | x_0)
    target = TARGETS[prediction_type](latents, noise, sqrt_a, sqrt_1ma)
    weights = None
    if snr_gamma is not None:
        a = paddle.gather(acp, timesteps)  # (B,)
        snr = a / (1.0 - a)
        weights = LOSS_WEIGHTS[prediction_type](snr, float(snr_gamma))  # (B,)
    return TrainingTerms(noisy, target, weights)


def weighted_mse(pred: paddle.Tensor, target: paddle.Tensor, weights: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """Mean over samples of (per-sample weight x per-sample MSE); plain MSE when weights is None."""
    err = (pred.astype("float32") - target.astype("float32")) ** 2
    if weights is None:
        return err.mean()
    per_sample = err.reshape([err.shape[0], -1]).mean(axis=1)  # (B,)
    return (per_sample * weights.astype("float32")).mean()
