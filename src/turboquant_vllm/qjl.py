"""TurboQuant_prod (Algorithm 2 of arXiv 2504.19874): an unbiased inner-product quantiser.

A (b-1)-bit MSE stage plus a 1-bit QJL sketch of the residual r:
    x_hat = x_mse + sqrt(pi/2) / d * ||r|| * S^T sign(S r),   S ~ N(0, 1)^{d x d},
so E[<y, x_hat>] = <y, x>. Reference only: the kernels serve TurboQuant_mse.
"""

from __future__ import annotations

import math

import torch

from turboquant_vllm.config import TQConfig
from turboquant_vllm.quantizer import MSEQuantizer, QuantizedVectors
from turboquant_vllm.rotation import _generator


class ProdQuantizer:
    """b bits per coordinate in total: b-1 for the MSE stage, 1 for the residual's signs."""

    def __init__(self, head_dim: int, bits: int, config: TQConfig | None = None, sketch_seed: int = 0) -> None:
        if bits < 2:
            raise ValueError("TurboQuant_prod needs at least 2 bits (1 MSE + 1 QJL)")
        self.head_dim = head_dim
        self.mse = MSEQuantizer(head_dim, bits - 1, config or TQConfig(norm_correction=False))
        gen = _generator(sketch_seed, head_dim, "qjl")
        self.sketch = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float32)

    def quantize(self, x: torch.Tensor) -> tuple[QuantizedVectors, torch.Tensor, torch.Tensor]:
        """Return (MSE stage, residual signs [..., d] in {-1, +1}, residual norms [...])."""
        x32 = x.to(torch.float32)
        stage = self.mse.quantize(x32)
        residual = x32 - self.mse.dequantize(stage)
        signs = torch.where(residual @ self.sketch.T >= 0, 1.0, -1.0)
        return stage, signs, torch.linalg.vector_norm(residual, dim=-1)

    def dequantize(self, stage: QuantizedVectors, signs: torch.Tensor, residual_norms: torch.Tensor) -> torch.Tensor:
        qjl = math.sqrt(math.pi / 2) / self.head_dim * residual_norms.unsqueeze(-1) * (signs @ self.sketch)
        return self.mse.dequantize(stage) + qjl
