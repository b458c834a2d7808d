"""Torch twins of the Triton kernels, written the slow, obvious way.

They share only the quantiser and the byte packing with the kernels (both independently
tested against fp64 math), never the kernels' index arithmetic.
"""

from __future__ import annotations

import math

import torch

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.key_offset import use_offset
from turboquant_vllm.packing import pack_indices, unpack_indices
from turboquant_vllm.quantizer import QuantizedVectors


def _record_fields(codec: KVCodec) -> dict[str, tuple[int, int, int]]:
    """(start, bytes, bits) of each field in one head's record of a token row: K idx, K scale, V idx, V scale."""
    lay = codec.layout
    kib, vib = lay.k_index_bytes, lay.v_index_bytes
    return {
        "k_idx": (0, kib, lay.k_bits),
        "k_scale": (kib, 4, 0),
        "v_idx": (kib + 4, vib, lay.v_bits),
        "v_scale": (kib + 4 + vib, 4, 0),
    }


def _page_views(codec: KVCodec, cache: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each field of every page as a view [num_blocks, num_kv_heads, block_size, bytes] (layout.py's order)."""
    num_blocks, block_size, _ = cache.shape
    fields = codec.layout.fields(block_size)
    runs = cache.view(num_blocks, codec.num_kv_heads, fields.run_bytes)
    starts = {"k_idx": fields.k_index, "k_scale": fields.k_scale, "v_idx": fields.v_index, "v_scale": fields.v_scale}
    views = {}
    for name, (_, width, _) in _record_fields(codec).items():
        start = starts[name]
        views[name] = runs[:, :, start : start + block_size * width].unflatten(-1, (block_size, width))
    return views


def _token_major_values(codec: KVCodec, field: torch.Tensor) -> torch.Tensor:
    """A coordinate-major V index field [.., block_size, bytes] (layout.py; the shape only counts its bytes) as the
    token-major rows it holds, a new tensor of that shape: token t's packed indices at [.., t, :]."""
    block_size, d = field.shape[-2], codec.head_dim
    per_coordinate = unpack_indices(field.flatten(-2).unflatten(-1, (d, block_size // 2)), 4, block_size)
    return pack_indices(per_coordinate.transpose(-1, -2), 4).reshape(field.shape)


def _coordinate_major_values(codec: KVCodec, rows: torch.Tensor) -> torch.Tensor:
    """Inverse of _token_major_values."""
    per_token = unpack_indices(rows, 4, codec.head_dim)  # [.., block_size, d]
    return pack_indices(per_token.transpose(-1, -2), 4).reshape(rows.shape)


def _page_and_token(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, token in page) of each slot = page * block_size + token."""
    slots = slots.long().to(cache.device)
    return slots // cache.shape[1], slots % cache.shape[1]


def gather_rows_ref(codec: KVCodec, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The tokens at `slots` as rows uint8 [N, bytes_per_token]: per head, K idx | K scale | V idx | V scale."""
    block, t = _page_and_token(cache, slots)
    views = _page_views(codec, cache)
    if codec.layout.v_coordinate_major:
        views["v_idx"] = _token_major_values(codec, views["v_idx"])
    parts = [view[block, :, t] for view in views.values()]  # each [N, H, bytes]
    return torch.cat(parts, -1).flatten(1).cpu()


def scatter_rows_ref(codec: KVCodec, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """Write rows [N, bytes_per_token] (gather_rows_ref's format) to the tokens at `slots`, in place."""
    block, t = _page_and_token(cache, slots)
    records = rows.to(cache.device).view(rows.shape[0], codec.num_kv_heads, codec.layout.head_bytes_per_token)
    fields = _record_fields(codec)
    for name, view in _page_views(codec, cache).items():
        start, nbytes, _ = fields[name]
        if name == "v_idx" and codec.layout.v_coordinate_major:
            rows_of_pages = _token_major_values(codec, view)
            rows_of_pages[block, :, t] = records[:, :, start : start + nbytes]
            view.copy_(_coordinate_major_values(codec, rows_of_pages))
        else:
            view[block, :, t] = records[:, :, start : start + nbytes]


def encode_rows_ref(
    codec: KVCodec, key: torch.Tensor, value: torch.Tensor, key_offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantise tokens into rows (gather_rows_ref's format).

    Args:
        key, value: [num_tokens, num_kv_heads, head_dim].
        key_offset: optional fp32 [num_kv_heads, head_dim]: keys it shortens are stored relative to it,
            with their scale negated (turboquant_vllm.key_offset).
    Returns:
        uint8 [num_tokens, bytes_per_token].
    """
    fields = _record_fields(codec)
    records = torch.zeros(key.shape[0], codec.num_kv_heads, codec.layout.head_bytes_per_token, dtype=torch.uint8)
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
        start, nbytes, _ = fields[f"{name}_idx"]
        records[:, :, start : start + nbytes] = packed
        start, nbytes, _ = fields[f"{name}_scale"]
        records[:, :, start : start + nbytes] = scales.view(torch.uint8).reshape(*scales.shape, 4)
    return records.flatten(1)


def decode_rows_ref(codec: KVCodec, rows: torch.Tensor) -> tuple[QuantizedVectors, QuantizedVectors]:
    """Split rows [N, bytes_per_token] back into K and V (indices [N, H, d], scales [N, H])."""
    records = rows.reshape(rows.shape[0], codec.num_kv_heads, codec.layout.head_bytes_per_token)
    fields = _record_fields(codec)
    out = []
    for name in ("k", "v"):
        start, nbytes, bits = fields[f"{name}_idx"]
        indices = unpack_indices(records[:, :, start : start + nbytes], bits, codec.head_dim)
        start, _, _ = fields[f"{name}_scale"]
        scales = records[:, :, start : start + 4].contiguous().view(torch.float32).squeeze(-1)
        out.append(QuantizedVectors(indices, scales))
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
    rows = encode_rows_ref(codec, key, value, key_offset)
    keep = slot_mapping.cpu() >= 0
    scatter_rows_ref(codec, cache, slot_mapping.cpu()[keep], rows[keep])


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
    rows = gather_rows_ref(codec, cache, slots)
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


def _fp8_key_scores(
    codec: KVCodec,
    cache: torch.Tensor,
    slots: torch.Tensor,
    q: torch.Tensor,
    group: int,
    scale: float,
    query_halves: bool,
    tf32_rotation: bool,
    key_offset: torch.Tensor | None,
) -> torch.Tensor:
    """Scores [H, q_len, len(slots)] of q against the context keys as Tiles.fp8_keys forms them: in the rotated
    basis, keys from the e4m3-rounded codebook (codec.key_centroids_e4m3), queries rounded to e4m3 in log2 units,
    or with query_halves (Tiles.fp8_query_halves) as that rounding plus its rounded remainder. tf32_rotation:
    the queries rotated as a GPU's tf32 product does, since rounding to e4m3 turns its last-bit differences into
    whole steps of e4m3 (d=64's queries rounded once: 1.9% of the output's largest value on the H200).
    A key_offset's share (keys with a negative scale) is added in fp32, as the kernel's q.offset term is."""
    k, _ = decode_rows_ref(codec, gather_rows_ref(codec, cache, slots))
    centroids = codec.key_centroids_e4m3.cpu().float() / codec.key_e4m3_scale
    keys = (centroids[k.indices.long()] * k.scales.abs().unsqueeze(-1)).repeat_interleave(group, dim=1)
    log2_scale = scale * math.log2(math.e)
    rot = codec.rotation.cpu()
    q_rot = (tf32_truncated(q) @ tf32_truncated(rot).T if tf32_rotation else q @ rot.T) * log2_scale
    q8 = e4m3_values(q_rot)
    if query_halves:
        q8 = q8 + e4m3_values(q_rot - q8)
    scores = torch.einsum("qhd,khd->hqk", q8 / log2_scale, keys) * scale
    if key_offset is not None:
        offset = key_offset.cpu().float().repeat_interleave(group, dim=0)  # [H, d]
        shifted = torch.signbit(k.scales.cpu()).repeat_interleave(group, dim=1)  # [len(slots), H]
        scores = scores + torch.einsum("qhd,hd->hq", q, offset).unsqueeze(-1) * shifted.T.unsqueeze(1) * scale
    return scores


def tf32_truncated(x: torch.Tensor) -> torch.Tensor:
    """fp32 x with its mantissa cut to tf32's 10 bits, as a tensor-core tf32 product reads its fp32 operands
    (truncated, not rounded: the H200's outputs matched this, not round-to-nearest)."""
    return (x.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def e4m3_values(x: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 (saturating at 448), as fp32."""
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


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
    exact_first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    fp8_keys: bool = False,
    fp8_query_halves: bool = True,
    tf32_query_rotation: bool = False,
    exact_last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    fp8_values: bool = False,
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
        exact_first: (keys, values, held): [num_seqs, S, num_kv_heads, head_dim] twice and bool [num_seqs, S]:
            context position p < S of sequence s is keys[s, p] / values[s, p] where held[s, p], not the cache's.
        exact_last: (keys, values, held), shaped as exact_first, for the context's last W positions: position
            context_len - W + i of sequence s is keys[s, i] / values[s, i] where held[s, i] (and it exists).
        fp8_keys: score the packed context as the kernel's fp8 key path does (Tiles.fp8_keys; exact_first's and
            exact_last's held rows keep fp32 scores), with the queries in two e4m3 halves where fp8_query_halves
            (Tiles.fp8_query_halves), else rounded once, and rotated by a tf32 product where tf32_query_rotation
            (the kernels on a GPU).
        fp8_values: the context's values from the e4m3-rounded codebook (codec.value_centroids_e4m3), as the kernel's
            fp8 value product reads them (TQConfig.fp8_values); its rounding of the probabilities is not modelled.
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
        if fp8_values:
            _, vq = decode_rows_ref(codec, gather_rows_ref(codec, cache, slots))
            centroids = codec.value_centroids_e4m3.cpu().float() / codec.value_e4m3_scale
            rotation = codec.rotation.cpu()
            v_ctx = (centroids[vq.indices.long()] * vq.scales.unsqueeze(-1)) @ rotation
        exact_rows = torch.zeros(context_len, dtype=torch.bool)  # context positions read from a side table
        if exact_first is not None:
            n = min(context_len, exact_first[2].shape[1])
            held = exact_first[2][s, :n].cpu()
            k_ctx[:n][held] = exact_first[0][s, :n][held].cpu().float()
            v_ctx[:n][held] = exact_first[1][s, :n][held].cpu().float()
            exact_rows[:n] |= held
        if exact_last is not None:
            pos = torch.arange(exact_last[2].shape[1]) + context_len - exact_last[2].shape[1]
            held = exact_last[2][s].cpu() & (pos >= 0)
            k_ctx[pos[held]] = exact_last[0][s][held].cpu().float()
            v_ctx[pos[held]] = exact_last[1][s][held].cpu().float()
            exact_rows[pos[held]] = True
        k = torch.cat([k_ctx, key[lo:hi].cpu().to(torch.float32)]).repeat_interleave(group, dim=1)
        v = torch.cat([v_ctx, value[lo:hi].cpu().to(torch.float32)]).repeat_interleave(group, dim=1)
        q = query[lo:hi].cpu().to(torch.float32)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if fp8_keys:  # the packed positions; the side tables' rows keep their exact scores
            fp8_scores = _fp8_key_scores(
                codec, cache, slots, q, group, scale, fp8_query_halves, tf32_query_rotation, key_offset
            )
            scores[:, :, :context_len] = torch.where(exact_rows, scores[:, :, :context_len], fp8_scores)
        q_pos = torch.arange(context_len, seq_len).unsqueeze(1)
        visible = torch.arange(seq_len).unsqueeze(0) <= q_pos  # [q_len, seq_len]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out
