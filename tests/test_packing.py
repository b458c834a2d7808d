"""Bit packing: property tests of the round trip and a bit-level check against a plain Python packer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant_vllm.packing import pack_indices, unpack_indices


def python_pack(values: list[int], bits: int) -> bytes:
    stream = 0
    for j, v in enumerate(values):
        stream |= v << (j * bits)
    return stream.to_bytes(len(values) * bits // 8, "little")


@settings(max_examples=200, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4]),
    groups=st.integers(1, 40),
    lead=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip(bits, groups, lead, seed):
    d = 8 * groups
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1 << bits, (*lead, d), generator=gen).to(torch.uint8)
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, d * bits // 8)
    unpacked = unpack_indices(packed, bits, d)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, idx)


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), data=st.data())
def test_matches_little_endian_bit_stream(bits, data):
    values = data.draw(
        st.lists(st.integers(0, (1 << bits) - 1), min_size=8, max_size=8 * 12).filter(lambda v: len(v) % 8 == 0)
    )
    packed = pack_indices(torch.tensor(values), bits)
    assert bytes(packed.tolist()) == python_pack(values, bits)


def test_three_bits_fill_three_bytes_per_eight():
    idx = torch.arange(8) % 8
    assert pack_indices(idx, 3).shape == (3,)
    assert bytes(pack_indices(idx, 3).tolist()) == python_pack(list(range(8)), 3)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        pack_indices(torch.zeros(12, dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        unpack_indices(torch.zeros(5, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError):
        pack_indices(torch.zeros(8, dtype=torch.uint8), 5)
