"""Exact attention sinks: each sequence's first tokens kept exact in a side table next to the packed pages.

A sequence's first few tokens draw a large share of every later query's attention, so their codebook error reaches
every output (docs/design-exact-sinks.md has the measurements). Positions 0..S-1 sit at offsets 0..S-1 of the
sequence's first block, but an attention backend never learns which blocks are first blocks, nor when vLLM frees
one. So each layer keeps a small table: entry = first block % entries, and one tag per row naming the first block
the row belongs to. A reader trusts a row only where its tag is the reader's own first block and the position is
context an earlier step wrote; any other position is read from the packed pages as usual.

The writer runs once per step, after the step's attention reads (stream order, never alongside a reader). Sequences
whose first blocks share an entry would race on a row within one launch, so the last sequence of the launch that
writes an (entry, position) is its only writer: every row and its tag come from one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from turboquant_vllm.config import MAX_SINK_TOKENS
from turboquant_vllm.kernels.pdl import pdl_launch, pdl_option
from turboquant_vllm.kernels.rotate import WRITER_ROT_CHUNK, rotate_pair

SINK_TILE = MAX_SINK_TOKENS  # the attention kernel scores the sinks as one tile of this many rows (a dot's minimum)
MIN_ENTRIES = 64
ENTRIES_PER_SEQ = 4  # table entries per schedulable sequence: two live sequences rarely share one
SCAN = 64  # later sequences the writer checks per step of its scan


@dataclass
class SinkTable:
    """One layer's exact sinks.

    kv: [entries, sink_tokens, 2, num_kv_heads, head_dim], R k and R v (the rotated basis the attention kernel
        scores in), in the model's dtype.
    tags: int32 [entries, sink_tokens], the first block whose token each row holds; -1 = none.
    """

    kv: torch.Tensor
    tags: torch.Tensor

    @classmethod
    def allocate(
        cls, entries: int, sink_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device
    ) -> SinkTable:
        assert entries > 0 and entries & (entries - 1) == 0, f"entries must be a power of two, got {entries}"
        assert 0 < sink_tokens <= MAX_SINK_TOKENS, f"sink_tokens must be in 1..{MAX_SINK_TOKENS}, got {sink_tokens}"
        kv = torch.zeros(entries, sink_tokens, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
        tags = torch.full((entries, sink_tokens), -1, dtype=torch.int32, device=device)
        return cls(kv, tags)

    @property
    def entries(self) -> int:
        return self.tags.shape[0]

    @property
    def sink_tokens(self) -> int:
        return self.tags.shape[1]

    def check(self, num_kv_heads: int, head_dim: int, device: torch.device) -> None:
        assert self.kv.shape[2:] == (2, num_kv_heads, head_dim) and self.kv.is_contiguous(), (
            f"sink table kv must be contiguous [entries, S, 2, {num_kv_heads}, {head_dim}], got {tuple(self.kv.shape)}"
        )
        assert self.tags.dtype == torch.int32 and self.tags.is_contiguous(), "sink tags must be contiguous int32"
        assert self.kv.device == self.tags.device == device, f"sink table is not on {device}"


def table_entries(max_num_seqs: int) -> int:
    """Table entries for a scheduler that runs up to max_num_seqs sequences at once."""
    return max(MIN_ENTRIES, triton.next_power_of_2(ENTRIES_PER_SEQ * max_num_seqs))


@triton.jit
def trusted_sinks(pos, ctx_len, tag_ptr, row0, first_block, SINKS: tl.constexpr):
    """Which positions `pos` the table holds exactly for this sequence: sink positions of its cached context whose
    tag is its first block. row0: the entry's first row (entry * SINKS)."""
    ok = (pos < SINKS) & (pos < ctx_len)
    return ok & (tl.load(tag_ptr + row0 + pos, mask=ok, other=-1) == first_block)


@triton.jit(do_not_specialize=["num_seqs", "entries"])
def _write_sinks_kernel(
    k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr, rot_ptr, kv_ptr, tag_ptr,
    num_seqs, entries,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_bt, stride_r0, stride_r1,
    SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROT_CHUNK: tl.constexpr,
    SCAN: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, KV head): rotate and store this step's tokens at positions below SINKS."""
    if PDL:  # started early to hide the launch; writes only once the attention ahead has read the table
        gdc_wait()
    seq = tl.program_id(0)
    kh = tl.program_id(1).to(tl.int64)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len
    if (q_len > 0) & (first_pos < SINKS):  # most programs of a decode step stop here
        first_block = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt).to(tl.int64)
        entry = first_block % entries
        kv_heads = tl.num_programs(1)
        dim = tl.arange(0, BLOCK_D)
        dim_ok = dim < HEAD_DIM
        for pos in range(first_pos, tl.minimum(seq_len, SINKS)):
            later = 0  # later sequences of this launch that write the same (entry, pos): the last one writes
            for j0 in range(seq + 1, num_seqs, SCAN):
                j = j0 + tl.arange(0, SCAN)
                j_ok = j < num_seqs
                j_start = tl.load(qsl_ptr + j, mask=j_ok, other=0)
                j_len = tl.load(qsl_ptr + j + 1, mask=j_ok, other=0) - j_start
                j_end = tl.load(seq_lens_ptr + j, mask=j_ok, other=0)
                j_block = tl.load(block_table_ptr + j.to(tl.int64) * stride_bt, mask=j_ok, other=0).to(tl.int64)
                same = j_ok & (j_len > 0) & (j_end - j_len <= pos) & (pos < j_end) & (j_block % entries == entry)
                later += tl.sum(same.to(tl.int32))
            if later == 0:
                tok = (q_start + pos - first_pos).to(tl.int64)
                k_rot, v_rot = rotate_pair(k_ptr + tok * stride_kt + kh * stride_kh, stride_kd,
                                           v_ptr + tok * stride_vt + kh * stride_vh, stride_vd, rot_ptr, stride_r0,
                                           stride_r1, HEAD_DIM, BLOCK_D, ROT_CHUNK)  # fmt: skip
                row = kv_ptr + ((entry * SINKS + pos) * 2 * kv_heads + kh) * HEAD_DIM
                tl.store(row + dim, k_rot.to(kv_ptr.dtype.element_ty), mask=dim_ok)
                tl.store(row + kv_heads * HEAD_DIM + dim, v_rot.to(kv_ptr.dtype.element_ty), mask=dim_ok)
                tl.store(tag_ptr + entry * SINKS + pos, first_block.to(tl.int32))


def write_sinks(
    table: SinkTable,
    rotation: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> None:
    """Keep this step's tokens at positions below table.sink_tokens exact: one launch, after the step's attention.

    Args:
        rotation: fp32 [head_dim, head_dim] R of the layer's codec (rows stored as x @ R.T).
        key, value: [>= num_tokens, num_kv_heads, head_dim], this step's exact K/V in the original basis.
        block_table: int32/int64 [>= num_seqs, max_blocks]; seq_lens: [>= num_seqs];
            query_start_loc: [num_seqs + 1], on the device; sequences with no query rows (padding) write nothing.
    """
    num_seqs = check_writer_args(table, key, value, block_table, query_start_loc)
    if num_seqs <= 0:
        return
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    pdl = pdl_launch(key.device)
    _write_sinks_kernel[(num_seqs, num_kv_heads)](
        key, value, block_table, seq_lens, query_start_loc, rotation, table.kv, table.tags,
        num_seqs, table.entries,
        *key.stride(), *value.stride(), block_table.stride(0), rotation.stride(0), rotation.stride(1),
        SINKS=table.sink_tokens, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        ROT_CHUNK=WRITER_ROT_CHUNK, SCAN=SCAN, PDL=pdl, num_warps=4, **pdl_option(pdl),
    )  # fmt: skip


def substitute_sinks(
    table: SinkTable,
    rotation: torch.Tensor | None,
    first_block: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Overwrite rows of dequantised context k/v with the exact sinks the table holds for them: in the original
    basis (the table's rows times R), or in the rotated one, the table's own, where rotation is None.

    first_block, pos, rows: int64 [n] on the device: each row's sequence's first block, its position (< sink_tokens,
    inside the cached context) and its index in k/v. No host sync: rows the table does not hold keep their values.
    """
    if rows.numel() == 0:
        return
    entry = first_block % table.entries
    held = (table.tags[entry, pos] == first_block)[:, None, None]
    overwrite_rows(table.kv[entry, pos], held, rotation, rows, k, v)


def check_writer_args(table, key: torch.Tensor, value: torch.Tensor, block_table: torch.Tensor,
                      query_start_loc: torch.Tensor) -> int:  # fmt: skip
    """The checks an exact table's writer makes of its step (this module's and kernels/recent.py's); the number of
    sequences."""
    num_seqs = query_start_loc.shape[0] - 1
    table.check(key.shape[1], key.shape[2], key.device)
    assert value.shape[1:] == key.shape[1:], f"value {tuple(value.shape)} does not match key {tuple(key.shape)}"
    assert block_table.dim() == 2 and block_table.shape[0] >= num_seqs, "block_table must be [>= num_seqs, blocks]"
    return num_seqs


def overwrite_rows(exact: torch.Tensor, held: torch.Tensor, rotation: torch.Tensor | None, rows: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> None:  # fmt: skip
    """k[rows] / v[rows] = an exact table's rows exact [n, 2, num_kv_heads, head_dim] (stored as x @ R.T) where held
    (broadcast over [n, num_kv_heads, 1]), in the original basis (times R) or, where rotation is None, the rotated."""
    exact = exact.float()
    if rotation is not None:
        exact = exact @ rotation
    k[rows] = torch.where(held, exact[:, 0].to(k.dtype), k[rows])
    v[rows] = torch.where(held, exact[:, 1].to(v.dtype), v[rows])
