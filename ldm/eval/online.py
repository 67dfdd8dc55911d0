"""FID and CLIP score during training, with the sampling shared over data-parallel ranks.

`OnlineEvaluation` holds what does not change between evaluations (the captions, the reference
statistics with their square root, the Inception network, the CLIP towers) and `run(generator)`
scores a generator `generator(captions, seed, guidance_scale) -> uint8 (N, H, W, 3)` (the one
signature of ldm.eval.generators) at each guidance scale:

- the first K captions are split into contiguous shards, one per rank; caption k is sampled from
  seed + k at every scale and at every evaluation, so successive evaluations see the same noise;
- each rank computes the Inception features and per-pair CLIP scores of its own images, in
  memory (nothing is written); the features (padded to the largest shard) and the CLIP score sums
  are gathered over the ranks (paddle.distributed, any backend, gloo on CPU), and every rank
  computes the same FID from all K images;
- the result is {"eval/fid_g<scale>": ..., "eval/clip_score_g<scale>": ...} (one scalar each, for
  VisualDL).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ldm.eval.fid import FeatureStats, FrechetReference, inception_features, load_stats
from ldm.eval.sweep import read_captions
from ldm.utils import dist_info, get_logger

__all__ = ["OnlineEvaluation", "shard_range", "metric_names"]

logger = get_logger(__name__)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Captions [rank * n // W, (rank + 1) * n // W): contiguous, sizes differ by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def metric_names(guidance_scale: float) -> tuple[str, str]:
    return f"eval/fid_g{guidance_scale:g}", f"eval/clip_score_g{guidance_scale:g}"


def _gather(features: np.ndarray, clip_sum: float, world_size: int) -> tuple[np.ndarray, float]:
    """All ranks' (N_r, D) features (concatenated in rank order) and the summed CLIP scores."""
    if world_size == 1:
        return features, clip_sum
    import paddle
    import paddle.distributed as dist

    n = paddle.to_tensor([len(features)], dtype="int64")
    counts = []
    dist.all_gather(counts, n)
    width = max(int(c.item()) for c in counts)
    padded = np.zeros((width, features.shape[1]), np.float32)
    padded[:len(features)] = features
    parts = []
    dist.all_gather(parts, paddle.to_tensor(padded))
    total = paddle.to_tensor([clip_sum], dtype="float64")
    dist.all_reduce(total)
    feats = np.concatenate([p.numpy()[:int(c.item())] for p, c in zip(parts, counts)])
    return feats, float(total.item())


class OnlineEvaluation:
    """See the module docstring. `inception` is the loaded FID InceptionV3 (any network mapping
    (B, 3, 299, 299) to (B, D) features works, D = the reference's), `clip_scorer` a
    ldm.eval.clip_score.ClipScorer (anything with `scores(images, captions)`)."""

    def __init__(self, captions: Sequence[str], reference, inception, clip_scorer, num_images: int,
                 guidance_scales: Sequence[float], seed: int = 0, batch_size: int = 4):
        captions = read_captions(captions) if isinstance(captions, str) else list(captions)
        if num_images < 1 or num_images > len(captions):
            raise ValueError(f"num_images must be in [1, {len(captions)}] (the number of captions), got {num_images}")
        if num_images < 2:
            raise ValueError("FID needs at least 2 images (num_images >= 2)")
        if not guidance_scales:
            raise ValueError("give at least one guidance scale")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.captions = captions[:num_images]
        mu, sigma = load_stats(reference) if isinstance(reference, str) else reference
        self.reference = FrechetReference(mu, sigma)
        self.inception, self.clip_scorer = inception, clip_scorer
        self.guidance_scales = [float(g) for g in guidance_scales]
        self.seed, self.batch_size = int(seed), int(batch_size)

    def run(self, generator: Callable, rank: int | None = None, world_size: int | None = None) -> dict:
        if rank is None or world_size is None:
            rank, world_size = dist_info()
        mine = shard_range(len(self.captions), rank, world_size)
        out = {}
        for g in self.guidance_scales:
            feats, clip_sum = [], 0.0
            for start in range(mine.start, mine.stop, self.batch_size):
                idx = range(start, min(start + self.batch_size, mine.stop))
                caps = [self.captions[k] for k in idx]
                images = list(generator(caps, self.seed + idx.start, g))
                feats += list(inception_features(self.inception, images, len(images)))
                clip_sum += float(self.clip_scorer.scores(images, caps).sum())
            dim = len(self.reference.mu)  # 2048 for the FID Inception
            local = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, dim), np.float32)
            everyone, clip_total = _gather(local, clip_sum, world_size)
            stats = FeatureStats().update(everyone)
            fid_name, clip_name = metric_names(g)
            out[fid_name] = self.reference.distance(stats.mu, stats.sigma)
            out[clip_name] = clip_total / stats.n
        logger.info("evaluation on %d images: %s", len(self.captions),
                    ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
        return out
