"""The Frechet distance between two feature distributions, each fitted by a Gaussian (FID's maths).

For N(mu1, S1) and N(mu2, S2) the squared 2-Wasserstein distance is (Dowson & Landau 1982)

    FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

FID (Heusel et al. 2017) evaluates it on Inception pool3 features; pocketdiff evaluates it on the domain
CLIP's pooled image features (``DomainCLIP.image_features``). The trace of the matrix square root is
computed in the symmetric form Tr((S1 S2)^(1/2)) = Tr((A S2 A)^(1/2)) with A = S1^(1/2): A S2 A is
symmetric positive semi-definite, so its square root's trace is the sum of the square roots of its
(clipped) eigenvalues -- real by construction, with no ``sqrtm`` of a non-symmetric product, no
imaginary parts to discard and no eps offset needed for singular covariances (fewer samples than
features).
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) features -> (mu (F,), sigma (F, F)), in float64; sigma is the unbiased sample covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of A S2 A), A = S1^(1/2)."""
    a = _psd_sqrt(sigma1)
    m = a @ sigma2 @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); >= 0 (round-off below zero is returned as 0)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return max(float(fd), 0.0)


def frechet_distance_features(features1, features2) -> float:
    """Frechet distance between Gaussians fitted to two (N, F) feature sets (FID on these features)."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))
