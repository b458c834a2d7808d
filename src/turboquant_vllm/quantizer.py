"""TurboQuant_mse in torch (Algorithm 1 of arXiv 2504.19874): the reference every kernel matches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turboquant_vllm.codebook import lloyd_max
from turboquant_vllm.config import TQConfig
from turboquant_vllm.rotation import rotation_matrix

# Below this norm a vector is treated as zero: it dequantises to exactly 0.
TINY_NORM = 1e-30


@dataclass
class QuantizedVectors:
    """Indices into the codebook [..., d] (uint8) and one fp32 scale per vector [...]."""

    indices: torch.Tensor
    scales: torch.Tensor


class MSEQuantizer:
    """Rotate, quantise each coordinate with a Lloyd-Max codebook, keep one fp32 scale.

    The scale is ||x|| without norm correction, and ||x|| / ||c[idx]|| with it, so the
    dequantised vector has exactly the input's length.
    """

    def __init__(
        self,
        head_dim: int,
        bits: int,
        config: TQConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config or TQConfig()
        self.config.check_head_dim(head_dim)
        self.head_dim = head_dim
        self.bits = bits
        codebook = lloyd_max(bits, head_dim)
        self.centroids = codebook.centroids_tensor(device)
        self.boundaries = codebook.boundaries_tensor(device)
        self.rotation = rotation_matrix(self.config, head_dim, device)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) @ self.rotation.T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.rotation

    def quantize(self, x: torch.Tensor) -> QuantizedVectors:
        """Quantise vectors.

        Args:
            x: [..., head_dim], any float dtype.
        """
        x32 = x.to(torch.float32)
        norms = torch.linalg.vector_norm(x32, dim=-1)
        unit = x32 / norms.clamp_min(TINY_NORM).unsqueeze(-1)
        rotated = self.rotate(unit)
        indices = torch.bucketize(rotated, self.boundaries)
        if self.config.norm_correction:
            recon_norm = torch.linalg.vector_norm(self.centroids[indices], dim=-1)
            scales = norms / recon_norm.clamp_min(TINY_NORM)
        else:
            scales = norms
        return QuantizedVectors(indices.to(torch.uint8), scales)

    def dequantize_rotated(self, q: QuantizedVectors) -> torch.Tensor:
        """fp32 vectors in the rotated basis: centroids[idx] * scale."""
        return self.centroids[q.indices.long()] * q.scales.unsqueeze(-1)

    def dequantize(self, q: QuantizedVectors) -> torch.Tensor:
        """fp32 vectors in the original basis."""
        return self.unrotate(self.dequantize_rotated(q))
