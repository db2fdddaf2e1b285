"""The Frechet distance against closed forms and a direct scipy computation (seconds, CPU)."""

import numpy as np
import pytest
from scipy.linalg import sqrtm
from scipy.stats import ortho_group

from pocketdiff.eval.frechet import frechet_distance, frechet_distance_features, gaussian_stats


def closed_form_diagonal(mu1, a, mu2, b) -> float:
    """FD of N(mu1, diag(a)) and N(mu2, diag(b)): |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def direct(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root of S1 S2."""
    covmean = sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


def random_spd(rng, d):
    m = rng.normal(size=(d, d))
    return m @ m.T / d + 0.1 * np.eye(d)


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 3, 16):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
        got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
        assert got == pytest.approx(closed_form_diagonal(mu1, a, mu2, b), rel=1e-10, abs=1e-12)


def test_rotated_diagonal_is_a_closed_form_full_covariance_case():
    """FD is invariant under a common rotation Q: full covariances Q diag(a) Q^T keep the closed form."""
    rng = np.random.default_rng(1)
    d = 8
    q = ortho_group.rvs(d, random_state=2)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(closed_form_diagonal(mu1, a, mu2, b), rel=1e-9)


def test_full_covariance_matches_direct_computation():
    rng = np.random.default_rng(3)
    for d in (2, 5, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct(mu1, s1, mu2, s2), rel=1e-8)


def test_singular_covariances_fewer_samples_than_features():
    """N < F (rank-deficient covariances, as with few images): finite, real, and equal to the direct form."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 24)), rng.normal(size=(12, 24)) + 0.5
    (m1, s1), (m2, s2) = gaussian_stats(x), gaussian_stats(y)
    got = frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(got) and got > 0
    assert got == pytest.approx(direct(m1, s1, m2, s2), rel=1e-5)


def test_identity_symmetry_nonnegativity():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-8)
    for seed in range(10):
        r = np.random.default_rng(seed)
        d = int(r.integers(1, 20))
        mu1, mu2 = r.normal(size=d), r.normal(size=d)
        s1, s2 = random_spd(r, d), random_spd(r, d)
        ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
        assert ab == pytest.approx(ba, rel=1e-9, abs=1e-12)
        assert ab >= 0.0
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_samples_estimate_the_closed_form():
    rng = np.random.default_rng(6)
    d, n = 6, 20_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    a, b = np.linspace(0.5, 2.0, d), np.linspace(2.0, 0.5, d)
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(a)
    y = mu2 + rng.normal(size=(n, d)) * np.sqrt(b)
    expected = closed_form_diagonal(mu1, a, mu2, b)
    assert frechet_distance_features(x, y) == pytest.approx(expected, rel=0.05)


def test_gaussian_stats_and_input_checks():
    x = np.random.default_rng(7).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == np.float64 and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError):
        gaussian_stats(x[:1])
    with pytest.raises(ValueError):
        frechet_distance(mu, sigma, mu[:2], sigma[:2, :2])
