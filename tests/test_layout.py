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


def test_page_is_head_runs_of_field_runs():
    lay = PageLayout(num_kv_heads=3, head_dim=64, k_bits=4, v_bits=2)  # 32 + 16 index bytes per head
    f = lay.fields(16)
    assert (f.k_index, f.k_scale, f.v_index, f.v_scale) == (0, 16 * 32, 16 * 36, 16 * 36 + 16 * 16)
    assert f.run_bytes == 16 * (32 + 4 + 16 + 4) and 3 * f.run_bytes == lay.page_bytes(16)
    consts = lay.kernel_constants(16)
    assert consts["PAGE_BYTES"] == lay.page_bytes(16) and consts["RUN_BYTES"] == f.run_bytes
    assert consts["BLOCK_SIZE"] == 16 and consts["V_INDEX_BYTES"] == 16


def test_block_size_must_keep_fields_aligned():
    lay = PageLayout(num_kv_heads=1, head_dim=40, k_bits=3, v_bits=3)  # 15 index bytes
    with pytest.raises(ValueError, match="multiple of 4"):
        lay.fields(6)
    for heads in (1, 2, 3, 8):
        for d in (32, 40, 64, 96, 128, 256):
            for kb in (2, 3, 4):
                for vb in (2, 3, 4):
                    lay = PageLayout(heads, d, kb, vb)
                    for block_size in (4, 16, 32):
                        f = lay.fields(block_size)
                        assert f.k_scale % 4 == 0 and f.v_index % 4 == 0 and f.v_scale % 4 == 0
                        assert f.run_bytes % 4 == 0 and heads * f.run_bytes == lay.page_bytes(block_size)


def test_three_bit_is_really_smaller_than_four():
    four = PageLayout(8, 128, 4, 4).bytes_per_token
    three = PageLayout(8, 128, 3, 3).bytes_per_token
    two = PageLayout(8, 128, 2, 2).bytes_per_token
    assert (four, three, two) == (1088, 8 * (48 + 4) * 2, 8 * (32 + 4) * 2)


def test_no_padding_bytes():
    for heads in (1, 3, 8):
        for d in (40, 64, 128):
            lay = PageLayout(heads, d, 3, 2)
            assert lay.bytes_per_token == heads * (d * 3 // 8 + d * 2 // 8 + 8)


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
