"""FID arithmetic: streamed statistics = np.mean / np.cov, the distance = pytorch-fid's
`calculate_frechet_distance` (full-rank and rank-deficient covariances) and the closed form for two
known Gaussians, and .npz files read and written the way pytorch-fid does."""
import numpy as np
import pytest

from ldm.eval.fid import FeatureStats, FrechetReference, frechet_distance, load_stats, save_stats

fid_score = pytest.importorskip("pytorch_fid.fid_score")  # imports torch + torchvision (CPU shim)


def _features(n, d, seed, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * rng.uniform(0.2, 2.0, d) * scale + offset + rng.normal(0, 1, d)


def test_streamed_statistics_equal_numpy():
    f = _features(103, 24, 0, offset=1000.0)  # a large mean: the shifted sums must not cancel
    stats = FeatureStats()
    for chunk in np.array_split(f, [1, 7, 50, 51]):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.n == 103
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats().update(f[:1]).sigma
    with pytest.raises(ValueError, match="expected 24"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats().update(np.full((2, 3), np.nan))


@pytest.mark.parametrize("n,d", [(400, 64), (30, 64), (150, 256)])  # full rank; fewer samples than dimensions
def test_distance_equals_pytorch_fid(n, d):
    a, b = _features(n, d, 1), _features(n, d, 2, offset=0.3, scale=0.8)
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    want = fid_score.calculate_frechet_distance(m1, s1, m2, s2)
    got = frechet_distance(m1, s1, m2, s2)
    print(f"FID n={n} d={d}: ours {got:.10g}, pytorch-fid {want:.10g}, rel {abs(got - want) / want:.1e}")
    assert abs(got - want) <= 1e-6 * abs(want)
    assert abs(FrechetReference(m2, s2).distance(m1, s1) - want) <= 1e-6 * abs(want)  # symmetric
    assert abs(frechet_distance(m1, s1, m1, s1)) <= 1e-6 * np.trace(s1)  # sqrt of round-off at the null space


def test_distance_closed_form():
    # N(mu1, Q diag(a) Q^T), N(mu2, Q diag(b) Q^T) commute: FID = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(3)
    d = 32
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.0, 4.0, d)
    b[:5] = 0.0  # singular
    mu1, mu2 = rng.normal(0, 1, d), rng.normal(0, 1, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert abs(got - want) <= 1e-7 * want  # measured ~2e-9 (square roots of round-off at the 5 zero variances)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_distance_rejects_bad_statistics():
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="different dimensions|dimensions, the reference"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def test_npz_round_trip_with_pytorch_fid(tmp_path, monkeypatch):
    f = _features(50, 8, 4)
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    # a file written by pytorch-fid's save_fid_stats (--save-stats) is read by load_stats
    class NoNetwork:  # save_fid_stats builds the network first; the statistics are stubbed below
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            pass

        def to(self, device):
            return self

    monkeypatch.setattr(fid_score, "InceptionV3", NoNetwork)
    monkeypatch.setattr(fid_score, "compute_statistics_of_path", lambda *a, **k: (mu, sigma))
    theirs = str(tmp_path / "theirs.npz")
    (tmp_path / "imgs").mkdir()
    fid_score.save_fid_stats([str(tmp_path / "imgs"), theirs], 50, "cpu", 2048)
    m, s = load_stats(theirs)
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)
    # ours is read by pytorch-fid (compute_statistics_of_path on a .npz only loads mu and sigma)
    monkeypatch.undo()
    ours = save_stats(tmp_path / "ours.npz", mu, sigma, num_images=50)
    m, s = fid_score.compute_statistics_of_path(ours, None, 50, 2048, "cpu")
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)
    # a PaddleMIX-style float32 coco_*.npz
    coco = str(tmp_path / "coco_256_1k.npz")
    np.savez(coco, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    m, s = load_stats(coco)
    assert m.dtype == s.dtype == np.float64 and np.allclose(s, sigma, rtol=1e-6)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, mean=mu)
    with pytest.raises(ValueError, match="not FID statistics"):
        load_stats(bad)
