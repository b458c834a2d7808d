"""KV-cache spec whose page is the packed TurboQuant row size, and where the settings come from."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Self

from vllm.v1.kv_cache_interface import FullAttentionSpec

from turboquant_vllm.config import TQConfig, TQConfigError

CONFIG_KEY = "turboquant"  # vLLM's additional_config["turboquant"] = {"k_bits": 4, "v_bits": 4, ...}


def tq_config_from(vllm_config: Any | None) -> TQConfig:
    """TQConfig from `--additional-config '{"turboquant": {...}}'` (defaults when absent).

    additional_config travels with VllmConfig to the engine core and every worker, so each
    process reads the same settings; they are validated here, before any cache exists.
    """
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict):
        return TQConfig()
    values = extra.get(CONFIG_KEY)
    if values is not None and not isinstance(values, dict):
        raise TQConfigError(f'additional_config["{CONFIG_KEY}"] must be a JSON object, got {values!r}')
    return TQConfig.from_dict(values)


def current_tq_config() -> TQConfig:
    """The TQConfig of the vLLM config being built in this process (defaults outside vLLM)."""
    from vllm.config import get_current_vllm_config_or_none

    return tq_config_from(get_current_vllm_config_or_none())


_SIZES_PAGES_FROM_CONTENT = "state_content_bytes" in {f.name for f in fields(FullAttentionSpec)}


@dataclass(frozen=True, kw_only=True)
class TQ4FullAttentionSpec(FullAttentionSpec):
    """FullAttentionSpec whose page is `block_size * bytes_per_token` uint8 (layout.PageLayout).

    The block allocator sizes buffers from real_page_size_bytes, so the KV capacity vLLM
    reports is the packed one (3.76x bf16 at 4/4, head_dim 128).
    """

    bytes_per_token: int = 0

    def __post_init__(self) -> None:
        base_post_init = getattr(super(), "__post_init__", None)
        if base_post_init is not None:
            base_post_init()
        if _SIZES_PAGES_FROM_CONTENT:
            # vLLM >= 0.28 sizes a page as head slots x block_size x content bytes (and from 0.29 views each layer's
            # cache in that shape): one slot holding the whole packed row. Its merge rebuilds specs from base fields.
            if not self.bytes_per_token and self.state_content_bytes:
                object.__setattr__(self, "bytes_per_token", self.state_content_bytes)
            object.__setattr__(self, "num_head_slots", 1)
            object.__setattr__(self, "state_content_bytes", self.bytes_per_token)

    @property
    def real_page_size_bytes(self) -> int:
        return self.block_size * self.bytes_per_token

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        # The base merge rebuilds from base fields only and would drop bytes_per_token.
        merged = super().merge(specs)
        sizes = {s.bytes_per_token for s in specs}
        if len(sizes) != 1:
            raise ValueError(f"layers of one KV-cache group disagree on TurboQuant row size: {sorted(sizes)}")
        return replace(merged, bytes_per_token=sizes.pop())
