"""Paddle port of Stable Cascade's GDF (generic diffusion framework).

Stage B and Stage C both use::

    GDF(schedule=CosineSchedule(clamp_range=[0.0001, 0.9999]), input_scaler=VPScaler(),
        target=EpsilonTarget(), noise_cond=CosineTNoiseCond(), loss_weight=P2LossWeight())

See ``stable_cascade_gdf()``.
"""
from .gdf import GDF, Diffused
from .loss_weights import AdaptiveLossWeight, BaseLossWeight, ConstantLossWeight, P2LossWeight
from .noise_conditions import BaseNoiseCond, CosineTNoiseCond
from .samplers import (SAMPLERS, DDIMSampler, DDPMSampler, SimpleSampler, global_noise_fn, make_noise_fn,
                       make_sampler, per_sample_noise_fn, seeded_noise_fn)
from .scalers import BaseScaler, VPScaler
from .schedules import BaseSchedule, CosineSchedule, shift_offset
from .targets import EpsilonTarget, VTarget, X0Target


def stable_cascade_gdf(adaptive_loss_weight: bool = False) -> GDF:
    """The GDF of Stable Cascade's Stage B and Stage C training and sampling."""
    return GDF(
        schedule=CosineSchedule(clamp_range=[0.0001, 0.9999]),
        input_scaler=VPScaler(), target=EpsilonTarget(), noise_cond=CosineTNoiseCond(),
        loss_weight=AdaptiveLossWeight() if adaptive_loss_weight else P2LossWeight(),
    )


__all__ = [
    "GDF", "Diffused", "stable_cascade_gdf",
    "BaseSchedule", "CosineSchedule", "shift_offset",
    "BaseScaler", "VPScaler",
    "EpsilonTarget", "X0Target", "VTarget",
    "BaseNoiseCond", "CosineTNoiseCond",
    "BaseLossWeight", "ConstantLossWeight", "P2LossWeight", "AdaptiveLossWeight",
    "SimpleSampler", "DDIMSampler", "DDPMSampler", "SAMPLERS", "make_sampler",
    "make_noise_fn", "seeded_noise_fn", "per_sample_noise_fn", "global_noise_fn",
]
