"""benchmarks/probe_fp8_scores.py's fp8 value product: the online softmax's P, rounded tile by tile, against a plain
loop over tiles (the decode kernel's order of operations) and against exact attention."""

import math

import pytest
import torch


def online_softmax_loop(scores, values_int, norms, centroids, tile, halves):
    """One query row at a time, one tile at a time: running max, P times the norms rounded to e4m3, fp32 rescale."""
    e4m3 = torch.float8_e4m3fn
    out = torch.zeros(scores.shape[0], centroids[values_int].shape[-1], dtype=torch.float64)
    for i in range(scores.shape[0]):
        m, l_sum, acc = -math.inf, 0.0, torch.zeros(out.shape[1], dtype=torch.float64)
        for start in range(0, scores.shape[1], tile):
            s = scores[i, start : start + tile]
            m_new = max(m, float(s.max()))
            if m_new == -math.inf:
                continue
            p = torch.exp2(s - m_new)
            pv = p * norms[start : start + tile]
            p8 = pv.to(e4m3).float()
            if halves:
                p8 = p8 + (pv - p8).to(e4m3).float()
            scale = 2.0 ** (m - m_new) if m > -math.inf else 0.0
            l_sum = l_sum * scale + float(p.double().sum())
            acc = acc * scale + (p8.double() @ centroids[values_int[start : start + tile]].double())
            m = m_new
        out[i] = acc / l_sum
    return out.float()


@pytest.mark.parametrize("halves", [False, True])
def test_fp8_value_product_is_the_online_softmax(benchmark_script, halves):
    probe = benchmark_script("probe_fp8_scores")
    g = torch.Generator().manual_seed(3)
    queries, keys, dim = 5, 150, 8  # 150 keys: two full tiles and a ragged one
    scores = torch.randn(queries, keys, generator=g) * 4
    scores[:, 100:] -= 12  # a later tile far below the first max: its P lands among e4m3's subnormals
    scores[0, 70:] = float("-inf")  # a masked tail
    indices = torch.randint(0, 16, (keys, dim), generator=g)
    norms = torch.rand(keys, generator=g) * 3 + 0.1
    centroids = torch.linspace(-2, 2, 16)
    got = probe.fp8_value_product(scores, indices, norms, centroids, halves)
    want = online_softmax_loop(scores, indices, norms, centroids, probe.TILE, halves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    exact = torch.softmax(scores * math.log(2.0), -1) @ (centroids[indices] * norms[:, None])
    err = (got - exact).abs().max() / exact.abs().max()
    assert err < (1e-2 if halves else 6e-2), err  # e4m3 keeps 3 mantissa bits; the halves about 7
    assert err > 0  # the rounding is there
