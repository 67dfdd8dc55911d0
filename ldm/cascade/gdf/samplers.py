"""Samplers (one reverse step each) and injectable noise sources.

Follows Stability-AI/StableCascade ``gdf/samplers.py``: ``DDIMSampler`` (Song et al. 2021,
eq. 12 written with the VP scalers a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar)) and
``DDPMSampler`` = DDIM with eta = 1. Unlike the original, the step draws its noise from an
injected ``noise_fn(shape) -> float32 Tensor`` instead of the global generator, so a pipeline
can give every image of a batch its own reproducible stream.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import paddle

NoiseFn = Callable[[List[int]], paddle.Tensor]
NoiseSpec = Union[None, int, Sequence[int], NoiseFn]


def seeded_noise_fn(seed: int) -> NoiseFn:
    """One numpy PCG64 stream: every call draws the next standard normals of the given shape."""
    rng = np.random.default_rng(int(seed))

    def draw(shape):
        return paddle.to_tensor(rng.standard_normal(list(shape), dtype=np.float32))

    return draw


def per_sample_noise_fn(seeds: Sequence[int]) -> NoiseFn:
    """One stream per batch item: image i always gets the same noise for seed i, whatever the
    batch size or the other seeds. ``shape[0]`` must equal ``len(seeds)``."""
    rngs = [np.random.default_rng(int(s)) for s in seeds]

    def draw(shape):
        shape = list(shape)
        if shape[0] != len(rngs):
            raise ValueError(f"noise for batch {shape[0]} requested but {len(rngs)} seeds were given")
        return paddle.to_tensor(np.stack([r.standard_normal(shape[1:], dtype=np.float32) for r in rngs]))

    return draw


def global_noise_fn(shape) -> paddle.Tensor:
    """Paddle's global generator (seed it with paddle.seed)."""
    return paddle.randn(list(shape), dtype="float32")


def make_noise_fn(noise: NoiseSpec) -> NoiseFn:
    """None -> paddle global generator; int -> one seeded stream; sequence of ints -> one
    stream per batch item; callable -> used as is (must return float32-castable Tensors)."""
    if noise is None:
        return global_noise_fn
    if callable(noise):
        return lambda shape: noise(list(shape)).astype("float32")
    if isinstance(noise, (int, np.integer)) and not isinstance(noise, bool):
        return seeded_noise_fn(int(noise))
    if isinstance(noise, (list, tuple)) and all(isinstance(s, (int, np.integer)) for s in noise):
        return per_sample_noise_fn(noise)
    raise ValueError(f"noise must be None, an int seed, a list of int seeds or a callable, got {type(noise).__name__}")


def _bcast(v: paddle.Tensor, ndim: int) -> paddle.Tensor:
    """[B] -> [B, 1, ..., 1] for broadcasting against an ndim-D sample."""
    return v.reshape([-1] + [1] * (ndim - 1)) if v.ndim == 1 else v


class SimpleSampler:
    """``step(x, x0, epsilon, logSNR, logSNR_prev, noise_fn)`` -> the sample at logSNR_prev."""

    def __init__(self, gdf):
        self.gdf = gdf

    def init_x(self, shape, noise_fn: NoiseFn) -> paddle.Tensor:
        return noise_fn(list(shape))

    def __call__(self, *args, **kwargs):
        return self.step(*args, **kwargs)

    def step(self, x, x0, epsilon, log_snr, log_snr_prev, noise_fn: NoiseFn, **params):
        raise NotImplementedError


class DDIMSampler(SimpleSampler):
    """x' = a' x0 + sqrt(b'^2 - sigma^2) eps + sigma z,
    sigma = eta * sqrt(b'^2 / b^2) * sqrt(1 - a^2 / a'^2) (primes: the target logSNR).

    With eta = 0 no noise is drawn. b'^2 - sigma^2 is clipped at 0 against float rounding.
    """

    def __init__(self, gdf, eta: float = 0.0):
        super().__init__(gdf)
        self.eta = float(eta)

    def step(self, x, x0, epsilon, log_snr, log_snr_prev, noise_fn: NoiseFn, eta: Optional[float] = None):
        eta = self.eta if eta is None else float(eta)
        a, b = self.gdf.input_scaler(log_snr)
        a_prev, b_prev = self.gdf.input_scaler(log_snr_prev)
        a, b = _bcast(a, x0.ndim), _bcast(b, x0.ndim)
        a_prev, b_prev = _bcast(a_prev, x0.ndim), _bcast(b_prev, x0.ndim)
        if eta > 0:
            sigma = eta * (b_prev ** 2 / b ** 2).sqrt() * (1.0 - a ** 2 / a_prev ** 2).sqrt()
            z = noise_fn(list(x0.shape))
            return a_prev * x0 + (b_prev ** 2 - sigma ** 2).clip(min=0.0).sqrt() * epsilon + sigma * z
        return a_prev * x0 + b_prev * epsilon


class DDPMSampler(DDIMSampler):
    """Ancestral DDPM (Ho et al. 2020) = DDIM with eta = 1."""

    def __init__(self, gdf, eta: float = 1.0):
        super().__init__(gdf, eta=eta)


# Samplers by the name a SamplingConfig gives (ldm.cascade.settings); a new sampler is one class here.
SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}


def make_sampler(name: str, gdf):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](gdf)
