"""benchmarks/probe_value_store.py's three stores of 4-bit value indices (under TRITON_INTERPRET=1 on CPU): each
leaves exactly the batch's indices at its slots, read back in torch, and no other word changes."""

import pytest
import torch


@pytest.mark.parametrize("form", ["token_major", "coord_atomic", "coord_group"])
@pytest.mark.parametrize("shape", ["tiny", "decode"])
def test_store_writes_the_indices_and_nothing_else(benchmark_script, device, form, shape):
    probe = benchmark_script("probe_value_store")
    heads = 2
    idx, slots, num_pages = probe.batch(shape, heads, device, seed=1)
    pages = torch.randint(-(2**31), 2**31 - 1, (num_pages, heads, probe.PAGE_WORDS), dtype=torch.int32)
    pages = pages.to(device)
    before = pages.clone()
    probe.store(form, idx, slots, pages)
    assert torch.equal(probe.read_back(form, pages, slots), idx.long())
    # every other slot keeps its old indices: rewrite the batch's slots with the old ones and compare whole pages
    old = probe.read_back(form, before, slots).to(torch.int32)
    probe.store(form, old, slots, pages)
    assert torch.equal(pages, before)
