"""benchmarks/probe_warp_softmax.py's toy loops compute attention, so the code it compiles and times is of real
attention: each form against fp32 torch over the same centroids (codebook gather, under TRITON_INTERPRET=1),
with two programs, each over its own tiles."""

import pytest
import torch


def reference(probe, inputs: dict, program: int, n_tiles: int) -> torch.Tensor:
    """fp32 torch attention of one program's tiles: indices unpacked from the words (coordinate 8w + j = nibble j)."""
    rows = slice(program * n_tiles * probe.TILE, (program + 1) * n_tiles * probe.TILE)
    shifts = 4 * torch.arange(8)

    def dequantise(words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        idx = (words[rows].to(torch.int64)[..., None] >> shifts) & 15  # [tokens, WORDS, 8]
        return inputs["cent_ptr"].float()[idx.flatten(1)] * scales[rows, None]

    k = dequantise(inputs["k_ptr"], inputs["ks_ptr"])
    v = dequantise(inputs["v_ptr"], inputs["vs_ptr"])
    q = inputs["q_ptr"].half().float()
    p = torch.softmax((q @ k.T) * torch.log(torch.tensor(2.0)), dim=-1)  # exp2 softmax
    return p @ v


@pytest.mark.parametrize("form", ["cta", "warp", "warp_rows", "warp_rows_k_fragment", "warp_k_fragment"])
def test_probe_forms_compute_attention(benchmark_script, device, form):
    probe = benchmark_script("probe_warp_softmax")
    programs, n_tiles = 2, 2
    inputs = probe.probe_inputs(programs, n_tiles, "cpu", seed=5)
    out = torch.full((programs, probe.ROWS, probe.DIM), float("nan"), device=device)
    probe._probe_kernel[(programs,)](*(t.to(device) for t in inputs.values()), out, n_tiles,
                                     WARP_SPLIT=probe.FORMS[form], LUT=False, num_warps=probe.WARPS,
                                     **probe.CONSTANTS)  # fmt: skip
    for program in range(programs):
        want = reference(probe, inputs, program, n_tiles)
        err = (out[program].cpu() - want).abs().max() / want.abs().max()
        assert err < 2e-2, f"{form}, program {program}: max |err| / max |ref| = {err:.3g}"
