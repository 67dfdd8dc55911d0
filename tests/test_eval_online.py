"""Training-time evaluation core (ldm.eval.online): shards cover every caption exactly once, the
metrics equal a direct computation on the same images, and caption k always gets seed + k."""
import numpy as np
import paddle
import pytest

from ldm.eval.fid import FeatureStats, inception_features
from ldm.eval.online import OnlineEvaluation, metric_names, shard_range


DIM = 16


class TinyFeatures(paddle.nn.Layer):
    """A stand-in for the Inception (tested against pytorch-fid elsewhere): (B, 3, 299, 299) ->
    (B, 16), so the FID here costs nothing."""

    def __init__(self):
        super().__init__()
        self.proj = paddle.nn.Linear(3 * 4 * 4, DIM)

    def forward(self, x):
        return self.proj(paddle.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.fixture(scope="module")
def inception():
    paddle.seed(0)
    return TinyFeatures().eval()


class FakeGenerator:
    """Images that depend only on (seed, guidance scale), like a real sampler with fixed noise."""

    def __init__(self):
        self.calls = []

    def __call__(self, captions, seed, guidance_scale):
        self.calls.append((list(captions), seed, guidance_scale))
        return np.stack([np.random.default_rng([seed + i, int(guidance_scale * 10)]).integers(0, 256, (24, 24, 3))
                         for i in range(len(captions))]).astype(np.uint8)


class LengthScorer:
    def scores(self, images, captions):
        return np.array([float(len(c)) for c in captions])


def test_shards_cover_every_caption_once():
    for n in (1, 2, 5, 12):
        for world in (1, 2, 3, 4):
            seen = [k for r in range(world) for k in shard_range(n, r, world)]
            assert seen == list(range(n))
    with pytest.raises(ValueError):
        shard_range(4, 2, 2)


def test_online_metrics_equal_direct_computation(inception):
    captions = ["a", "bb", "ccc", "dddd"]
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, DIM)) * 0.5 + 3.0
    reference = (ref.mean(0), np.cov(ref, rowvar=False))
    gen = FakeGenerator()
    ev = OnlineEvaluation(captions + ["unused"], reference, inception, LengthScorer(), num_images=4,
                          guidance_scales=[4.0], seed=10, batch_size=3)
    got = ev.run(gen, rank=0, world_size=1)
    assert [(c, s) for c, s, _ in gen.calls] == [(["a", "bb", "ccc"], 10), (["dddd"], 13)]
    images = np.concatenate([gen(captions, 10, 4.0)])
    feats = np.concatenate(list(inception_features(inception, list(images), 4)))
    stats = FeatureStats().update(feats)
    fid_name, clip_name = metric_names(4.0)
    assert sorted(got) == sorted([fid_name, clip_name]) == ["eval/clip_score_g4", "eval/fid_g4"]
    assert got[fid_name] == pytest.approx(ev.reference.distance(stats.mu, stats.sigma), rel=1e-6)  # other batching
    assert got[clip_name] == pytest.approx(np.mean([len(c) for c in captions]))
    with pytest.raises(ValueError, match="at least 2 images"):
        OnlineEvaluation(captions, reference, inception, LengthScorer(), num_images=1, guidance_scales=[1.0])
    with pytest.raises(ValueError, match="num_images must be in"):
        OnlineEvaluation(captions, reference, inception, LengthScorer(), num_images=9, guidance_scales=[1.0])
