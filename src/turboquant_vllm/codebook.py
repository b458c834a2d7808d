"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector in R^d.

After a random rotation, each coordinate x of a unit vector follows the exact law
f(x) = (1 - x^2)^((d-3)/2) / B(1/2, (d-1)/2) on [-1, 1], i.e. (x+1)/2 ~ Beta((d-1)/2, (d-1)/2).
Both the cell masses (regularised incomplete beta) and the cell first moments (closed form)
are exact, so the optimum is solved over the whole support with no tail truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from scipy.special import betainc, betaincinv, betaln

from turboquant_vllm.config import check_head_dim

CODEBOOK_BITS = (1, 2, 3, 4)  # the cache stores 2-4; 1 serves TurboQuant_prod's MSE stage at 2 bits


@dataclass(frozen=True)
class Codebook:
    """Sorted centroids (2^bits) and the 2^bits - 1 decision boundaries between them."""

    bits: int
    head_dim: int
    centroids: np.ndarray  # float64 [2^bits], ascending
    boundaries: np.ndarray  # float64 [2^bits - 1], midpoints of neighbouring centroids

    def centroids_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.centroids, dtype=torch.float32, device=device)

    def boundaries_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.boundaries, dtype=torch.float32, device=device)

    def distortion(self) -> float:
        """d * E[(x - q(x))^2]: the expected squared error of quantising a unit vector."""
        return coordinate_mse(self.centroids, self.head_dim) * self.head_dim


def _cdf(x: np.ndarray, d: int) -> np.ndarray:
    a = (d - 1) / 2
    return betainc(a, a, (np.clip(x, -1.0, 1.0) + 1.0) / 2.0)


def _upper_moment(x: np.ndarray, d: int) -> np.ndarray:
    """Integral of t * f(t) from x to 1, in closed form: (1 - x^2)^(a+1) / (2 (a+1) B(1/2, a+1))."""
    alpha = (d - 3) / 2
    one_minus = np.clip(1.0 - np.asarray(x, dtype=np.float64) ** 2, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        log_val = (alpha + 1) * np.log(one_minus) - np.log(2 * (alpha + 1)) - betaln(0.5, alpha + 1)
    return np.exp(log_val)


def _cell_stats(boundaries: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Probability mass and first moment of each cell between consecutive edges (-1 and 1 outside)."""
    edges = np.concatenate(([-1.0], boundaries, [1.0]))
    mass = np.diff(_cdf(edges, d))
    moment = -np.diff(_upper_moment(edges, d))
    return mass, moment


def coordinate_mse(centroids: np.ndarray, head_dim: int) -> float:
    """E[(x - q(x))^2] for nearest-centroid quantisation of one coordinate."""
    centroids = np.sort(np.asarray(centroids, dtype=np.float64))
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    mass, moment = _cell_stats(boundaries, head_dim)
    # E[x^2] = 1/d; E[(x-c)^2] per cell = E[x^2 1_cell] - 2 c m + c^2 p
    second = 1.0 / head_dim
    return float(second - np.sum(2 * centroids * moment - centroids**2 * mass))


@cache
def lloyd_max(bits: int, head_dim: int, tol: float = 1e-13, max_iter: int = 20000) -> Codebook:
    """The MSE-optimal scalar quantiser for one rotated coordinate (cached per (bits, head_dim))."""
    if bits not in CODEBOOK_BITS:
        raise ValueError(f"codebook bits must be one of {CODEBOOK_BITS}, got {bits}")
    check_head_dim(head_dim)
    levels = 1 << bits
    a = (head_dim - 1) / 2
    centroids = 2.0 * betaincinv(a, a, (np.arange(levels) + 0.5) / levels) - 1.0
    for _ in range(max_iter):
        boundaries = (centroids[1:] + centroids[:-1]) / 2
        mass, moment = _cell_stats(boundaries, head_dim)
        updated = moment / mass
        step = np.max(np.abs(updated - centroids)) * np.sqrt(head_dim)
        centroids = updated
        if step < tol:
            break
    # Symmetric law: enforce exact antisymmetry so +x and -x quantise alike.
    centroids = (centroids - centroids[::-1]) / 2
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return Codebook(bits, head_dim, centroids, boundaries)


E4M3_MAX_STEPS = 512  # factors tried per octave by e4m3_scale


def e4m3_scale(centroids: np.ndarray, head_dim: int) -> float:
    """The factor alpha for which alpha * centroids, rounded to e4m3, add the least to the quantisation MSE.

    An fp8 score MMA (Tiles.fp8_keys) reads keys as e4m3 bytes. Each centroid is its cell's mean, so replacing c
    by c' adds mass * (c' - c)^2 and nothing else; the rounding pattern repeats every octave of alpha, so one
    octave is searched, placed so the largest centroid lands in [8, 16) and every centroid stays a normal number.
    """
    centroids = np.asarray(centroids, dtype=np.float64)
    mass, _ = _cell_stats((centroids[1:] + centroids[:-1]) / 2, head_dim)
    base = 8.0 * 2.0 ** -np.floor(np.log2(np.abs(centroids).max()))
    alphas = base * 2.0 ** (np.arange(E4M3_MAX_STEPS) / E4M3_MAX_STEPS)
    scaled = torch.tensor(alphas[:, None] * centroids[None, :])
    rounded = scaled.to(torch.float8_e4m3fn).to(torch.float64).numpy() / alphas[:, None]
    added = ((rounded - centroids[None, :]) ** 2 * mass[None, :]).sum(1)
    return float(alphas[int(np.argmin(added))])
