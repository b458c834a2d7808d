"""TurboQuant_prod: its inner-product estimate is unbiased, with the paper's sqrt(pi/2)/d scaling."""

import pytest
import torch

from turboquant_vllm.qjl import ProdQuantizer


@pytest.mark.parametrize("bits", [2, 3])
def test_inner_product_is_unbiased(bits):
    """Average over independent sketches: the mean error vanishes; a 1/sqrt(d) slip would not."""
    d = 128
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, d, generator=gen)
    y = torch.randn(64, d, generator=gen)
    true = (x * y).sum(-1)
    estimates, mse_only = [], []
    for sketch_seed in range(300):
        pq = ProdQuantizer(d, bits, sketch_seed=sketch_seed)
        stage, signs, rnorm = pq.quantize(x)
        estimates.append((pq.dequantize(stage, signs, rnorm) * y).sum(-1))
        mse_only.append((pq.mse.dequantize(stage) * y).sum(-1))
    est = torch.stack(estimates)
    bias = (est.mean(0) - true).abs().mean().item()
    spread = est.std(0).mean().item() / 300**0.5  # standard error of the mean estimate
    assert bias < 3 * spread
    # The residual term really corrects: the MSE-only estimate (which is biased) stays off.
    mse_bias = (torch.stack(mse_only).mean(0) - true).abs().mean().item()
    assert mse_bias > 5 * bias


def test_wrong_scale_would_be_caught():
    """The same statistic with the sketch scaled by 1/sqrt(d) more is visibly biased."""
    d = 128
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, d, generator=gen)
    y = torch.randn(64, d, generator=gen)
    true = (x * y).sum(-1)
    good, bad = [], []
    for sketch_seed in range(200):
        pq = ProdQuantizer(d, 2, sketch_seed=sketch_seed)
        stage, signs, rnorm = pq.quantize(x)
        base = pq.mse.dequantize(stage)
        corr = pq.dequantize(stage, signs, rnorm) - base
        good.append(((base + corr) * y).sum(-1))
        bad.append(((base + corr / d**0.5) * y).sum(-1))
    good_bias = (torch.stack(good).mean(0) - true).abs().mean()
    bad_bias = (torch.stack(bad).mean(0) - true).abs().mean()
    assert bad_bias > 4 * good_bias


def test_needs_two_bits():
    with pytest.raises(ValueError):
        ProdQuantizer(64, 1)
