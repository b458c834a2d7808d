"""Measured KV-cache bytes: the real model prefilled once with DynamicCache and once per compressed cache."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from turboquant_vllm.eval.quality import CacheSpec, chunk_logits, spec_name
from turboquant_vllm.kv_cache import CompressedDynamicCache, dynamic_cache_bytes


def prefill(model: torch.nn.Module, tokens: Sequence[int], chunk: int, cache: Cache) -> Cache:
    """Run tokens through the model chunk by chunk into cache (logits of the last position only)."""
    ids = torch.tensor([list(tokens)], dtype=torch.long)
    deque(chunk_logits(model, ids, chunk, cache, logits_to_keep=1), maxlen=0)
    return cache


def memory_specs(specs: Sequence[CacheSpec]) -> list[CacheSpec]:
    """One spec per stored format: norm correction changes scale values, not bytes, so it is dropped."""
    unique: dict[str, CacheSpec] = {}
    for spec in specs:
        if spec.config is None:
            continue
        config = replace(spec.config, norm_correction=False)
        name = spec_name(config, spec.residual_tokens, spec.center_keys, spec.sink_tokens)
        unique.setdefault(name, CacheSpec(name, config, spec.residual_tokens, spec.center_keys, spec.sink_tokens))
    return list(unique.values())


def kv_memory(model: torch.nn.Module, tokens: Sequence[int], chunk: int, specs: Sequence[CacheSpec]) -> dict[str, Any]:
    """Bytes of the tensors each cache holds after prefilling tokens, and DynamicCache bytes / compressed bytes.

    `ratio` compares against the DynamicCache as measured (the model's dtype); `ratio_vs_bf16` against the
    same K/V elements held in bfloat16, the dtype a server would keep, so an fp32 run does not flatter it.
    """
    exact = prefill(model, tokens, chunk, DynamicCache())
    exact_bytes = dynamic_cache_bytes(exact)
    keys = next(layer.keys for layer in exact.layers if isinstance(getattr(layer, "keys", None), torch.Tensor))
    elements = exact_bytes // keys.element_size()
    layers = len(exact.layers)
    del exact
    result: dict[str, Any] = {
        "tokens": len(tokens),
        "layers": layers,
        "dynamic_cache": {
            "bytes": exact_bytes,
            "dtype": str(keys.dtype).removeprefix("torch."),
            "bf16_bytes": 2 * elements,
        },
        "configs": {},
    }
    for spec in memory_specs(specs):
        cache = prefill(model, tokens, chunk, spec.make(model))
        if not isinstance(cache, CompressedDynamicCache) or cache.get_seq_length() != len(tokens):
            raise RuntimeError(f"{spec.name}: the prefill did not fill a CompressedDynamicCache")
        held = cache.memory_bytes()
        result["configs"][spec.name] = {
            "bytes": held,
            "bytes_per_token_per_layer": held / (len(tokens) * layers),
            "ratio": exact_bytes / held,
            "ratio_vs_bf16": 2 * elements / held,
        }
    return result
