"""PageLayout: sizes and offsets of the packed row, checked against hand-computed values."""

import pytest

from turboquant_vllm.config import TQConfig, TQConfigError
from turboquant_vllm.layout import PageLayout


def test_llama8b_4_4_is_68_bytes_per_head_per_tensor():
    lay = PageLayout(num_kv_heads=8, head_dim=128, k_bits=4, v_bits=4)
    assert lay.k_index_bytes == 64 and lay.v_index_bytes == 64
    assert lay.bytes_per_token == 8 * (64 + 4) * 2 == 1088
    assert lay.bytes_per_token_per_head == 136
    assert lay.compression_vs(2) == pytest.approx(4096 / 1088)
    assert round(lay.compression_vs(2), 2) == 3.76


def test_offsets_are_contiguous_regions():
    lay = PageLayout(num_kv_heads=3, head_dim=64, k_bits=4, v_bits=2)
    assert lay.k_index_offset == 0
    assert lay.k_scale_offset == 3 * 32
    assert lay.v_index_offset == 3 * 32 + 12
    assert lay.v_scale_offset == 3 * 32 + 12 + 3 * 16
    assert lay.bytes_per_token == 3 * 32 + 12 + 3 * 16 + 12


def test_three_bit_is_really_smaller_than_four():
    four = PageLayout(8, 128, 4, 4).bytes_per_token
    three = PageLayout(8, 128, 3, 3).bytes_per_token
    two = PageLayout(8, 128, 2, 2).bytes_per_token
    assert (four, three, two) == (1088, 8 * (48 + 4) * 2, 8 * (32 + 4) * 2)


def test_scales_are_4_byte_aligned_with_padding_only_when_needed():
    lay = PageLayout(num_kv_heads=1, head_dim=40, k_bits=3, v_bits=3)  # 15 index bytes
    assert lay.k_scale_offset == 16 and lay.v_scale_offset % 4 == 0
    assert lay.bytes_per_token == 16 + 4 + 16 + 4
    for heads in (1, 2, 3, 8):
        for d in (32, 64, 96, 128, 256):
            for kb in (2, 3, 4):
                for vb in (2, 3, 4):
                    lay = PageLayout(heads, d, kb, vb)
                    assert lay.k_scale_offset % 4 == 0 and lay.v_scale_offset % 4 == 0
                    assert lay.bytes_per_token % 4 == 0
                    exact = heads * (d * kb // 8 + d * vb // 8 + 8)
                    assert exact <= lay.bytes_per_token <= exact + 6


def test_page_bytes_and_from_config():
    lay = PageLayout.from_config(TQConfig(k_bits=4, v_bits=3), num_kv_heads=8, head_dim=128)
    assert (lay.k_bits, lay.v_bits) == (4, 3)
    assert lay.page_bytes(16) == 16 * lay.bytes_per_token


def test_rejects_bad_shapes():
    with pytest.raises(TQConfigError):
        PageLayout(8, 100, 4, 4)
    with pytest.raises(TQConfigError):
        PageLayout(8, 128, 5, 4)
    with pytest.raises(ValueError):
        PageLayout(0, 128, 4, 4)
