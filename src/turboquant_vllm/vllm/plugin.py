"""vLLM general-plugin hook: registers the CUSTOM backend; inert for runs that do not select it."""

from __future__ import annotations

import torch

_registered = False


def register() -> None:
    """Register TQ4AttentionBackend as CUSTOM and teach Attention layers its page size (idempotent).

    Called in every vLLM process through the `vllm.general_plugins` entry point. Runs that do
    not pass `--attention-backend CUSTOM` never reach our classes: the spec hook below returns
    vLLM's own spec unchanged unless the layer's backend is ours.
    """
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, "turboquant_vllm.vllm.backend.TQ4AttentionBackend")
    if not getattr(Attention.get_kv_cache_spec, "_turboquant", False):
        Attention.get_kv_cache_spec = _with_packed_spec(Attention.get_kv_cache_spec)
    _registered = True


def _with_packed_spec(original):
    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        from turboquant_vllm.vllm.backend import TQ4AttentionBackend

        backend = getattr(self, "attn_backend", None)
        if spec is None or not (isinstance(backend, type) and issubclass(backend, TQ4AttentionBackend)):
            return spec
        return packed_spec(spec, vllm_config)

    get_kv_cache_spec._turboquant = True
    get_kv_cache_spec.__wrapped__ = original
    get_kv_cache_spec.__doc__ = original.__doc__
    return get_kv_cache_spec


def packed_spec(spec, vllm_config):
    """vLLM's FullAttentionSpec for a layer -> the same spec with TurboQuant's packed uint8 page."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from turboquant_vllm.layout import PageLayout
    from turboquant_vllm.vllm.spec import TQ4FullAttentionSpec, tq_config_from

    if type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
        raise ValueError(f"the TurboQuant CUSTOM backend serves full attention only, got {type(spec).__name__}")
    if spec.head_size_v != spec.head_size:
        raise ValueError(
            f"the TurboQuant CUSTOM backend needs equal K/V head sizes, got {spec.head_size}/{spec.head_size_v}"
        )
    layout = PageLayout.from_config(tq_config_from(vllm_config), spec.num_kv_heads, spec.head_size)
    return TQ4FullAttentionSpec(
        block_size=spec.block_size,
        num_kv_heads=spec.num_kv_heads,
        head_size=spec.head_size,
        head_size_v=spec.head_size_v,
        dtype=torch.uint8,
        bytes_per_token=layout.bytes_per_token,
    )
