"""Frechet Inception Distance: streamed feature statistics, the `.npz` statistics files, the distance.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") between N(mu1, S1) and N(mu2, S2) fitted to the pool3 features of two image sets:

    FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

- Statistics are those of pytorch-fid (`calculate_activation_statistics`): the mean and the unbiased
  covariance (`np.cov(act, rowvar=False)`, N - 1), here accumulated batch by batch in float64
  (sums of shifted features and of their outer products), so no image or feature list is held.
- `.npz` files hold `mu` (D,) and `sigma` (D, D): what pytorch-fid's `--save-stats` writes and
  PaddleMIX's `coco_{res}_{1k|10k|30k}.npz` hold; ours add `num_images`, which both ignore.
- Tr((S1 S2)^(1/2)) is computed from the symmetric form: S1 S2 is similar to
  S1^(1/2) S2 S1^(1/2), which is positive semi-definite, so the trace is the sum of the square
  roots of its eigenvalues (two symmetric eigendecompositions). pytorch-fid takes the general
  matrix square root (`scipy.linalg.sqrtm`), retries with 1e-6 added to both diagonals when that is
  not finite, and drops an imaginary part whose diagonal is below 1e-3. The symmetric form needs
  neither step (its eigenvalues are real); round-off negatives are clipped to 0, and an eigenvalue
  below -1e-6 (an imaginary part above 1e-3 in pytorch-fid's terms: a covariance that is not
  positive semi-definite) is a ValueError. On 2048-d features it is ~5x faster than sqrtm
  (measured 5 s vs 26-39 s on one CPU thread) and agrees with pytorch-fid to ~1e-8 relative
  (tests/test_eval_fid.py), rank-deficient covariances (fewer images than dimensions) included.
  `FrechetReference` keeps the reference's S^(1/2), so each further image set costs one
  symmetric eigenvalue problem.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional

import numpy as np

from ldm.eval.images import to_float_chw
from ldm.utils import atomic_open

__all__ = ["FeatureStats", "FrechetReference", "frechet_distance", "save_stats", "load_stats", "inception_features",
           "image_statistics", "NEGATIVE_EIGEN_TOL"]

NEGATIVE_EIGEN_TOL = 1e-6  # eigenvalue below -tol: not a covariance (pytorch-fid: imaginary part > 1e-3)


class FeatureStats:
    """Running mean and unbiased covariance of feature rows, in float64.

    Rows are shifted by the first batch's mean before summing (the covariance is shift-invariant),
    which keeps the sum of outer products from cancelling when the mean is large."""

    def __init__(self, dim: Optional[int] = None):
        self.dim = dim
        self.n = 0
        self._shift = self._sum = self._outer = None

    def update(self, features) -> "FeatureStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {f.shape}")
        if self.dim is not None and f.shape[1] != self.dim:
            raise ValueError(f"features have {f.shape[1]} dimensions, expected {self.dim}")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or inf")
        if not len(f):
            return self
        if self._shift is None:
            self.dim = f.shape[1]
            self._shift = f.mean(axis=0)
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
        d = f - self._shift  # (N, D)
        self._sum += d.sum(axis=0)
        self._outer += d.T @ d
        self.n += len(f)
        return self

    @property
    def mu(self) -> np.ndarray:
        self._need(1)
        return self._shift + self._sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        self._need(2)
        m = self._sum / self.n
        return (self._outer - self.n * np.outer(m, m)) / (self.n - 1)

    def _need(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"FID statistics need at least {k} image(s), got {self.n}")


def _check_stats(mu, sigma, where: str):
    mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{where}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: statistics contain NaN or inf")
    return mu, sigma


def _psd_eigh(m: np.ndarray, what: str, vectors: bool = False):
    """Eigenvalues (clipped at 0) [and eigenvectors] of a symmetric positive semi-definite matrix;
    ValueError when an eigenvalue is below -NEGATIVE_EIGEN_TOL."""
    m = (m + m.T) / 2
    w, v = np.linalg.eigh(m) if vectors else (np.linalg.eigvalsh(m), None)
    if w.min() < -NEGATIVE_EIGEN_TOL:
        raise ValueError(f"{what} is not positive semi-definite (eigenvalue {w.min():.3g}); "
                         "are these covariance matrices?")
    w = np.clip(w, 0.0, None)
    return (w, v) if vectors else w


class FrechetReference:
    """The statistics images are compared against, with S^(1/2) computed once, so that scoring a
    sweep of image sets against one reference costs one eigendecomposition per set."""

    def __init__(self, mu, sigma):
        self.mu, self.sigma = _check_stats(mu, sigma, "reference statistics")
        w, v = _psd_eigh(self.sigma, "the reference covariance", vectors=True)
        self._root = (v * np.sqrt(w)) @ v.T  # S_ref^(1/2)

    def distance(self, mu, sigma) -> float:
        """FID between these statistics and N(mu, sigma)."""
        mu, sigma = _check_stats(mu, sigma, "statistics")
        if mu.shape != self.mu.shape:
            raise ValueError(f"the statistics have {mu.shape[0]} dimensions, the reference {self.mu.shape[0]}")
        tr_covmean = np.sqrt(_psd_eigh(self._root @ sigma @ self._root, "S_ref^1/2 S S_ref^1/2")).sum()
        diff = mu - self.mu
        return float(diff @ diff + np.trace(sigma) + np.trace(self.sigma) - 2.0 * tr_covmean)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
    return FrechetReference(mu1, sigma1).distance(mu2, sigma2)


def save_stats(path, mu, sigma, num_images: Optional[int] = None) -> str:
    """Write `mu`, `sigma` (and `num_images`) as an .npz, atomically (uncompressed: pytorch-fid
    writes savez_compressed, which reads the same but costs seconds to deflate 2048 x 2048 floats
    that hardly compress)."""
    mu, sigma = _check_stats(mu, sigma, os.fspath(path))
    extra = {} if num_images is None else {"num_images": np.int64(num_images)}
    with atomic_open(os.fspath(path)) as f:
        np.savez(f, mu=mu, sigma=sigma, **extra)
    return os.fspath(path)


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as float64 from a pytorch-fid / PaddleMIX / our .npz (no pickles are read)."""
    path = os.fspath(path)
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"{path}: not FID statistics (no {', '.join(missing)}; keys {f.files})")
        return _check_stats(f["mu"], f["sigma"], path)


def inception_features(model, images: Iterable, batch_size: int = 50, progress: bool = False,
                       total: Optional[int] = None, desc: str = "Inception features") -> Iterator[np.ndarray]:
    """(B, 2048) float64 pool3 features of `images` (uint8 (H, W, 3) RGB arrays, any sizes), in batches; each image is resized to 299 on its own, as pytorch-fid does."""
    import paddle

    from ldm.eval.inception import fid_resize

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="img")
    batch = []

    def run():
        with paddle.no_grad():
            out = model(paddle.concat(batch, axis=0)).numpy().astype(np.float64)
        if bar is not None:
            bar.update(len(batch))
        batch.clear()
        return out

    try:
        for image in images:
            x = paddle.to_tensor(to_float_chw(image)[None])  # (1, 3, H, W)
            batch.append(fid_resize(x))
            if len(batch) == batch_size:
                yield run()
        if batch:
            yield run()
    finally:
        if bar is not None:
            bar.close()


def image_statistics(model, images: Iterable, batch_size: int = 50, progress: bool = False,
                     total: Optional[int] = None) -> FeatureStats:
    """FeatureStats of the Inception features of `images`, streamed."""
    stats = FeatureStats()
    for feats in inception_features(model, images, batch_size, progress, total):
        stats.update(feats)
    return stats
