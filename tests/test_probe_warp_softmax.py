"""benchmarks/probe_warp_softmax.py's toy loops compute attention, so the code it compiles and times is of real
attention: each form against fp32 torch over the same centroids (codebook gather, under TRITON_INTERPRET=1),
with two programs, each over its own tiles."""

import pytest
import torch

FORMS = [
    "cta",
    "warp",
    "warp_rows",
    "warp_rows_k_fragment",
    "warp_k_fragment",
    "cta_fp8_k",
    "cta_fragment",
    "cta_fp8_k_fragment",
    "cta_fp8_kv_fragment",
    "cta_fp8_kv_halves_fragment",
    "cta_fp8_kv_token_major_fragment",
    "cta_fp8_kv_slot_order_fragment",
]


@pytest.mark.parametrize("form", FORMS)
def test_probe_forms_compute_attention(benchmark_script, device, form):
    probe = benchmark_script("probe_warp_softmax")
    assert list(probe.FORMS) == FORMS
    programs, n_tiles = 2, 2
    inputs = probe.probe_inputs(programs, n_tiles, "cpu", seed=5)
    # Queries that e4m3 holds exactly: Triton 3.6's interpreter rounds some values to e4m3 wrongly (1.98 -> 1.0,
    # a mantissa carry lost), which the GPU does not; the keys' scaled centroids round right there.
    inputs["q_ptr"] = inputs["q_ptr"].to(torch.float8_e4m3fn).float()
    out = torch.full((programs, probe.ROWS, probe.DIM), float("nan"), device=device)
    probe._probe_kernel[(programs,)](*(t.to(device) for t in inputs.values()), out, n_tiles,
                                     WARP_SPLIT=probe.FORMS[form], LUT=False, num_warps=probe.WARPS,
                                     **probe.CONSTANTS)  # fmt: skip
    for program in range(programs):
        want = probe.torch_reference(inputs, program, n_tiles, **probe.reference_options(form))
        err = (out[program].cpu() - want).abs().max() / want.abs().max()
        assert err < 2e-2, f"{form}, program {program}: max |err| / max |ref| = {err:.3g}"


def test_fp8_table_rounds_the_codebook(benchmark_script):
    """The e4m3 table holds FP8_ALPHA * |c| for ranks 0-7 (centroid 8 + r), within e4m3's rounding of each."""
    probe = benchmark_script("probe_warp_softmax")
    table = probe.fp8_table(probe.CENTROIDS, probe.FP8_ALPHA).view(torch.uint8).view(torch.float8_e4m3fn).float()
    want = probe.CENTROIDS[8:].float() * probe.FP8_ALPHA
    assert 2 <= want.max() < 4
    assert torch.all((table - want).abs() <= want * 2**-4), (table, want)
