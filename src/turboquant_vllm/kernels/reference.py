"""Torch twins of the Triton kernels, written the slow, obvious way.

They share only the quantiser and the byte packing with the kernels (both independently
tested against fp64 math), never the kernels' index arithmetic.
"""

from __future__ import annotations

import torch

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.key_offset import use_offset
from turboquant_vllm.packing import pack_indices, unpack_indices
from turboquant_vllm.quantizer import QuantizedVectors


def _row_fields(codec: KVCodec) -> dict[str, tuple[int, int, int]]:
    """(start, bytes per head, bits) of each field of a row, from the layout."""
    lay = codec.layout
    return {
        "k_idx": (lay.k_index_offset, lay.k_index_bytes, lay.k_bits),
        "k_scale": (lay.k_scale_offset, 4, 0),
        "v_idx": (lay.v_index_offset, lay.v_index_bytes, lay.v_bits),
        "v_scale": (lay.v_scale_offset, 4, 0),
    }


def encode_rows_ref(
    codec: KVCodec, key: torch.Tensor, value: torch.Tensor, key_offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantise tokens into packed rows.

    Args:
        key, value: [num_tokens, num_kv_heads, head_dim].
        key_offset: optional fp32 [num_kv_heads, head_dim]: keys it shortens are stored relative to it,
            with their scale negated (turboquant_vllm.key_offset).
    Returns:
        uint8 [num_tokens, bytes_per_token].
    """
    fields = _row_fields(codec)
    rows = torch.zeros(key.shape[0], codec.layout.bytes_per_token, dtype=torch.uint8)
    for name, quantizer, x in (("k", codec.key, key), ("v", codec.value, value)):
        x = x.to(quantizer.rotation.device, torch.float32)
        use = None
        if name == "k" and key_offset is not None:
            offset = key_offset.to(x.device, torch.float32)
            use = use_offset(x, offset)
            x = torch.where(use.unsqueeze(-1), x - offset, x)
        q = quantizer.quantize(x)
        packed = pack_indices(q.indices.cpu(), quantizer.bits)  # [T, H, nbytes]
        scales = q.scales.to(torch.float32)
        scales = (scales if use is None else torch.where(use, -scales, scales)).cpu().contiguous()
        scale_bytes = scales.view(torch.uint8).reshape(*scales.shape, 4)
        for h in range(codec.num_kv_heads):
            start, nbytes, _ = fields[f"{name}_idx"]
            rows[:, start + h * nbytes : start + (h + 1) * nbytes] = packed[:, h]
            start, nbytes, _ = fields[f"{name}_scale"]
            rows[:, start + h * nbytes : start + (h + 1) * nbytes] = scale_bytes[:, h]
    return rows


def decode_rows_ref(codec: KVCodec, rows: torch.Tensor) -> tuple[QuantizedVectors, QuantizedVectors]:
    """Split packed rows [N, bytes_per_token] back into K and V (indices [N, H, d], scales [N, H])."""
    fields = _row_fields(codec)
    out = []
    for name in ("k", "v"):
        start, nbytes, bits = fields[f"{name}_idx"]
        heads_idx = [rows[:, start + h * nbytes : start + (h + 1) * nbytes] for h in range(codec.num_kv_heads)]
        indices = unpack_indices(torch.stack(heads_idx, 1), bits, codec.head_dim)
        start, _, _ = fields[f"{name}_scale"]
        scale_bytes = rows[:, start : start + 4 * codec.num_kv_heads].contiguous()
        out.append(QuantizedVectors(indices, scale_bytes.view(torch.float32).reshape(-1, codec.num_kv_heads)))
    return out[0], out[1]


def store_ref(
    codec: KVCodec,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_offset: torch.Tensor | None = None,
) -> None:
    """Write tokens to the paged cache; slot = block * block_size + offset, negative slots skipped.

    Args:
        key, value: [num_tokens, num_kv_heads, head_dim].
        cache: uint8 [num_blocks, block_size, bytes_per_token], written in place.
        slot_mapping: int [num_tokens].
        key_offset: as in encode_rows_ref.
    """
    rows = encode_rows_ref(codec, key, value, key_offset).to(cache.device)
    flat = cache.view(-1, cache.shape[-1])
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            flat[slot] = rows[t]


def dequantize_ref(
    codec: KVCodec,
    cache: torch.Tensor,
    slots: torch.Tensor,
    rotated: bool = True,
    key_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 K and V [len(slots), num_kv_heads, head_dim] of the given cache slots.

    With rotated=True the vectors stay in the rotated basis (what attention over pages uses).
    key_offset (original basis, as stored) is added back to the keys with a negative scale.
    """
    rows = cache.reshape(-1, cache.shape[-1])[slots.long().to(cache.device)].cpu()
    device = codec.rotation.device  # the codec's tables may live on a GPU; the reference answers on the CPU
    k, v = (QuantizedVectors(x.indices.to(device), x.scales.to(device)) for x in decode_rows_ref(codec, rows))
    shifted = torch.signbit(k.scales)
    k = QuantizedVectors(k.indices, k.scales.abs())
    if rotated:
        keys, values = codec.key.dequantize_rotated(k), codec.value.dequantize_rotated(v)
    else:
        keys, values = codec.key.dequantize(k), codec.value.dequantize(v)
    if key_offset is not None:
        offset = key_offset.to(device, torch.float32)
        keys = keys + shifted.unsqueeze(-1) * (offset @ codec.rotation.T if rotated else offset)
    return keys.cpu(), values.cpu()


def sequence_slots(block_table_row: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Cache slots of the first `seq_len` tokens of a sequence, in order."""
    pos = torch.arange(seq_len)
    return block_table_row.cpu().long()[pos // block_size] * block_size + pos % block_size


def paged_attention_ref(
    codec: KVCodec,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    key_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its compressed context plus themselves.

    Sequence s has seq_len tokens in all, the last q_len of which are this step's: their
    exact key/value rows. The first seq_len - q_len (the context) are read from the cache.
    New query i sees the whole context and new tokens 0..i.

    Args:
        query: [num_tokens, num_heads, head_dim] in the original basis.
        key, value: [num_tokens, num_kv_heads, head_dim], this step's exact K/V.
        cache: uint8 [num_blocks, block_size, bytes_per_token].
        block_table: int [num_seqs, max_blocks].
        seq_lens: int [num_seqs], context plus new tokens.
        query_start_loc: int [num_seqs + 1].
        key_offset: the layer's key offset, if its keys were stored with one.
    Returns:
        fp32 [num_tokens, num_heads, head_dim] in the original basis.
    """
    num_heads = query.shape[1]
    group = num_heads // codec.num_kv_heads
    out = torch.zeros(query.shape, dtype=torch.float32)
    starts = query_start_loc.cpu().tolist()
    for s, seq_len in enumerate(seq_lens.cpu().tolist()):
        lo, hi = starts[s], starts[s + 1]
        q_len = hi - lo
        if q_len == 0:
            continue
        context_len = seq_len - q_len
        slots = sequence_slots(block_table[s], context_len, cache.shape[1])
        k_ctx, v_ctx = dequantize_ref(codec, cache, slots, False, key_offset)  # [context_len, Hkv, d]
        k = torch.cat([k_ctx, key[lo:hi].cpu().to(torch.float32)]).repeat_interleave(group, dim=1)
        v = torch.cat([v_ctx, value[lo:hi].cpu().to(torch.float32)]).repeat_interleave(group, dim=1)
        q = query[lo:hi].cpu().to(torch.float32)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(context_len, seq_len).unsqueeze(1)
        visible = torch.arange(seq_len).unsqueeze(0) <= q_pos  # [q_len, seq_len]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out
