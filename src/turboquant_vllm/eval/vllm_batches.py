"""vLLM-shaped attention batches (decode, prefill, mixed, chunked, prefix hit) for layer-level checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (context_len, query_len) per sequence; decodes first, as vLLM orders them.
SCENARIOS: dict[str, list[tuple[int, int]]] = {
    "decode": [(37, 1), (1, 1), (80, 1), (16, 1)],
    "prefill": [(0, 33), (0, 7), (0, 64)],
    "mixed": [(50, 1), (17, 1), (0, 40), (31, 9)],
    "chunked": [(64, 32), (100, 28)],
    "prefix_hit": [(48, 5), (32, 17)],
}


@dataclass
class LayerBatch:
    """One layer's inputs for a step, plus the exact context K/V the cache should hold."""

    query: torch.Tensor  # [T, Hq, d]
    key: torch.Tensor  # [T, Hkv, d], this step's tokens
    value: torch.Tensor
    context_key: list[torch.Tensor]  # per sequence [context_len, Hkv, d]
    context_value: list[torch.Tensor]
    context_slots: list[torch.Tensor]  # per sequence int64 [context_len]
    slot_mapping: torch.Tensor  # int64 [T]
    block_table: torch.Tensor  # int32 [S, max_blocks]
    seq_lens: torch.Tensor  # int32 [S]
    query_start_loc: torch.Tensor  # int32 [S + 1]
    num_blocks: int
    block_size: int

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())


def make_batch(
    lengths: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LayerBatch:
    """Random K/V/Q (with a few outlier channels, like real keys) and shuffled block tables."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-(c + q) // block_size) for c, q in lengths]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that must stay untouched
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(lengths), max(blocks_per_seq), dtype=torch.int32)
    outlier = torch.ones(head_dim)
    outlier[torch.randperm(head_dim, generator=gen)[:4]] = 8.0

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * outlier).to(dtype)

    used = 0
    queries, keys, values, slots = [], [], [], []
    ctx_k, ctx_v, ctx_slots = [], [], []
    for s, ((context, q_len), nb) in enumerate(zip(lengths, blocks_per_seq, strict=True)):
        table[s, :nb] = order[used : used + nb]
        used += nb
        pos = torch.arange(context + q_len)
        seq_slots = table[s].long()[pos // block_size] * block_size + pos % block_size
        ctx_slots.append(seq_slots[:context])
        ctx_k.append(rand(context, num_kv_heads, head_dim))
        ctx_v.append(rand(context, num_kv_heads, head_dim))
        queries.append(rand(q_len, num_heads, head_dim))
        keys.append(rand(q_len, num_kv_heads, head_dim))
        values.append(rand(q_len, num_kv_heads, head_dim))
        slots.append(seq_slots[context:])
    q_lens = torch.tensor([q for _, q in lengths])
    return LayerBatch(
        query=torch.cat(queries).to(device),
        key=torch.cat(keys).to(device),
        value=torch.cat(values).to(device),
        context_key=[k.to(device) for k in ctx_k],
        context_value=[v.to(device) for v in ctx_v],
        context_slots=[s.to(device) for s in ctx_slots],
        slot_mapping=torch.cat(slots).to(device),
        block_table=table.to(device),
        seq_lens=torch.tensor([c + q for c, q in lengths], dtype=torch.int32, device=device),
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).to(torch.int32).to(device),
        num_blocks=num_blocks,
        block_size=block_size,
    )


def exact_attention(batch: LayerBatch, scale: float) -> torch.Tensor:
    """fp32 causal attention over the exact context + new K/V (no quantisation): [T, Hq, d]."""
    out = torch.zeros(batch.query.shape, dtype=torch.float32, device=batch.query.device)
    starts = batch.query_start_loc.tolist()
    group = batch.query.shape[1] // batch.key.shape[1]
    for s in range(len(starts) - 1):
        lo, hi = starts[s], starts[s + 1]
        k = torch.cat([batch.context_key[s], batch.key[lo:hi]]).float().repeat_interleave(group, 1)
        v = torch.cat([batch.context_value[s], batch.value[lo:hi]]).float().repeat_interleave(group, 1)
        q = batch.query[lo:hi].float()
        n_ctx = batch.context_key[s].shape[0]
        q_pos = n_ctx + torch.arange(hi - lo, device=q.device)
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
        )
        out[lo:hi] = o.transpose(0, 1)
    return out
