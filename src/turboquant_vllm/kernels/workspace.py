"""The split-K workspace of the paged attention launch (kernels/decode.py), allocated once per engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionWorkspace:
    """Split-K partials, preallocated once so launches never allocate (CUDA-graph capture).

    acc: fp32 [max_tokens, num_heads, max_splits, head_dim], unnormalised, rotated basis.
    row_max, row_sum: fp32 [max_tokens, num_heads, max_splits], softmax max (log2 units) and sum.
    query: fp32 [max_tokens, num_heads, head_dim], contiguous: the step's queries rotated once (q R^T).
    tickets: int32, one per (query tile, KV head) program row of a launch: how many of its split programs have
        stored their partials (Tiles.tail_merge_min_splits), or 1 once its store program has published the rotated
        queries plus how many split programs have read them (Tiles.publish_q). Zero between launches: the merging
        program, or the last reader, resets it.
    """

    acc: torch.Tensor
    row_max: torch.Tensor
    row_sum: torch.Tensor
    query: torch.Tensor
    tickets: torch.Tensor

    @classmethod
    def allocate(
        cls,
        max_tokens: int,
        num_heads: int,
        head_dim: int,
        max_splits: int,
        device: torch.device | str,
        max_seqs: int | None = None,
    ) -> AttentionWorkspace:
        """max_seqs: sequences a launch may have (default max_tokens); they bound the launch's query tiles."""
        acc = torch.empty(max_tokens, num_heads, max_splits, head_dim, dtype=torch.float32, device=device)
        stats = torch.empty(2, max_tokens, num_heads, max_splits, dtype=torch.float32, device=device)
        query = torch.empty(max_tokens, num_heads, head_dim, dtype=torch.float32, device=device)
        q_tiles = max_tokens + (max_tokens if max_seqs is None else max_seqs)  # >= cdiv(tokens, BLOCK_Q) + seqs
        tickets = torch.zeros(q_tiles * num_heads, dtype=torch.int32, device=device)
        return cls(acc, stats[0], stats[1], query, tickets)

    def check(self, num_tokens: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device) -> None:
        """That a launch of num_tokens x num_heads x head_dim in num_splits splits on `device` fits."""
        acc = self.acc
        assert acc.shape[0] >= num_tokens and acc.shape[1:] == (num_heads, self.max_splits, head_dim), (
            f"workspace acc {tuple(acc.shape)} cannot hold {num_tokens} tokens x {num_heads} heads x {head_dim}"
        )
        assert num_splits <= self.max_splits, f"num_splits={num_splits} > workspace {self.max_splits}"
        assert acc.stride(3) == 1 and self.row_max.stride() == self.row_sum.stride(), "unexpected workspace strides"
        assert acc.device == device, "workspace is on another device"
        query_ok = self.query.is_contiguous() and self.query.shape[1:] == (num_heads, head_dim)
        assert query_ok, "unexpected workspace query"

    @property
    def max_tokens(self) -> int:
        return self.acc.shape[0]

    @property
    def max_splits(self) -> int:
        return self.acc.shape[2]
