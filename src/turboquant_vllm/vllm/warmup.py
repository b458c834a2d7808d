"""Compile the backend's Triton launch shapes while vLLM starts, not when a request first needs them.

CUDA-graph capture compiles only the decode launches of pure decode batches. The store kernel's launch shapes, the
prefill path's dequantisation and the decode launches of mixed steps (which, unlike pure one-decode steps, do not
store the new K/V) would otherwise compile inside a running request, a stall of about a second each that vLLM's JIT
monitor logs (engine_h200_2026-11-30j_ours.log, engine_h200_2026-12-01i_ours.log). Triton compiles a variant per
16-divisibility of integer arguments, so the block table here is as wide as vLLM's: its row stride is one of them.
"""

from __future__ import annotations

import torch
import triton

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels.decode import paged_attention
from turboquant_vllm.kernels.decode_tiles import WIDE_MIN_SPLITS, decode_step_stores, window_in_store
from turboquant_vllm.kernels.dequant import dequantize_kv
from turboquant_vllm.kernels.pdl import pdl_launch
from turboquant_vllm.kernels.recent import RecentTable, write_recent
from turboquant_vllm.kernels.sinks import MIN_ENTRIES, SinkTable, write_sinks
from turboquant_vllm.kernels.store import LARGE_BATCH_TOKENS, SMALL_BATCH_TOKENS, store_kv
from turboquant_vllm.kernels.workspace import AttentionWorkspace
from turboquant_vllm.key_offset import KeyOffset

STORE_TOKENS = (1, SMALL_BATCH_TOKENS + 1, LARGE_BATCH_TOKENS)  # one batch per launch shape of store_kv
DECODE_SPLITS = (1, 2, WIDE_MIN_SPLITS)  # fused, split-K, split-K with the wide tiles


def warm_up_kernels(
    codec: KVCodec,
    num_heads: int,
    dtype: torch.dtype,
    block_size: int,
    key_offset: bool,
    workspace: AttentionWorkspace,
    max_blocks_per_seq: int = 1,
    sink_tokens: int = 0,
    recent_tokens: int = 0,
) -> None:
    """Run every launch shape once on a small scratch cache (zeros in, results discarded).

    max_blocks_per_seq: the width of vLLM's block table, whose row stride the attention kernel is compiled for.
    sink_tokens, recent_tokens: the config's exact tables: the attention launches read scratch ones, and their
        writers run once.
    """
    device = codec.rotation.device
    num_kv_heads, head_dim = codec.num_kv_heads, codec.head_dim
    tokens = max(STORE_TOKENS)
    num_blocks = triton.cdiv(tokens + 1, block_size)
    cache = codec.new_cache(num_blocks, block_size)
    kv = torch.zeros(tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    offset = None
    if key_offset:
        offset = KeyOffset.build(torch.zeros(num_kv_heads, head_dim), codec.rotation)
    slots = torch.arange(tokens, device=device)
    pdl = pdl_launch(device)
    recent = None
    if recent_tokens:
        recent = RecentTable.allocate(MIN_ENTRIES, recent_tokens, num_kv_heads, head_dim, dtype, device)
    for n in STORE_TOKENS:
        for after_attention in (False, True) if pdl else (False,):  # paged_attention's store_slots, with PDL
            store_kv(codec, kv[:n], kv[:n], cache, slots[:n], offset, after_attention=after_attention)
        if recent is not None and window_in_store(head_dim):  # a decode step's store that writes the window
            store_kv(codec, kv[:n], kv[:n], cache, slots[:n], offset, after_attention=True, recent=recent)
    dequantize_kv(codec, cache, slots[:block_size], dtype, rotated=False, key_offset=offset)  # the prefill path
    query = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    block_table = torch.zeros(1, max(num_blocks, max_blocks_per_seq), dtype=torch.int32, device=device)
    block_table[0, :num_blocks] = torch.arange(num_blocks, dtype=torch.int32, device=device)
    seq_lens = torch.tensor([tokens + 1], dtype=torch.int32, device=device)
    query_start_loc = torch.tensor([0, 1], dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    sinks = None
    if sink_tokens:
        sinks = SinkTable.allocate(MIN_ENTRIES, sink_tokens, num_kv_heads, head_dim, dtype, device)
        write_sinks(sinks, codec.rotation, kv[:1], kv[:1], block_table, seq_lens, query_start_loc)
    if recent is not None:
        write_recent(recent, codec.rotation, kv[:1], kv[:1], block_table, seq_lens, query_start_loc, block_size)
    for num_splits in DECODE_SPLITS:  # with the new token's store where pure decode steps hand it over
        hands_over = decode_step_stores(head_dim, num_splits, pdl, recent is not None)
        for store_slots in (None, slots[:1]) if hands_over else (None,):
            paged_attention(codec, query, kv[:1], kv[:1], cache, block_table, seq_lens, query_start_loc, 1.0, out,
                            max_query_len=1, num_splits=num_splits, workspace=workspace, key_offset=offset,
                            store_slots=store_slots, sinks=sinks, recent=recent,
                            write_recent=recent is not None)  # fmt: skip
