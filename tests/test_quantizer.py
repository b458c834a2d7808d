"""TurboQuant_mse reference against brute-force fp64 math."""

import pytest
import torch

from turboquant_vllm.codebook import lloyd_max
from turboquant_vllm.config import TQConfig
from turboquant_vllm.quantizer import MSEQuantizer


def brute_force(x: torch.Tensor, bits: int, cfg: TQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64: nearest centroid by exhaustive distance; the scale by its definition."""
    d = x.shape[-1]
    q = MSEQuantizer(d, bits, cfg)
    r = q.rotation.double()
    c = torch.tensor(lloyd_max(bits, d).centroids)
    x64 = x.double()
    norms = x64.norm(dim=-1)
    y = (x64 / norms.unsqueeze(-1)) @ r.T
    idx = (y.unsqueeze(-1) - c).abs().argmin(-1)
    scale = norms / c[idx].norm(dim=-1) if cfg.norm_correction else norms
    return idx, scale


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("norm_correction", [True, False])
@pytest.mark.parametrize("d", [64, 96, 128])
def test_matches_brute_force(bits, norm_correction, d):
    cfg = TQConfig(norm_correction=norm_correction)
    x = torch.randn(300, d, generator=torch.Generator().manual_seed(d + bits)) * 3
    q = MSEQuantizer(d, bits, cfg).quantize(x)
    idx, scale = brute_force(x, bits, cfg)
    agree = (q.indices.long() == idx).float().mean().item()
    assert agree > 0.9999  # only fp32-vs-fp64 ties at cell boundaries may differ
    torch.testing.assert_close(q.scales.double(), scale, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_distortion_of_random_unit_vectors_matches_theory(bits):
    d = 128
    x = torch.randn(4000, d, generator=torch.Generator().manual_seed(bits))
    x = x / x.norm(dim=-1, keepdim=True)
    quant = MSEQuantizer(d, bits, TQConfig(norm_correction=False))
    err = (quant.dequantize(quant.quantize(x)) - x).pow(2).sum(-1).mean().item()
    assert err == pytest.approx(lloyd_max(bits, d).distortion(), rel=0.05)


def test_norm_correction_restores_length():
    x = torch.randn(50, 128, generator=torch.Generator().manual_seed(0)) * 7
    quant = MSEQuantizer(128, 2, TQConfig(norm_correction=True))
    recon = quant.dequantize(quant.quantize(x))
    torch.testing.assert_close(recon.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


def test_zero_vector_dequantises_to_zero():
    quant = MSEQuantizer(64, 4)
    q = quant.quantize(torch.zeros(3, 64))
    assert torch.equal(quant.dequantize(q), torch.zeros(3, 64))
