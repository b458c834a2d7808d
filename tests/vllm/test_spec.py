"""TQ4FullAttentionSpec page maths and the additional_config route for settings."""

from types import SimpleNamespace

import pytest
import torch

from turboquant_vllm.config import TQConfig, TQConfigError
from turboquant_vllm.vllm.spec import TQ4FullAttentionSpec, tq_config_from


def spec(bytes_per_token: int = 1088, **kw) -> TQ4FullAttentionSpec:
    base = dict(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.uint8)
    return TQ4FullAttentionSpec(**{**base, **kw}, bytes_per_token=bytes_per_token)


def test_page_is_block_size_times_packed_row():
    s = spec()
    assert s.page_size_bytes == 16 * 1088
    bf16_page = 16 * 8 * 128 * 2 * 2
    assert bf16_page / s.page_size_bytes == pytest.approx(3.7647, rel=1e-4)


def test_merge_keeps_the_row_size():
    merged = TQ4FullAttentionSpec.merge([spec(), spec()])
    assert isinstance(merged, TQ4FullAttentionSpec)
    assert merged.bytes_per_token == 1088 and merged.page_size_bytes == 16 * 1088


def test_merge_rejects_mixed_row_sizes():
    with pytest.raises((ValueError, AssertionError)):
        TQ4FullAttentionSpec.merge([spec(1088), spec(832)])


def test_block_size_change_keeps_row_size():
    s = spec().copy_with_new_block_size(32)
    assert s.bytes_per_token == 1088 and s.page_size_bytes == 32 * 1088


def test_config_from_additional_config():
    cfg = SimpleNamespace(additional_config={"turboquant": {"k_bits": 4, "v_bits": 3}})
    assert tq_config_from(cfg) == TQConfig(k_bits=4, v_bits=3)
    assert tq_config_from(SimpleNamespace(additional_config={})) == TQConfig()
    assert tq_config_from(None) == TQConfig()


@pytest.mark.parametrize("bad", [{"k_bits": 5}, {"v_bits": 1}, {"bits": 4}])
def test_bad_additional_config_names_the_problem(bad):
    with pytest.raises(TQConfigError, match="bits"):
        tq_config_from(SimpleNamespace(additional_config={"turboquant": bad}))
    with pytest.raises(TQConfigError, match="JSON object"):
        tq_config_from(SimpleNamespace(additional_config={"turboquant": 4}))
