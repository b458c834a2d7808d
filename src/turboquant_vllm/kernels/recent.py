"""An exact window of each sequence's newest tokens, kept in a side table next to the packed pages.

When a model generates, every token attends to its nearest neighbours most, and without this window it sees them
only through the codebook (docs/design-exact-window.md has the measurements). An attention backend never learns
when vLLM frees a block or which request owns it, so the table is direct-mapped by where a token lives: its slot's
16-token segment (slot // 16, unique while the block is held) picks the entry, `segment % entries`, and the slot's
offset in the segment the row. Each row has one tag per KV head naming the segment it holds.

- The writer runs once per layer and step, after every read of the table in that step, and writes the last
  `recent_tokens` of each sequence's new tokens (all of a decode step's): a prefill chunk never floods the table.
- A reader trusts a context position where the row's tag is the position's own segment. The position is among the
  newest `recent_tokens` of the context, so the writer was asked to write it when it was stored (it was among the
  last of its step's tokens); a tag left by the block's previous owner is therefore always overwritten or replaced.
- Two tokens of one launch may map to one (entry, row). The writer takes a row with a compare-and-swap on its tag
  (locked while it writes) and gives up if another program holds it, so a row and its tag always come from one
  token; the token that gave up is read from the pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from turboquant_vllm.config import MAX_RECENT_TOKENS
from turboquant_vllm.kernels.pdl import pdl_launch, pdl_option
from turboquant_vllm.kernels.rotate import WRITER_ROT_CHUNK, rotate_pair
from turboquant_vllm.kernels.sinks import check_writer_args, overwrite_rows

SEGMENT = 16  # tokens per table entry: slot // SEGMENT names a run of one block's tokens (blocks hold 16k tokens)
_SEGMENT = tl.constexpr(SEGMENT)
MIN_ENTRIES = 64
LOCKED = tl.constexpr(-2)  # a tag while its row is being written; -1: the row holds nothing
_NO_TAG = tl.constexpr(-3)  # what no tag holds: a swap compared against it never happens


@dataclass
class RecentTable:
    """One layer's exact recent tokens.

    kv: [entries, SEGMENT, 2, num_kv_heads, head_dim], R k and R v (the rotated basis the attention kernel scores
        in), in the model's dtype.
    tags: int32 [entries, SEGMENT, num_kv_heads], the segment (slot // SEGMENT) whose token each row holds; -1 = none.
    recent_tokens: how many of each sequence's newest context tokens are read from the table where it holds them.
    """

    kv: torch.Tensor
    tags: torch.Tensor
    recent_tokens: int

    @classmethod
    def allocate(cls, entries: int, recent_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device) -> RecentTable:  # fmt: skip
        assert entries > 0 and entries & (entries - 1) == 0, f"entries must be a power of two, got {entries}"
        assert 0 < recent_tokens <= MAX_RECENT_TOKENS, f"recent_tokens must be in 1..{MAX_RECENT_TOKENS}"
        kv = torch.zeros(entries, SEGMENT, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
        tags = torch.full((entries, SEGMENT, num_kv_heads), -1, dtype=torch.int32, device=device)
        return cls(kv, tags, recent_tokens)

    @property
    def entries(self) -> int:
        return self.tags.shape[0]

    def check(self, num_kv_heads: int, head_dim: int, device: torch.device) -> None:
        assert self.kv.shape[1:] == (SEGMENT, 2, num_kv_heads, head_dim) and self.kv.is_contiguous(), (
            f"recent table kv must be contiguous [entries, {SEGMENT}, 2, {num_kv_heads}, {head_dim}], "
            f"got {tuple(self.kv.shape)}"
        )
        assert self.tags.shape[1:] == (SEGMENT, num_kv_heads) and self.tags.dtype == torch.int32, (
            f"recent tags must be int32 [entries, {SEGMENT}, {num_kv_heads}], got {tuple(self.tags.shape)}"
        )
        assert self.kv.device == self.tags.device == device, f"recent table is not on {device}"


def window_tile(recent_tokens: int) -> int:
    """Rows the attention kernel scores the window in: a power of two, at least a dot's 16."""
    return max(16, triton.next_power_of_2(max(recent_tokens, 1)))


def recent_entries(max_num_seqs: int, recent_tokens: int) -> int:
    """Table entries for up to max_num_seqs running sequences: the segments one window spans (one more than it
    fills, as it rarely starts on a segment's first token), twice over so that live windows seldom collide."""
    spans = triton.cdiv(recent_tokens, SEGMENT) + 1
    return max(MIN_ENTRIES, triton.next_power_of_2(2 * spans * max_num_seqs))


@triton.jit
def _table_row(slot, entries):
    """The table row (entry * SEGMENT + offset) a slot's token lives in: its segment picks the entry."""
    return (slot // _SEGMENT % entries) * _SEGMENT + slot % _SEGMENT


@triton.jit
def recent_rows(pos, ctx_len, bt_row, tag_ptr, kh, entries, BLOCK_SIZE: tl.constexpr):
    """Table rows (int64, entry * SEGMENT + offset) of context positions pos of one sequence, and which of them the
    table holds for it: positions inside [0, ctx_len) whose row's tag (KV head kh) is their own segment."""
    cand = (pos >= 0) & (pos < ctx_len)
    block = tl.load(bt_row + pos // BLOCK_SIZE, mask=cand, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    row = _table_row(slot, entries)
    tag = tl.load(tag_ptr + row * tl.num_programs(1) + kh, mask=cand, other=-1)
    return row, cand & (tag == slot // _SEGMENT)


@triton.jit
def recent_context_end(ctx_len, win_lo, bt_row, tag_ptr, kh, entries, BLOCK_SIZE: tl.constexpr,
                       TILE: tl.constexpr):  # fmt: skip
    """Where the packed context ends: the window's positions from win_lo on that the table holds, as one run up to
    ctx_len, are scored exactly instead. A position it lost ends the run (everything before it stays packed)."""
    pos = win_lo + tl.arange(0, TILE)
    _, held = recent_rows(pos, ctx_len, bt_row, tag_ptr, kh, entries, BLOCK_SIZE)
    lost = (pos >= 0) & (pos < ctx_len) & ~held
    return tl.minimum(tl.maximum(win_lo, tl.max(tl.where(lost, pos + 1, 0))), ctx_len)


@triton.jit
def claim_rows(tag, live):
    """Lock the tags (pointers) of live rows for this program: a compare-and-swap to LOCKED from what each held.
    Which it won; a row another program holds (LOCKED) or takes first is left to it. Dead lanes' pointers must
    still be valid: their swap compares against a value no tag holds."""
    seen = tl.load(tag, mask=live, other=LOCKED, volatile=True)
    want = live & (seen != LOCKED)
    locked = seen * 0 + LOCKED  # a whole operand: the interpreter misreads broadcast ones in atomics
    old = tl.atomic_cas(tag, tl.where(want, seen, _NO_TAG), locked, sem="acquire")
    return want & (old == seen)


@triton.jit
def publish_rows(tag, won, segment):
    """Name the segment whose token each row claim_rows won now holds, once every thread has written the rows."""
    tl.debug_barrier()
    tl.atomic_xchg(tag, segment.to(tl.int32), mask=won, sem="release")


@triton.jit
def store_window_rows(slot, live, kh, kv_heads, k_rot, v_rot, kv_ptr, tag_ptr, entries, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr):  # fmt: skip
    """Write tokens' rotated exact K/V (fp32 [BLOCK_T, BLOCK_D]: R k, R v) of KV head kh (int64) at their slots'
    rows (slot int64 [BLOCK_T], live: the tokens to write): store.store_kv's part of the writer's work, where each
    of its tokens is among the last recent_tokens of its sequence's new tokens and the step's reads are done."""
    row = tl.where(live, _table_row(slot, entries), 0)  # dead lanes' swaps still need a real tag
    tag = tag_ptr + row * kv_heads + kh
    won = claim_rows(tag, live)
    dim = tl.arange(0, BLOCK_D)
    out = kv_ptr + ((row * 2 * kv_heads + kh) * HEAD_DIM)[:, None] + dim[None, :]
    mask = won[:, None] & (dim < HEAD_DIM)[None, :]
    tl.store(out, k_rot.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(out + kv_heads * HEAD_DIM, v_rot.to(kv_ptr.dtype.element_ty), mask=mask)
    publish_rows(tag, won, slot // _SEGMENT)


@triton.jit
def write_window(
    seq, kh, kv_heads, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr, rot_ptr, kv_ptr, tag_ptr, entries,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_bt, stride_r0, stride_r1,
    RECENT: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROT_CHUNK: tl.constexpr,
):  # fmt: skip
    """Rotate and store the last RECENT of this step's tokens of sequence seq, KV head kh (kh: int64). Runs only after
    every read of the table in this step: its own launch (_write_recent_kernel), or the reduce launch's last
    programs (decode_reduce._reduce_splits_kernel with WRITE_RECENT)."""
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len
    dim = tl.arange(0, BLOCK_D)
    dim_ok = dim < HEAD_DIM
    for pos in range(tl.maximum(first_pos, seq_len - RECENT), seq_len):  # nothing for padding (q_len 0)
        block = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt + pos // BLOCK_SIZE).to(tl.int64)
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        row = _table_row(slot, entries)
        tag = tag_ptr + row * kv_heads + kh
        won = claim_rows(tag, slot >= 0)  # (always true: the helpers take a mask)
        if won:  # the rotation only for a row this program holds
            tok = (q_start + pos - first_pos).to(tl.int64)
            k_rot, v_rot = rotate_pair(k_ptr + tok * stride_kt + kh * stride_kh, stride_kd,
                                       v_ptr + tok * stride_vt + kh * stride_vh, stride_vd, rot_ptr, stride_r0,
                                       stride_r1, HEAD_DIM, BLOCK_D, ROT_CHUNK)  # fmt: skip
            out = kv_ptr + (row * 2 * kv_heads + kh) * HEAD_DIM
            tl.store(out + dim, k_rot.to(kv_ptr.dtype.element_ty), mask=dim_ok)
            tl.store(out + kv_heads * HEAD_DIM + dim, v_rot.to(kv_ptr.dtype.element_ty), mask=dim_ok)
            publish_rows(tag, won, slot // _SEGMENT)


@triton.jit(do_not_specialize=["entries"])
def _write_recent_kernel(
    k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr, rot_ptr, kv_ptr, tag_ptr,
    entries,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_bt, stride_r0, stride_r1,
    RECENT: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROT_CHUNK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, KV head): write_window."""
    if PDL:  # started early to hide the launch; writes only once the attention ahead has read the table
        gdc_wait()
    write_window(tl.program_id(0), tl.program_id(1).to(tl.int64), tl.num_programs(1), k_ptr, v_ptr, block_table_ptr,
                 seq_lens_ptr, qsl_ptr, rot_ptr, kv_ptr, tag_ptr, entries, stride_kt, stride_kh, stride_kd,
                 stride_vt, stride_vh, stride_vd, stride_bt, stride_r0, stride_r1, RECENT, BLOCK_SIZE, HEAD_DIM,
                 BLOCK_D, ROT_CHUNK)  # fmt: skip


def write_recent(
    table: RecentTable,
    rotation: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    block_size: int,
) -> None:
    """Keep the last table.recent_tokens of each sequence's new tokens exact: one launch, after the step's attention.

    Args:
        rotation: fp32 [head_dim, head_dim] R of the layer's codec (rows stored as x @ R.T).
        key, value: [>= num_tokens, num_kv_heads, head_dim], this step's exact K/V in the original basis.
        block_table: int32/int64 [>= num_seqs, max_blocks]; seq_lens: [>= num_seqs];
            query_start_loc: [num_seqs + 1], on the device; sequences with no query rows (padding) write nothing.
        block_size: tokens per page, a multiple of SEGMENT.
    """
    num_seqs = check_writer_args(table, key, value, block_table, query_start_loc)
    assert block_table.stride(1) == 1, "block_table rows must be contiguous"
    assert block_size % SEGMENT == 0, f"block_size must be a multiple of {SEGMENT}, got {block_size}"
    if num_seqs <= 0:
        return
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    pdl = pdl_launch(key.device)
    _write_recent_kernel[(num_seqs, num_kv_heads)](
        key, value, block_table, seq_lens, query_start_loc, rotation, table.kv, table.tags,
        table.entries,
        *key.stride(), *value.stride(), block_table.stride(0), rotation.stride(0), rotation.stride(1),
        RECENT=table.recent_tokens, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), ROT_CHUNK=WRITER_ROT_CHUNK, PDL=pdl, num_warps=4,
        **pdl_option(pdl),
    )  # fmt: skip


def reduce_writer_args(
    table: RecentTable | None,
    key: torch.Tensor,
    value: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    num_seqs: int,
    block_size: int,
) -> tuple[int, tuple, dict]:
    """(programs, arguments, constexprs) with which a split-K reduce launch of WRITE_RECENT (decode_reduce.
    _reduce_splits_kernel, arguments in its order) also does write_recent's work; table None: none, placeholders.
    paged_attention, its caller, has checked the table and the step's tensors as write_recent does."""
    kv, tags, entries = (key, block_table, 1) if table is None else (table.kv, table.tags, table.entries)
    args = (key, value, block_table, seq_lens, kv, tags, entries, key.shape[1], *key.stride(), *value.stride(),
            block_table.stride(0))  # fmt: skip
    if table is None:
        return 0, args, {}
    return num_seqs * key.shape[1], args, dict(BLOCK_SIZE=block_size, WRITER_ROT_CHUNK=WRITER_ROT_CHUNK)


def substitute_recent(
    table: RecentTable,
    rotation: torch.Tensor | None,
    slots: torch.Tensor,
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Overwrite rows of dequantised context k/v with the exact tokens the table holds for them: in the original
    basis (the table's rows times R), or in the rotated one, the table's own, where rotation is None.

    slots, rows: int64 [n] on the device: each row's slot (a context position among its sequence's newest
    table.recent_tokens) and its index in k/v [rows, num_kv_heads, head_dim]. No host sync: rows the table does not
    hold for every KV head keep their values per head.
    """
    if rows.numel() == 0:
        return
    segment = slots // SEGMENT
    entry, offset = segment % table.entries, slots % SEGMENT
    held = (table.tags[entry, offset] == segment[:, None])[..., None]  # [n, num_kv_heads, 1]
    overwrite_rows(table.kv[entry, offset], held, rotation, rows, k, v)
