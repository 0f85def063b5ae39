"""Frechet distance (FID) and kernel distance (KID) between real and generated image features.

FID models each feature set as a Gaussian with mean ``mu`` and covariance ``S`` and reports

    ||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)).

Numerics (why the code looks the way it does):

* features are accumulated as running sums ``sum x`` and ``sum x x^T`` in **float64**, so streaming
  over thousands of batches gives the same mean/covariance as one pass (covariance is unbiased,
  ``/(n - 1)``);
* the matrix square root is ``scipy.linalg.sqrtm``.  For a product of two PSD matrices the exact root
  has real eigenvalues, but rounding gives a small imaginary part; it is dropped when it is below
  ``1e-3`` of the largest real entry (as the reference implementations do) and a ``RuntimeWarning``
  is issued when it is larger.  A singular product (fewer samples than features) can make ``sqrtm``
  return non-finite values; then ``1e-6`` is added to both diagonals and the root is retried;
* tiny negative results from rounding are clamped to 0.

With fewer samples than feature dimensions the covariances are rank-deficient and FID is biased
upwards; compare numbers only at equal sample counts, and prefer >= ``num_features`` samples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from diffq.eval.features import EvalInputError, FeatureNetwork, to_tensor_batch


def _as_features(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise EvalInputError(f"features must be [N, D], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise EvalInputError("features contain NaN/Inf; check the images and the feature network's dtype")
    return x


def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean ``[D]`` and unbiased covariance ``[D, D]`` of features ``[N, D]`` (N >= 2)."""
    f = _as_features(features)
    if len(f) < 2:
        raise EvalInputError(f"FID needs at least 2 images per set, got {len(f)}")
    mu = f.mean(0)
    c = f - mu
    return mu.numpy(), (c.T @ c / (len(f) - 1)).numpy()


def _sqrtm_product(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if isinstance(covmean, tuple):  # older scipy with disp=False semantics
        covmean = covmean[0]
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(len(s1))
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
        if isinstance(covmean, tuple):
            covmean = covmean[0]
    if np.iscomplexobj(covmean):
        imag = float(np.abs(covmean.imag).max()) if covmean.size else 0.0
        scale = max(float(np.abs(covmean.real).max()) if covmean.size else 0.0, 1e-12)
        if imag > 1e-3 * scale:
            warnings.warn(f"FID: sqrtm has an imaginary part of {imag:.3g} (relative {imag / scale:.2g}); "
                          "using the real part -- more samples make the covariances better conditioned",
                          RuntimeWarning, stacklevel=3)
        covmean = covmean.real
    return covmean


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians given as float64 mean ``[D]`` / covariance ``[D, D]``."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise EvalInputError(f"FID statistics disagree: mu {mu1.shape} vs {mu2.shape}, "
                             f"sigma {sigma1.shape} vs {sigma2.shape}; use one feature network for both sets")
    diff = mu1 - mu2
    covmean = _sqrtm_product(sigma1, sigma2)
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    return max(value, 0.0)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets ``[N, D]`` and ``[M, D]`` (any float dtype; computed in float64)."""
    r, f = _as_features(real), _as_features(fake)
    if r.shape[1] != f.shape[1]:
        raise EvalInputError(f"feature widths differ ({r.shape[1]} vs {f.shape[1]}); use one feature network")
    return fid_from_stats(*gaussian_stats(r), *gaussian_stats(f))


@dataclass
class _Moments:
    """Streaming float64 sums of ``x`` and ``x x^T``."""

    n: int = 0
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        if self.s1 is None:
            self.s1 = torch.zeros(x.shape[1], dtype=torch.float64)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        elif x.shape[1] != self.s1.shape[0]:
            raise EvalInputError(f"feature width changed from {self.s1.shape[0]} to {x.shape[1]}")
        self.n += len(x)
        self.s1 += x.sum(0)
        self.s2 += x.T @ x

    def stats(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise EvalInputError(f"FID needs at least 2 {which} images, got {self.n}; call update_{which} first")
        mu = self.s1 / self.n
        cov = (self.s2 - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()


class FidAccumulator:
    """Streaming FID: feed real and generated images (or features) batch by batch, then ``compute()``.

    ``features`` is a :class:`FeatureNetwork`; it may be ``None`` when only ``*_features`` updates are
    used.  Memory is ``O(D^2)`` regardless of how many images pass through.
    """

    def __init__(self, features: FeatureNetwork | None = None) -> None:
        self.features = features
        self._real = _Moments()
        self._fake = _Moments()

    def _feats(self, images) -> torch.Tensor:
        if self.features is None:
            raise EvalInputError("this FidAccumulator has no feature network; use update_*_features or pass one")
        return _as_features(self.features(to_tensor_batch(images)))

    def update_real(self, images) -> None:
        """Add a batch of real images ``[B, 3, H, W]`` in [0, 1]."""
        self._real.add(self._feats(images))

    def update_fake(self, images) -> None:
        """Add a batch of generated images ``[B, 3, H, W]`` in [0, 1]."""
        self._fake.add(self._feats(images))

    def update_real_features(self, feats: torch.Tensor) -> None:
        self._real.add(_as_features(feats))

    def update_fake_features(self, feats: torch.Tensor) -> None:
        self._fake.add(_as_features(feats))

    @property
    def num_real(self) -> int:
        return self._real.n

    @property
    def num_fake(self) -> int:
        return self._fake.n

    def reset_fake(self) -> None:
        """Forget the generated images but keep the real statistics (score another model)."""
        self._fake = _Moments()

    def compute(self) -> float:
        return fid_from_stats(*self._real.stats("real"), *self._fake.stats("fake"))


def fid(real, fake, features: FeatureNetwork, batch_size: int = 256) -> float:
    """FID between two image sets ``[N, 3, H, W]`` / ``[M, 3, H, W]`` in [0, 1] with one feature network."""
    acc = FidAccumulator(features)
    real, fake = to_tensor_batch(real), to_tensor_batch(fake)
    for i in range(0, len(real), batch_size):
        acc.update_real(real[i:i + batch_size])
    for i in range(0, len(fake), batch_size):
        acc.update_fake(fake[i:i + batch_size])
    return acc.compute()


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                      degree: int = 3, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the kernel ``(x.y / D + coef)^degree``.

    Averaged over ``subsets`` random subsets of ``min(subset_size, N, M)`` samples from each set
    (seeded); returns ``(mean, std)``.  Unlike FID it is unbiased at small sample counts, so it suits
    the few hundred images a quick run makes; it can be slightly negative for matching sets.
    """
    r, f = _as_features(real), _as_features(fake)
    if r.shape[1] != f.shape[1]:
        raise EvalInputError(f"feature widths differ ({r.shape[1]} vs {f.shape[1]}); use one feature network")
    m = min(subset_size, len(r), len(f))
    if m < 2:
        raise EvalInputError(f"KID needs at least 2 samples per set, got {len(r)} and {len(f)}")
    d = r.shape[1]
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = r[torch.randperm(len(r), generator=g)[:m]]
        y = f[torch.randperm(len(f), generator=g)[:m]]
        kxx = (x @ x.T / d + coef) ** degree
        kyy = (y @ y.T / d + coef) ** degree
        kxy = (x @ y.T / d + coef) ** degree
        off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        vals.append(float(off - 2 * kxy.mean()))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


__all__ = ["FidAccumulator", "fid", "fid_from_features", "fid_from_stats", "gaussian_stats", "kid_from_features"]
