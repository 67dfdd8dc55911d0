"""Training-time evaluation core (ldm.eval.online): shards cover every caption exactly once, the
metrics equal a direct computation on the same images, caption k always gets seed + k, and two
gloo ranks (paddle.distributed.launch: a job of tests/two_rank_runs.py) get the metrics of one
process."""
import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from ldm.eval.fid import FeatureStats, inception_features
from ldm.eval.online import OnlineEvaluation, metric_names, shard_range


DIM = 16
CAPTIONS = ["a", "bb", "ccc", "dddd", "eeeee"]


def reference_stats():
    ref = np.random.default_rng(0).standard_normal((40, DIM)) * 0.5 + 3.0
    return ref.mean(0), np.cov(ref, rowvar=False)


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
    reference = reference_stats()
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


def prepare_two_ranks(folder):  # the two_rank_runs job (tests/eval_dist_worker.py): worker arguments
    return [folder]


@pytest.mark.slow
def test_two_ranks_give_the_one_process_metrics(two_rank_runs):
    tmp_path = Path(two_rank_runs["eval_online"])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["metrics"] == ranks[1]["metrics"]
    # rank 0 sampled captions 0-1, rank 1 captions 2-4, each from seed + k, at both scales
    assert [c[:2] for c in ranks[0]["calls"]] == [[["a", "bb"], 10]] * 2
    assert [c[:2] for c in ranks[1]["calls"]] == [[["ccc", "dddd", "eeeee"], 12]] * 2
    paddle.seed(0)
    one = OnlineEvaluation(CAPTIONS, reference_stats(), TinyFeatures().eval(), LengthScorer(),
                           num_images=len(CAPTIONS), guidance_scales=[1.0, 4.0], seed=10, batch_size=3)
    want = one.run(FakeGenerator(), rank=0, world_size=1)
    assert sorted(want) == sorted(ranks[0]["metrics"])
    for k, v in want.items():
        assert ranks[0]["metrics"][k] == pytest.approx(v, rel=1e-6), k
