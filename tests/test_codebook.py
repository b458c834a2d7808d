"""Lloyd-Max codebooks against brute-force fp64 quadrature of the exact coordinate law."""

import numpy as np
import pytest
from scipy import integrate
from scipy.special import betaln

from turboquant_vllm.codebook import coordinate_mse, lloyd_max

# Exact-law optimum of d * MSE at d = 128 (the paper rounds to 0.36 / 0.117 / 0.03 / 0.009).
PAPER_D128 = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.00931}


def density(x: np.ndarray, d: int) -> np.ndarray:
    return np.exp((d - 3) / 2 * np.log1p(-x * x) - betaln(0.5, (d - 1) / 2))


def brute_force_mse(centroids: np.ndarray, d: int) -> float:
    """E[(x - nearest centroid)^2] by adaptive quadrature, cell by cell, over all of [-1, 1]."""
    edges = np.concatenate(([-1.0], (centroids[1:] + centroids[:-1]) / 2, [1.0]))
    total = 0.0
    for c, lo, hi in zip(centroids, edges[:-1], edges[1:], strict=True):
        val, _ = integrate.quad(lambda x, c=c: (x - c) ** 2 * density(x, d), lo, hi, epsabs=1e-15, limit=200)
        total += val
    return total


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_d128_distortion_matches_exact_law_optimum(bits):
    cb = lloyd_max(bits, 128)
    assert cb.distortion() == pytest.approx(PAPER_D128[bits], rel=0.01)
    assert 128 * brute_force_mse(cb.centroids, 128) == pytest.approx(cb.distortion(), rel=1e-6)


@pytest.mark.parametrize("d", [32, 64, 96, 256, 512])
@pytest.mark.parametrize("bits", [2, 4])
def test_closed_form_mse_equals_quadrature(bits, d):
    cb = lloyd_max(bits, d)
    assert coordinate_mse(cb.centroids, d) == pytest.approx(brute_force_mse(cb.centroids, d), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_is_a_fixed_point_of_lloyd(bits):
    """Each centroid is the conditional mean of its cell (computed by quadrature)."""
    d = 64
    cb = lloyd_max(bits, d)
    edges = np.concatenate(([-1.0], cb.boundaries, [1.0]))
    for c, lo, hi in zip(cb.centroids, edges[:-1], edges[1:], strict=True):
        mass, _ = integrate.quad(lambda x: density(x, d), lo, hi, epsabs=1e-15)
        moment, _ = integrate.quad(lambda x: x * density(x, d), lo, hi, epsabs=1e-15)
        assert c == pytest.approx(moment / mass, abs=1e-9)


def test_perturbing_centroids_only_increases_mse():
    cb = lloyd_max(3, 128)
    rng = np.random.default_rng(0)
    for _ in range(20):
        moved = np.sort(cb.centroids + rng.normal(0, 1e-3, cb.centroids.shape))
        assert coordinate_mse(moved, 128) > coordinate_mse(cb.centroids, 128)


def test_symmetric_sorted_and_cached():
    cb = lloyd_max(4, 128)
    assert np.all(np.diff(cb.centroids) > 0)
    np.testing.assert_allclose(cb.centroids, -cb.centroids[::-1], atol=0)
    assert lloyd_max(4, 128) is cb


def test_rejects_out_of_range():
    with pytest.raises(ValueError):
        lloyd_max(5, 128)
    with pytest.raises(ValueError):
        lloyd_max(4, 16)
