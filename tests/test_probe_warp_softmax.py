"""benchmarks/probe_warp_softmax.py's toy loops compute attention, so the compiled code it compares is of real
attention: each form against fp32 torch over the same centroids (codebook gather, under TRITON_INTERPRET=1)."""

import pytest
import torch

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec


@pytest.mark.parametrize("form", ["cta", "warp", "warp_rows", "warp_rows_k_fragment", "warp_k_fragment"])
def test_probe_forms_compute_attention(benchmark_script, device, form):
    probe = benchmark_script("probe_warp_softmax")
    n_tiles, g = 3, torch.Generator().manual_seed(5)
    tokens = n_tiles * probe.TILE
    centroids = KVCodec(TQConfig(), 1, probe.DIM).key.centroids.to(torch.float16)
    k_idx = torch.randint(0, 16, (tokens, probe.DIM), generator=g)
    v_idx = torch.randint(0, 16, (tokens, probe.DIM), generator=g)
    k_scale, v_scale = torch.rand(tokens, generator=g) + 0.5, torch.rand(tokens, generator=g) + 0.5
    q = torch.randn(probe.ROWS, probe.DIM, generator=g) * 2

    def words(idx: torch.Tensor) -> torch.Tensor:  # coordinate 8w + j = nibble j of word w
        nib = idx.view(tokens, probe.WORDS, 8).to(torch.int64) << (4 * torch.arange(8))
        return nib.sum(-1).to(torch.uint32).view(torch.int32)

    k = centroids.float()[k_idx] * k_scale[:, None]
    v = centroids.float()[v_idx] * v_scale[:, None]
    p = torch.softmax((q.half().float() @ k.T) * torch.log(torch.tensor(2.0)), dim=-1)  # exp2 softmax
    want = p @ v

    out = torch.full((probe.ROWS, probe.DIM), float("nan"), device=device)
    args = [words(k_idx), words(v_idx), k_scale, v_scale, q, torch.zeros(8, dtype=torch.int32), centroids]
    probe._probe_kernel[(1,)](*(a.to(device) for a in args), out, n_tiles, WARP_SPLIT=probe.FORMS[form], LUT=False,
                              num_warps=probe.WARPS, **probe.CONSTANTS)  # fmt: skip
    err = (out.cpu() - want).abs().max() / want.abs().max()
    assert err < 2e-2, f"{form}: max |err| / max |ref| = {err:.3g}"
