"""One attention layer's steps for the vLLM backend tests: the metadata builder, its step metadata, and pages that
hold a batch's cached context."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels.reference import store_ref
from turboquant_vllm.vllm.backend import TQ4MetadataBuilder
from turboquant_vllm.vllm.spec import TQ4FullAttentionSpec


def fake_vllm_config(num_heads: int) -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(
            get_num_attention_heads=lambda parallel_config: num_heads, dtype=torch.bfloat16, max_model_len=4096
        ),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
        speculative_config=None,
        additional_config={},
    )


def make_builder(
    num_heads: int, num_kv_heads: int, head_dim: int, device: str | torch.device = "cpu", block_size: int = 16
) -> TQ4MetadataBuilder:
    spec = TQ4FullAttentionSpec(
        block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_dim, dtype=torch.uint8, bytes_per_token=1
    )
    return TQ4MetadataBuilder(spec, ["layer.0"], fake_vllm_config(num_heads), torch.device(device))


def cache_with_context(codec: KVCodec, batch) -> torch.Tensor:
    """Pages holding the batch's cached context, stored by the torch twin (kernels/reference.py)."""
    cache = codec.new_cache(batch.num_blocks, batch.block_size)
    for k, v, slots in zip(batch.context_key, batch.context_value, batch.context_slots, strict=True):
        store_ref(codec, k, v, cache, slots)
    return cache


def common_metadata(batch) -> CommonAttentionMetadata:
    return CommonAttentionMetadata(
        query_start_loc=batch.query_start_loc,
        query_start_loc_cpu=batch.query_start_loc.cpu(),
        seq_lens=batch.seq_lens,
        num_reqs=len(batch.seq_lens),
        num_actual_tokens=batch.query.shape[0],
        max_query_len=batch.max_query_len,
        max_seq_len=int(batch.seq_lens.max()),
        block_table_tensor=batch.block_table,
        slot_mapping=batch.slot_mapping,
    )
