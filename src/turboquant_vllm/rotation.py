"""Seeded random rotations: every process and tensor-parallel rank derives the same matrix."""

from __future__ import annotations

import hashlib
from functools import cache

import torch

from turboquant_vllm.config import TQConfig


def _generator(seed: int, head_dim: int, purpose: str) -> torch.Generator:
    # A stable hash (not Python's salted hash()) so every process gets the same stream.
    digest = hashlib.sha256(f"{purpose}:{seed}:{head_dim}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def haar_rotation(seed: int, head_dim: int) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (QR of a Gaussian, signs fixed), float64 [d, d]."""
    g = torch.randn(head_dim, head_dim, generator=_generator(seed, head_dim, "haar"), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def hadamard_matrix(head_dim: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix, float64 [d, d]; d must be a power of two."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"Hadamard needs a power-of-two dimension, got {head_dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / head_dim**0.5


def randomized_hadamard(seed: int, head_dim: int) -> torch.Tensor:
    """H @ diag(random signs): the O(d log d) rotation, materialised as a dense float64 [d, d]."""
    signs = torch.randint(0, 2, (head_dim,), generator=_generator(seed, head_dim, "signs"))
    return hadamard_matrix(head_dim) * (2.0 * signs.to(torch.float64) - 1.0).unsqueeze(0)


@cache
def _rotation_cpu(rotation: str, seed: int, head_dim: int) -> torch.Tensor:
    if rotation == "haar":
        return haar_rotation(seed, head_dim).to(torch.float32)
    return randomized_hadamard(seed, head_dim).to(torch.float32)


def rotation_matrix(config: TQConfig, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthogonal R [d, d] (float32) with rotated = x @ R.T and x = rotated @ R."""
    config.check_head_dim(head_dim)
    return _rotation_cpu(config.rotation, config.seed, head_dim).to(device)


def tf32_parts(rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R as hi + lo, each exactly representable in tf32 (low 13 mantissa bits zero), hi + lo within ~2^-21 of R
    relative: the operands of the store's "tf32_split" rotation."""
    mask = torch.tensor(-(1 << 13), dtype=torch.int32, device=rotation.device)  # 0xFFFFE000

    def truncate(x: torch.Tensor) -> torch.Tensor:
        return (x.contiguous().view(torch.int32) & mask).view(torch.float32)

    hi = truncate(rotation.float())
    return hi, truncate(rotation.float() - hi)
