"""One paged-attention step for the decode kernel tests: packed context pages, exact new rows, the fp32 twin."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels.decode import paged_attention
from turboquant_vllm.kernels.decode_tiles import attention_meta, fp8_mma_usable
from turboquant_vllm.kernels.reference import paged_attention_ref, sequence_slots, store_ref

POISON = 0xFF  # bytes of pages the kernel must never read: their fp32 scales are NaN
TOL_FP32 = 1e-4  # max |err| / max |ref| with fp32 inputs (only summation order differs)
TOL_HALF = 2e-2  # the same with bf16/fp16 inputs and outputs (fp16 dot operands, 16-bit output rounding)


@dataclass
class Batch:
    """One attention step: packed context pages plus this step's exact query/key/value rows."""

    ref_codec: KVCodec  # CPU
    codec: KVCodec  # on the test device
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())

    def expected(self, **kwargs) -> torch.Tensor:
        """paged_attention_ref of this step; unless told, it scores the context keys as this batch's decode launch
        does (in fp8 where Tiles.fp8_keys takes its tiles and TQConfig.fp8_key_scores allows it beside the key
        offset and exact rows given, the queries as Tiles.fp8_query_halves says), so a test follows the defaults.
        On a GPU the kernels rotate the queries by a tf32 product, which the fp8 key path's rounding of them makes
        visible, so there the reference rotates them that way too."""
        kwargs.setdefault("tf32_query_rotation", self.query.is_cuda)
        first, last = kwargs.get("exact_first"), kwargs.get("exact_last")
        exact = {"sinks": 0 if first is None else first[2].shape[1], "recent": 0 if last is None else last[2].shape[1]}
        meta = attention_meta(self.codec, self.query.shape[1], self.query.dtype, self.query.is_cuda,
                              self.max_query_len, self.cache.shape[1], True,
                              key_offset=kwargs.get("key_offset") is not None, **exact,
                              fp8_mma=fp8_mma_usable(self.query.device))  # fmt: skip
        if "fp8_keys" not in kwargs:
            kwargs["fp8_keys"] = meta["FP8_KEYS"]
            kwargs.setdefault("fp8_query_halves", meta["FP8_QUERY_HALVES"])
        kwargs.setdefault("fp8_values", meta["FP8_VALUES"])
        return paged_attention_ref(
            self.ref_codec, self.query.cpu(), self.key.cpu(), self.value.cpu(), self.cache.cpu(),
            self.block_table.cpu(), self.seq_lens.cpu(), self.query_start_loc.cpu(), self.scale, **kwargs,
        )  # fmt: skip

    def run(self, num_splits: int = 1, out: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        out = torch.full_like(self.query, float("nan")) if out is None else out
        paged_attention(
            self.codec, self.query, self.key, self.value, self.cache, self.block_table, self.seq_lens,
            self.query_start_loc, self.scale, out,
            max_query_len=kwargs.pop("max_query_len") if "max_query_len" in kwargs else self.max_query_len,
            num_splits=num_splits, **kwargs,
        )  # fmt: skip
        return out


def make_batch(
    device: torch.device,
    seq_lens: list[int],
    q_lens: list[int],
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    k_bits: int = 4,
    v_bits: int = 4,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    extra_tokens: int = 0,
    seed: int = 0,
    fp8_values: bool = False,
    fp8_key_scores: bool | None = None,
) -> Batch:
    """Context tokens go to shuffled pages through store_ref; everything else in the cache is poison.

    The new tokens' own slots are poisoned too: the kernel must take them from key/value.
    """
    assert len(seq_lens) == len(q_lens) and all(s >= q for s, q in zip(seq_lens, q_lens, strict=True))
    g = torch.Generator().manual_seed(seed)
    config = TQConfig(k_bits=k_bits, v_bits=v_bits, fp8_values=fp8_values, fp8_key_scores=fp8_key_scores)
    ref = KVCodec(config, num_kv_heads, head_dim)
    blocks = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(blocks) + 1
    num_blocks = sum(blocks) + 2
    order = torch.randperm(num_blocks, generator=g)
    poison_block = int(order[-1])
    block_table = torch.full((len(seq_lens), max_blocks), poison_block, dtype=torch.int32)
    cache = torch.full((num_blocks, block_size, ref.layout.bytes_per_token), POISON, dtype=torch.uint8)
    used = 0
    for s, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens, strict=True)):
        block_table[s, : blocks[s]] = order[used : used + blocks[s]]
        used += blocks[s]
        ctx = seq_len - q_len
        pos = torch.arange(ctx)
        slots = block_table[s].long()[pos // block_size] * block_size + pos % block_size
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=g) * (1 + torch.rand(ctx, num_kv_heads, 1, generator=g))
        store_ref(ref, k, torch.randn(ctx, num_kv_heads, head_dim, generator=g), cache, slots)
    num_tokens = sum(q_lens) + extra_tokens
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=g) * 1.5
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g) * 1.5
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    return Batch(
        ref, KVCodec(config, num_kv_heads, head_dim, device),
        query.to(device, dtype), key.to(device, dtype), value.to(device, dtype), cache.to(device),
        block_table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device), qsl.to(device),
        head_dim**-0.5,
    )  # fmt: skip


def assert_matches(got: torch.Tensor, want: torch.Tensor, tol: float, rows: int | None = None) -> None:
    rows = want.shape[0] if rows is None else rows
    got, want = got[:rows].float().cpu(), want[:rows]
    assert torch.isfinite(got).all(), "non-finite output (a poisoned page was read?)"
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < tol, f"max |err| / max |ref| = {err:.3g} >= {tol}"


def store_around_offset(batch: Batch, offset: torch.Tensor, g: torch.Generator) -> None:
    """Rewrite every sequence's context pages with keys around `offset` ([num_kv_heads, head_dim]), stored relative
    to it where that shortens them; each context's first key is -offset, which is stored plainly."""
    block_size = batch.cache.shape[1]
    q_lens = batch.query_start_loc.diff().cpu()
    cache = batch.cache.cpu()
    for s, (seq_len, q_len) in enumerate(zip(batch.seq_lens.cpu().tolist(), q_lens.tolist(), strict=True)):
        slots = sequence_slots(batch.block_table[s].cpu(), seq_len - q_len, block_size)
        key = torch.randn(len(slots), *offset.shape, generator=g) + offset
        key[:1] = -offset
        store_ref(batch.ref_codec, key, torch.randn(key.shape, generator=g), cache, slots, offset)
    batch.cache.copy_(cache)
