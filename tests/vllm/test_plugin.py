"""register(): idempotent CUSTOM registration and a spec hook that leaves other backends alone."""

from types import SimpleNamespace

import pytest
import torch
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

from turboquant_vllm.vllm import plugin
from turboquant_vllm.vllm.backend import TQ4AttentionBackend
from turboquant_vllm.vllm.spec import TQ4FullAttentionSpec


def bf16_spec(**kw) -> FullAttentionSpec:
    return FullAttentionSpec(**{**dict(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16), **kw})


@pytest.fixture
def registered():
    plugin.register()
    yield
    # registration is process-wide by design; nothing to undo


def test_registers_custom_once(registered):
    hook = Attention.get_kv_cache_spec
    plugin.register()
    assert Attention.get_kv_cache_spec is hook
    assert AttentionBackendEnum.CUSTOM.get_path() == "turboquant_vllm.vllm.backend.TQ4AttentionBackend"
    assert AttentionBackendEnum.CUSTOM.get_class() is TQ4AttentionBackend


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "turboquant_vllm"]
    assert eps and eps[0].value == "turboquant_vllm.vllm.plugin:register"


def _call_hook(backend, returned_spec, vllm_config=None):
    hook = plugin._with_packed_spec(lambda self, cfg: returned_spec)
    return hook(SimpleNamespace(attn_backend=backend), vllm_config or SimpleNamespace(additional_config={}))


@pytest.mark.parametrize("backend_name", ["FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"])
def test_hook_is_inert_for_other_backends(backend_name):
    original = bf16_spec()
    backend = AttentionBackendEnum[backend_name].get_class()
    assert _call_hook(backend, original) is original
    assert _call_hook(None, original) is original
    assert _call_hook(backend, None) is None


def test_hook_packs_for_our_backend():
    packed = _call_hook(TQ4AttentionBackend, bf16_spec())
    assert isinstance(packed, TQ4FullAttentionSpec)
    assert packed.dtype == torch.uint8 and packed.bytes_per_token == 1088
    assert packed.page_size_bytes * 4096 / 1088 == bf16_spec().page_size_bytes


def test_hook_uses_configured_bits():
    cfg = SimpleNamespace(additional_config={"turboquant": {"k_bits": 3, "v_bits": 2}})
    packed = _call_hook(TQ4AttentionBackend, bf16_spec(), cfg)
    assert packed.bytes_per_token == 8 * (48 + 4 + 32 + 4)


def test_hook_refuses_sliding_window():
    sw = SlidingWindowSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16, sliding_window=512)
    with pytest.raises(ValueError, match="full attention only"):
        _call_hook(TQ4AttentionBackend, sw)
