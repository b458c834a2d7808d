"""What paged_attention checks before it launches: shapes, dtypes, devices and the optional tables, each with an
error that names the argument (a bad launch would read or write past a buffer instead of failing)."""

from __future__ import annotations

import torch

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode_tiles
from turboquant_vllm.kernels.decode_reduce import MAX_LIVE_SEQS
from turboquant_vllm.kernels.recent import SEGMENT, RecentTable
from turboquant_vllm.kernels.sinks import SinkTable
from turboquant_vllm.kernels.store import check_slots
from turboquant_vllm.key_offset import KeyOffset, check_key_offset

QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_rows(name: str, x: torch.Tensor, rows: int, heads: int, head_dim: int) -> None:
    assert x.dim() == 3 and x.shape[0] >= rows and x.shape[1:] == (heads, head_dim), (
        f"{name} must be [>= {rows}, {heads}, {head_dim}], got {tuple(x.shape)}"
    )
    assert x.dtype in QUERY_DTYPES, f"{name} must be fp16/bf16/fp32, got {x.dtype}"


def check_attention_args(
    codec: KVCodec,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor,
    num_splits: int,
    split_slots: int,
    key_offset: KeyOffset | None,
    store_slots: torch.Tensor | None,
    sinks: SinkTable | None,
    recent: RecentTable | None,
) -> torch.Tensor | None:
    """Assert that paged_attention's arguments fit `codec` and each other; return the key offset in the rotated
    basis (None without one)."""
    lay = codec.layout
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = lay.num_kv_heads
    assert head_dim == lay.head_dim and num_heads % num_kv_heads == 0, (
        f"query {tuple(query.shape)} does not fit a layout of {num_kv_heads} KV heads x {lay.head_dim}"
    )
    _check_rows("query", query, num_tokens, num_heads, head_dim)
    _check_rows("key", key, num_tokens, num_kv_heads, head_dim)
    _check_rows("value", value, num_tokens, num_kv_heads, head_dim)
    assert out.shape == query.shape and out.dtype in QUERY_DTYPES, (
        f"out must be {tuple(query.shape)} fp16/bf16/fp32, got {out.dtype} {tuple(out.shape)}"
    )
    assert cache.dtype == torch.uint8 and cache.dim() == 3 and cache.shape[2] == lay.bytes_per_token, (
        f"cache must be uint8 [num_blocks, block_size, {lay.bytes_per_token}], got {cache.dtype} {tuple(cache.shape)}"
    )
    assert cache.is_contiguous() and cache.data_ptr() % 16 == 0, (
        f"cache pages must be contiguous and 16-byte aligned, got strides {cache.stride()} at {cache.data_ptr():#x}"
    )
    num_seqs = query_start_loc.shape[0] - 1
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        assert t.dtype in INDEX_DTYPES, f"{name} must be int32/int64, got {t.dtype}"
    assert block_table.dim() == 2 and block_table.stride(1) == 1, "block_table must be [num_seqs, max_blocks]"
    assert block_table.shape[0] >= num_seqs and seq_lens.shape[0] >= num_seqs, "fewer block_table/seq_lens rows"
    assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"
    live_ok = num_seqs <= MAX_LIVE_SEQS and decode_tiles.live_split_tiles(head_dim, num_splits)
    assert split_slots == 0 or live_ok, f"split_slots: {num_splits} splits, {num_seqs} seqs (choose_split_grid)"
    rot = codec.rotation
    devices = {t.device for t in (query, key, value, cache, block_table, seq_lens, query_start_loc, out, rot)}
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
    offset = check_key_offset(key_offset, num_kv_heads, head_dim, cache.device, rotated=True)
    if sinks is not None:
        sinks.check(num_kv_heads, head_dim, cache.device)
    if recent is not None:
        recent.check(num_kv_heads, head_dim, cache.device)
        assert cache.shape[1] % SEGMENT == 0, f"recent tokens need block_size % {SEGMENT} == 0, got {cache.shape[1]}"
    if store_slots is not None:
        check_slots(store_slots, num_tokens, cache.device)
        assert key.stride(2) == 1 and value.stride(2) == 1, "a fused store needs key/value contiguous in head_dim"
    return offset
