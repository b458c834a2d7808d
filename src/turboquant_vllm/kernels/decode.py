"""Paged attention that reads packed TurboQuant pages directly: decode, prefill chunks and mixed batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels.decode_reduce import (
    REDUCE_BLOCK_R,
    REDUCE_NUM_WARPS,
    REDUCE_PLAIN_ROWS,
    REDUCE_STEP_ELEMENTS,
    _reduce_splits_kernel,
    _rotate_queries_kernel,
    _rotate_rows,
    _store_unrotated,
    reduce_grid,
)
from turboquant_vllm.kernels.lut import lut_decode_words
from turboquant_vllm.kernels.page import context_tile, split_words
from turboquant_vllm.kernels.store import check_slots, one_token_block_k, store_head
from turboquant_vllm.key_offset import KeyOffset, check_key_offset
from turboquant_vllm.quantizer import TINY_NORM

LOG2E = 1.4426950408889634
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


ROT_CHUNK = 16  # columns of R per rotation step: keeps R slices small in registers
INTERPRETER_ROT_CHUNK = 32  # fewer steps under the CPU interpreter, still several per head


@dataclass(frozen=True)
class _Tiles:
    """Launch shape for one padded head_dim; nothing here depends on sequence lengths."""

    block_n: int  # cached context tokens per inner step
    decode_m: int  # (query token x group) rows per program when every q_len fits one tile
    varlen_m: int  # rows per program once a prefill chunk is in the batch
    num_warps: int
    num_stages: int = 2  # software pipelining of the context loop's loads
    maxnreg: int | None = None  # register cap of swapped decode launches with block_n tiles (see _attention_meta)
    prefetch: bool = True  # load tile t+1 while computing tile t
    wide_block_n: int | None = None  # block_n once a launch has >= WIDE_MIN_SPLITS splits (see below)
    lut: bool = True  # 4-bit lookups by byte permute in registers on the GPU (kernels/lut.py)
    swap_ab: bool = False  # decode tiles: K.q^T and V^T.p^T, the tile's tokens (not padded query rows) on the M side
    reduce_splits: int = 8  # splits the split-K reduce reads per step ([16 rows, this, BLOCK_D] fp32 in registers)
    reduce_rot_chunk: int = ROT_CHUNK  # columns of R per un-rotation step in the reduce (BLOCK_D: one dot)
    # Launches with at least this many splits have each split program normalise and un-rotate its own output,
    # so the reduce is a plain weighted sum of reduce_plain_rows rows a program with no R (None: never).
    unrotated_min_splits: int | None = None
    reduce_plain_rows: int = REDUCE_PLAIN_ROWS
    reduce_rows: int = REDUCE_BLOCK_R  # rows a program of the un-rotating reduce (below 16: no dot, see _reduce_meta)
    # Launches with at least this many splits rotate the step's queries once, in a launch of their own, instead of
    # in every split program (None: never).
    prerotate_q_min_splits: int | None = None


# 4 warps and no software pipelining: on the H200 (decode_h200_2026-11-28b.json) this halved the
# 16 x 32K decode time against 8 warps / 2 stages, and several small programs per SM beat one large one.
# d=128 with the register lookups (decode_sweep_h200_2026-11-30e.json): 64-token tiles 553 us at 16 x 32K against
# 699 us with 32 and 597 us with 128; 1 or 2 warps per program were slower. A launch split WIDE_MIN_SPLITS ways is
# a batch of one or two sequences with ~2 programs per SM, where a wider tile (more bytes in flight) wins:
# 62 us at 1 x 32K with 128-token tiles against 77 us with 64.
# Swapped MMA operands (decode_h200_2026-12-01a/b.json): Triton then emits Hopper wgmma for the decode tile; capped
# at 168 registers (3 programs per SM) 16 x 32K took 507 us against 712 us unswapped and 718 us swapped uncapped
# (176 registers after rounding: 2 per SM); 1 x 32K (wide tiles, no cap) 59 us against 63 us.
# The split-K reduce (decode_h200_2026-12-01d.json): un-rotating with the whole of R in one dot instead of 16-column
# slices took 1 x 4K from 32.7 to 27.7 us (attention + reduce) and 1 x 32K from 59.8 to 54.9 us; how many splits it
# reads per step matters less (1: 30.4 us). Up to d=128 R fits one dot; reduce_splits keeps the reduce unspilled.
# Un-rotating in the split programs instead (decode_h200_2026-12-01f.json) pays at 32 splits, where the reduce is
# what a one-sequence step waits for: 1 x 4K 27.3 -> 24.1 us, 1 x 32K 54.5 -> 51.8 us; with the 3 splits of a
# 16-sequence batch it costs (16 x 4K 81.7 -> 88.2 us, 16 x 32K 503 -> 517 us). In the engine at 4K x 1
# (engine_h200_2026-12-01f/g.json) the attention kernel went from 16.5 to 20.5 us a layer and the reduce from 11.6 to
# 3.3 us: 5.74 -> 5.60 ms a token. The plain reduce's rows a program (1, 2, 4) measured equal (..._12-01g.json).
WIDE_MIN_SPLITS = 32
MAX_SPLITS = 32  # split-K width the vLLM backend's workspace holds (and the benchmarks size theirs to)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # keys of _attention_meta that are compile options
# fmt: off
_TILES = {
    32: _Tiles(64, 16, 64, 4, num_stages=1, reduce_splits=32, reduce_rot_chunk=32),
    64: _Tiles(64, 16, 64, 4, num_stages=1, reduce_splits=16, reduce_rot_chunk=64),
    128: _Tiles(
        64, 16, 64, 4, num_stages=1, wide_block_n=128, swap_ab=True, maxnreg=168, reduce_splits=2,
        reduce_rot_chunk=128, unrotated_min_splits=WIDE_MIN_SPLITS,
    ),
    256: _Tiles(16, 16, 32, 8, num_stages=1, reduce_splits=2),
    512: _Tiles(16, 16, 16, 8, num_stages=1, reduce_splits=1),
}
# fmt: on


@dataclass
class AttentionWorkspace:
    """Split-K partials, preallocated once so launches never allocate (CUDA-graph capture).

    acc: fp32 [max_tokens, num_heads, max_splits, head_dim], unnormalised, rotated basis.
    row_max, row_sum: fp32 [max_tokens, num_heads, max_splits], softmax max (log2 units) and sum.
    query: fp32 [max_tokens, num_heads, head_dim], contiguous: the step's queries rotated once (q R^T).
    """

    acc: torch.Tensor
    row_max: torch.Tensor
    row_sum: torch.Tensor
    query: torch.Tensor

    @classmethod
    def allocate(
        cls, max_tokens: int, num_heads: int, head_dim: int, max_splits: int, device: torch.device | str
    ) -> AttentionWorkspace:
        acc = torch.empty(max_tokens, num_heads, max_splits, head_dim, dtype=torch.float32, device=device)
        stats = torch.empty(2, max_tokens, num_heads, max_splits, dtype=torch.float32, device=device)
        query = torch.empty(max_tokens, num_heads, head_dim, dtype=torch.float32, device=device)
        return cls(acc, stats[0], stats[1], query)

    @property
    def max_tokens(self) -> int:
        return self.acc.shape[0]

    @property
    def max_splits(self) -> int:
        return self.acc.shape[2]


def _reduce_meta(
    num_heads: int, head_dim: int, block_d: int, plain: bool, op_dtype: tl.dtype, prec: str
) -> dict[str, Any]:
    """Compile-time parameters and launch options of _reduce_splits_kernel (shared with compile checks).

    plain: the split programs stored normalised, un-rotated partials, so the reduce is a weighted sum with no
    16-row dot: fewer rows a program, more splits a step. Otherwise tiles.reduce_rows picks the un-rotation:
    a dot for 16-row programs, fp32 multiply-adds for fewer rows (more programs, each reading R once).
    """
    tiles = _TILES[block_d]
    block_r = tiles.reduce_plain_rows if plain else tiles.reduce_rows
    by_dot = not plain and block_r >= REDUCE_BLOCK_R
    per_step = max(1, REDUCE_STEP_ELEMENTS // (block_r * block_d))  # splits (or R columns) a dot-free step takes
    step_splits = tiles.reduce_splits if by_dot else min(MAX_SPLITS, per_step)
    rot_chunk = tiles.reduce_rot_chunk if by_dot else min(block_d, max(1, per_step // 2))  # R slice + product
    return dict(
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, STEP_SPLITS=step_splits,
        ROTATED=not plain, UNROTATE_BY_DOT=by_dot, ROT_CHUNK=rot_chunk, OP_DTYPE=op_dtype, PREC=prec,
        num_warps=REDUCE_NUM_WARPS,
    )  # fmt: skip


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_splits: int, num_sms: int, head_dim: int = 128) -> int:
    """Splits per sequence so a decode batch launches about two waves of 4-warp programs' worth of warps.

    One split when (sequence, KV head) programs alone already fill the SMs that way: splitting then
    only adds workspace traffic. Sequence lengths are deliberately ignored so the choice is made on
    the host without reading device tensors.
    """
    per_sm = max(1, 4 // _TILES[triton.next_power_of_2(head_dim)].num_warps)  # narrower programs: more of them
    programs = max(1, num_seqs) * max(1, num_kv_heads)
    if programs >= num_sms * per_sm or max_splits <= 1:
        return 1
    return max(1, min(max_splits, triton.cdiv(2 * num_sms * per_sm, programs)))


@triton.jit
def _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning q-tile program `pid`: sequence s's tiles start at qsl[s] // BLOCK_Q + s."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _rotate_vector(x_ptr, stride_d, rot_ptr, stride_r0, stride_r1,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """R @ x for one vector in memory, fp32 [BLOCK_D]: CHUNK columns of R at a time, never the whole matrix."""
    n = tl.arange(0, BLOCK_D)
    y = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, HEAD_DIM, CHUNK):
        k = c0 + tl.arange(0, CHUNK)
        k_ok = k < HEAD_DIM
        x = tl.load(x_ptr + k * stride_d, mask=k_ok, other=0.0).to(tl.float32)
        r = tl.load(rot_ptr + n[:, None] * stride_r0 + k[None, :] * stride_r1,
                    mask=(n < HEAD_DIM)[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        y += tl.sum(r * x[None, :], 1)
    return y


@triton.jit
def _softmax_step(s, m_i, l_i, TOK_AXIS: tl.constexpr = 1):
    """One online-softmax update in log2 units: a score tile s (tokens on TOK_AXIS, query rows on the
    other) against each row's running max m_i and sum l_i.

    Returns the tile's probabilities p, the factor alpha that rescales earlier accumulators, and the
    new (max, sum). Rows that have seen only -inf keep a reference of 0 so exp2 never sees inf - inf.
    """
    m_new = tl.maximum(m_i, tl.max(s, TOK_AXIS))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - tl.expand_dims(m_ref, TOK_AXIS))
    return p, alpha, m_new, l_i * alpha + tl.sum(p, TOK_AXIS)


# Counts that change from step to step are not specialised on (Triton would compile a variant for 1, for
# multiples of 16 and for the rest): a batch size first seen while serving then never stalls on a compile.
@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    rot_ptr, k_cent_ptr, v_cent_ptr, lut_ptr, koff_ptr, out_ptr, ws_acc_ptr, ws_max_ptr, ws_sum_ptr, ws_q_ptr,
    slot_ptr, k_bnd_ptr, k_cent32_ptr, v_bnd_ptr, v_cent32_ptr, koff_orig_ptr,
    num_seqs, num_splits, qk_scale,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od, stride_bt,
    stride_at, stride_ah, stride_as, stride_mt, stride_mh, stride_ms, stride_r0, stride_r1,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, ROT_CHUNK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
    K_INDEX_OFFSET: tl.constexpr, K_INDEX_BYTES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr, V_INDEX_BYTES: tl.constexpr, V_SCALE_OFFSET: tl.constexpr,
    INDEX_ALIGN: tl.constexpr, OP_DTYPE: tl.constexpr, PREC: tl.constexpr, FUSED: tl.constexpr,
    PREFETCH: tl.constexpr, HAS_KEY_OFFSET: tl.constexpr, K_LUT: tl.constexpr, V_LUT: tl.constexpr,
    SWAP_AB: tl.constexpr, UNROTATED_PARTIALS: tl.constexpr, Q_ROTATED: tl.constexpr,
    STORE_NEW: tl.constexpr, STORE_BLOCK_K: tl.constexpr, NORM_CORRECTION: tl.constexpr, TINY: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_Q query tokens x GROUP heads of one KV head, over one split of the context.

    Context K/V stay in the rotated basis (scores = (q R^T) . c[k_idx] * k_scale); this step's
    exact tokens are handled by the last split: scores against q itself, V rotated on the fly.
    With HAS_KEY_OFFSET, a key stored relative to the layer's offset (negative scale) scores
    |k_scale| * (q R^T) . c[k_idx] + (q R^T) . (R offset), koff_ptr holding R offset per KV head.
    With STORE_NEW the last split also quantises its tile's new K/V into their pages (slot_ptr), as
    store.store_kv would: no program reads those slots from the pages in this launch.
    """
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.maximum(_find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q), 0)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q0 = (pid - q_start // BLOCK_Q - seq) * BLOCK_Q
    if (q0 < 0) | (q0 >= q_len):
        return
    ctx_len = tl.load(seq_lens_ptr + seq) - q_len

    row = tl.arange(0, BLOCK_M)
    qi = q0 + row // GROUP  # query index inside the sequence
    row_ok = (row // GROUP < BLOCK_Q) & (qi < q_len)
    tok = (q_start + qi).to(tl.int64)
    head = kv_head * GROUP + row % GROUP
    kh = kv_head.to(tl.int64)
    dim = tl.arange(0, BLOCK_D)
    dim_ok = dim < HEAD_DIM
    q_off = tok * stride_qt + head * stride_qh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Cached context: this split's contiguous share of the BLOCK_N tiles, scored in the rotated basis.
    n_tiles = tl.cdiv(ctx_len, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, n_tiles)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    # Software prefetch: tile t+1's loads are issued before tile t is computed, hiding their latency;
    # the tile after this split's last one reads nothing (positions past ctx_hi are masked). The first
    # tile's loads go out before the query rotation, whose R reads from L2 would otherwise delay them.
    ctx_hi = tl.minimum(ctx_len, tile_hi * BLOCK_N)
    if PREFETCH:
        live, k_words, k_scale, v_words, v_scale = context_tile(
            tile_lo, ctx_hi, bt_row, cache_ptr, kh, BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, K_BITS, V_BITS,
            PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES,
            V_SCALE_OFFSET, INDEX_ALIGN)  # fmt: skip
    if Q_ROTATED:  # rotated by _rotate_queries_kernel into ws_q_ptr: contiguous [tokens, heads, HEAD_DIM]
        q_rot_off = (tok * (GROUP * tl.num_programs(1)) + head) * HEAD_DIM
        q_rot = tl.load(ws_q_ptr + q_rot_off[:, None] + dim[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    else:
        q_rot = _rotate_rows(q_ptr, q_off, row_ok, stride_qd, rot_ptr, stride_r0, stride_r1,
                             HEAD_DIM, BLOCK_D, ROT_CHUNK, BLOCK_M, PREC)  # fmt: skip
    q_rot = q_rot * qk_scale  # log2 units: softmax uses exp2
    if HAS_KEY_OFFSET:
        q_dot_off = tl.sum(q_rot * tl.load(koff_ptr + kh * HEAD_DIM + dim, mask=dim_ok, other=0.0)[None, :], 1)
    q_rot = q_rot.to(OP_DTYPE)
    TOK_AXIS: tl.constexpr = 0 if SWAP_AB else 1  # the axis of a score tile that holds its tokens
    ROW_AXIS: tl.constexpr = 1 - TOK_AXIS
    if SWAP_AB:  # scores and output transposed: the tile's tokens and head dims fill the MMA's M side
        q_rot_t = tl.trans(q_rot)
        acc_t = tl.trans(acc)
    for tile in range(tile_lo, tile_hi):
        if PREFETCH:
            nxt = context_tile(
                tile + 1, ctx_hi, bt_row, cache_ptr, kh, BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, K_BITS, V_BITS,
                PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES,
                V_SCALE_OFFSET, INDEX_ALIGN)  # fmt: skip
        else:
            live, k_words, k_scale, v_words, v_scale = context_tile(
                tile, ctx_len, bt_row, cache_ptr, kh, BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, K_BITS, V_BITS,
                PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES,
                V_SCALE_OFFSET, INDEX_ALIGN)  # fmt: skip
        if K_LUT:
            k = lut_decode_words(k_words, lut_ptr, BLOCK_N, BLOCK_D)
        else:
            k = tl.load(k_cent_ptr + split_words(k_words, K_BITS, BLOCK_D, BLOCK_N)).to(OP_DTYPE)
        if V_LUT:
            v = lut_decode_words(v_words, lut_ptr + 4, BLOCK_N, BLOCK_D)
        else:
            v = tl.load(v_cent_ptr + split_words(v_words, V_BITS, BLOCK_D, BLOCK_N)).to(OP_DTYPE)
        # [BLOCK_N, BLOCK_M] swapped, else [BLOCK_M, BLOCK_N]
        s = tl.dot(k, q_rot_t, input_precision=PREC) if SWAP_AB else tl.dot(q_rot, tl.trans(k), input_precision=PREC)
        if HAS_KEY_OFFSET:
            shift = (k_scale < 0).to(tl.float32)
            s = s * tl.expand_dims(tl.abs(k_scale), ROW_AXIS) + (
                tl.expand_dims(q_dot_off, TOK_AXIS) * tl.expand_dims(shift, ROW_AXIS))  # fmt: skip
        else:
            s = s * tl.expand_dims(k_scale, ROW_AXIS)
        s = tl.where(tl.expand_dims(live, ROW_AXIS), s, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, TOK_AXIS)
        pv = (p * tl.expand_dims(v_scale, ROW_AXIS)).to(OP_DTYPE)
        if SWAP_AB:
            acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), pv, input_precision=PREC)
        else:
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PREC)
        if PREFETCH:
            live, k_words, k_scale, v_words, v_scale = nxt

    if SWAP_AB:
        acc = tl.trans(acc_t)

    # This step's tokens (last split only), exact and causal: new token j is visible to query i iff j <= i.
    # One token at a time with fp32 vector math: scores in the original basis (q.k = Rq.Rk), V rotated by a
    # chunked mat-vec, so the accumulator stays in the rotated basis and no d x d tile ever sits in registers.
    if split == num_splits - 1:
        q = tl.load(q_ptr + q_off[:, None] + dim[None, :] * stride_qd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        for j in range(0, tl.minimum(q_len, q0 + BLOCK_Q)):
            kv_tok = (q_start + j).to(tl.int64)
            k_new = tl.load(k_ptr + kv_tok * stride_kt + kh * stride_kh + dim * stride_kd, mask=dim_ok, other=0.0)
            s_new = tl.sum(q * k_new.to(tl.float32)[None, :], 1) * qk_scale
            s_new = tl.where(row_ok & (j <= qi), s_new, float("-inf"))
            p_new, alpha, m_i, l_i = _softmax_step(s_new[:, None], m_i, l_i)  # a one-column score tile
            v_rot = _rotate_vector(v_ptr + kv_tok * stride_vt + kh * stride_vh, stride_vd, rot_ptr, stride_r0,
                                   stride_r1, HEAD_DIM, BLOCK_D, ROT_CHUNK)  # fmt: skip
            acc = acc * alpha[:, None] + p_new * v_rot[None, :]
        if STORE_NEW:
            for j in range(q0, tl.minimum(q_len, q0 + BLOCK_Q)):
                kv_tok = tl.zeros([1], tl.int64) + q_start + j  # one-token tiles for store_head
                slot = tl.load(slot_ptr + kv_tok).to(tl.int64)
                store_head(k_ptr + kv_tok[:, None] * stride_kt + kh * stride_kh,
                           v_ptr + kv_tok[:, None] * stride_vt + kh * stride_vh, slot >= 0, slot // BLOCK_SIZE,
                           slot % BLOCK_SIZE, kh, cache_ptr, rot_ptr, stride_r0, stride_r1, k_bnd_ptr, k_cent32_ptr,
                           v_bnd_ptr, v_cent32_ptr, koff_orig_ptr, HEAD_DIM, BLOCK_D, 1, STORE_BLOCK_K, K_BITS,
                           V_BITS, PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET,
                           V_INDEX_OFFSET, V_INDEX_BYTES, V_SCALE_OFFSET, NORM_CORRECTION, TINY, "ieee",
                           HAS_KEY_OFFSET)  # fmt: skip

    if FUSED or UNROTATED_PARTIALS:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if FUSED:
        _store_unrotated(out_ptr, tok * stride_ot + head * stride_oh, row_ok, stride_od, o, rot_ptr, stride_r0,
                         stride_r1, HEAD_DIM, BLOCK_D, ROT_CHUNK, OP_DTYPE, PREC)  # fmt: skip
    else:
        stat_off = tok * stride_mt + head * stride_mh + split * stride_ms
        tl.store(ws_max_ptr + stat_off, m_i, mask=row_ok)
        tl.store(ws_sum_ptr + stat_off, l_i, mask=row_ok)
        acc_off = tok * stride_at + head * stride_ah + split * stride_as
        if UNROTATED_PARTIALS:  # normalised and in the original basis: the reduce is then a plain weighted sum
            _store_unrotated(ws_acc_ptr, acc_off, row_ok & (l_i > 0), 1, o, rot_ptr, stride_r0, stride_r1,
                             HEAD_DIM, BLOCK_D, ROT_CHUNK, OP_DTYPE, PREC)  # fmt: skip
        else:
            tl.store(ws_acc_ptr + acc_off[:, None] + dim[None, :], acc,
                     mask=(row_ok & (l_i > 0))[:, None] & dim_ok[None, :])  # fmt: skip


def _attention_meta(
    codec: KVCodec,
    num_heads: int,
    query_dtype: torch.dtype,
    on_gpu: bool,
    max_query_len: int,
    block_size: int,
    fused: bool,
    num_splits: int = 1,
    key_offset: bool = False,
    store_new: bool = False,
) -> dict[str, Any]:
    """Compile-time parameters and launch options of _attention_kernel (shared with compile checks)."""
    lay = codec.layout
    group = num_heads // lay.num_kv_heads
    block_d = triton.next_power_of_2(lay.head_dim)
    tiles = _TILES[block_d]
    wide = tiles.wide_block_n is not None and num_splits >= WIDE_MIN_SPLITS
    block_n = tiles.wide_block_n if wide else tiles.block_n
    block_m = max(tiles.decode_m, triton.next_power_of_2(group))
    varlen = max_query_len > block_m // group
    if varlen:  # a prefill chunk: taller q tiles re-read the pages less often
        block_m = max(tiles.varlen_m, triton.next_power_of_2(group))
    exact = query_dtype == torch.float32
    lut = tiles.lut and on_gpu and not exact  # PTX: not for the CPU interpreter; fp16 tables only
    k_lut, v_lut = lut and codec.lut_usable[0], lut and codec.lut_usable[1]
    # Only decode tiles are swapped (a prefill tile's query rows already fill the MMA), and on the GPU only with
    # register lookups: with codebook gathers (2/3 bits) the swapped, capped kernel made illegal memory accesses
    # on the H200. The interpreter keeps the swap so CPU tests check its arithmetic. The register cap was sized
    # for the block_n tile; wide tiles spill under it.
    swap = tiles.swap_ab and not varlen and (k_lut and v_lut or not on_gpu)
    cap = tiles.maxnreg if swap and not wide else None
    meta = dict(
        GROUP=group, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_Q=block_m // group,
        BLOCK_N=block_n, ROT_CHUNK=ROT_CHUNK if on_gpu else INTERPRETER_ROT_CHUNK,
        **lay.kernel_constants(block_size), INDEX_ALIGN=lay.index_alignment(block_size),
        OP_DTYPE=tl.float32 if exact else tl.float16, PREC="ieee" if exact else "tf32",
        FUSED=fused, PREFETCH=tiles.prefetch, HAS_KEY_OFFSET=key_offset,
        SWAP_AB=swap, K_LUT=k_lut, V_LUT=v_lut, UNROTATED_PARTIALS=_at_least(tiles.unrotated_min_splits, num_splits),
        Q_ROTATED=_at_least(tiles.prerotate_q_min_splits, num_splits),
        STORE_NEW=store_new, STORE_BLOCK_K=one_token_block_k(), NORM_CORRECTION=codec.config.norm_correction,
        TINY=TINY_NORM,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if cap:
        meta["maxnreg"] = cap
    return meta


def _at_least(min_splits: int | None, num_splits: int) -> bool:
    """Whether a split-K launch of num_splits takes an option of _Tiles that starts at min_splits."""
    return num_splits > 1 and min_splits is not None and num_splits >= min_splits


def _check_rows(name: str, x: torch.Tensor, rows: int, heads: int, head_dim: int) -> None:
    assert x.dim() == 3 and x.shape[0] >= rows and x.shape[1:] == (heads, head_dim), (
        f"{name} must be [>= {rows}, {heads}, {head_dim}], got {tuple(x.shape)}"
    )
    assert x.dtype in QUERY_DTYPES, f"{name} must be fp16/bf16/fp32, got {x.dtype}"


def paged_attention(
    codec: KVCodec,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    max_query_len: int,
    num_splits: int,
    workspace: AttentionWorkspace | None = None,
    key_offset: KeyOffset | None = None,
    store_slots: torch.Tensor | None = None,
) -> None:
    """Causal attention of each sequence's new tokens over its packed context plus themselves.

    Same semantics as kernels.reference.paged_attention_ref: sequence s owns query rows
    [query_start_loc[s], query_start_loc[s+1]) whose exact K/V are the same rows of key/value;
    its first seq_lens[s] - q_len tokens are read from `cache` through block_table[s].

    Args:
        query: [T, num_heads, head_dim] fp16/bf16/fp32, original basis; any strides.
        key, value: [>= T, num_kv_heads, head_dim], this step's exact K/V; any strides.
        cache: uint8 [num_blocks, block_size, bytes_per_token], contiguous, pages laid out by codec.layout.
        block_table: int32/int64 [>= num_seqs, max_blocks]; seq_lens: [>= num_seqs];
            query_start_loc: [num_seqs + 1], all on the device (never read on the host).
        out: [T, num_heads, head_dim], written in its own dtype; rows outside
            [query_start_loc[0], query_start_loc[-1]) are left untouched.
        max_query_len: host-side bound on q_len; only picks the tile shape, never the result.
        num_splits: split-K factor over the context (see choose_num_splits); 1 fuses everything.
        workspace: preallocated split-K buffers; required for allocation-free (graph) launches.
        key_offset: the layer's key offset if its keys were stored with one (key_offset.py).
        store_slots: int32/int64 [num_tokens], optional: also store this step's K/V at these slots (negative =
            skip), in the launch instead of a store_kv before it; the same bytes store_kv writes.
    """
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
    rot = codec.rotation
    devices = {t.device for t in (query, key, value, cache, block_table, seq_lens, query_start_loc, out, rot)}
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
    offset = check_key_offset(key_offset, num_kv_heads, head_dim, cache.device, rotated=True)
    if store_slots is not None:
        check_slots(store_slots, num_tokens, cache.device)
        assert key.stride(2) == 1 and value.stride(2) == 1, "a fused store needs key/value contiguous in head_dim"
    if num_tokens == 0 or num_seqs <= 0:
        return

    fused = num_splits == 1
    if fused:
        acc_buf = max_buf = sum_buf = q_buf = out
        acc_strides = stat_strides = (0, 0, 0)
    else:
        if workspace is None:
            workspace = AttentionWorkspace.allocate(num_tokens, num_heads, head_dim, num_splits, query.device)
        acc_buf, max_buf, sum_buf = workspace.acc, workspace.row_max, workspace.row_sum
        assert acc_buf.shape[0] >= num_tokens and acc_buf.shape[1:] == (num_heads, workspace.max_splits, head_dim), (
            f"workspace acc {tuple(acc_buf.shape)} cannot hold {num_tokens} tokens x {num_heads} heads x {head_dim}"
        )
        assert num_splits <= workspace.max_splits, f"num_splits={num_splits} > workspace {workspace.max_splits}"
        assert acc_buf.stride(3) == 1 and max_buf.stride() == sum_buf.stride(), "unexpected workspace strides"
        assert acc_buf.device == query.device, "workspace is on another device"
        acc_strides = acc_buf.stride()[:3]
        stat_strides = max_buf.stride()
        q_buf = workspace.query
        assert q_buf.is_contiguous() and q_buf.shape[1:] == (num_heads, head_dim), "unexpected workspace query"

    meta = _attention_meta(codec, num_heads, query.dtype, query.is_cuda, max_query_len, cache.shape[1], fused,
                           num_splits, offset is not None, store_slots is not None)  # fmt: skip
    if meta["Q_ROTATED"]:
        num_rows = num_tokens * num_heads
        _rotate_queries_kernel[reduce_grid(num_rows)](
            query, q_buf, rot, num_rows, *query.stride(), rot.stride(0), rot.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_R=REDUCE_BLOCK_R,
            CHUNK=meta["ROT_CHUNK"], PREC=meta["PREC"],
        )  # fmt: skip
    grid = (triton.cdiv(num_tokens, meta["BLOCK_Q"]) + num_seqs, num_kv_heads, num_splits)
    exact = query.dtype == torch.float32
    centroids = (codec.key.centroids, codec.value.centroids) if exact else codec.centroids_fp16
    _attention_kernel[grid](
        query, key, value, cache, block_table, seq_lens, query_start_loc,
        rot, *centroids, codec.lut, rot if offset is None else offset, out, acc_buf, max_buf, sum_buf, q_buf,
        rot if store_slots is None else store_slots, codec.key.boundaries, codec.key.centroids,
        codec.value.boundaries, codec.value.centroids, rot if key_offset is None else key_offset.original,
        num_seqs, num_splits, float(scale) * LOG2E,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        block_table.stride(0),
        *acc_strides, *stat_strides, rot.stride(0), rot.stride(1),
        **meta,
    )  # fmt: skip
    if fused:
        return
    num_rows = num_tokens * num_heads
    reduce_meta = _reduce_meta(num_heads, head_dim, meta["BLOCK_D"], meta["UNROTATED_PARTIALS"], meta["OP_DTYPE"],
                               meta["PREC"])  # fmt: skip
    _reduce_splits_kernel[reduce_grid(num_rows, reduce_meta["BLOCK_R"])](
        acc_buf, max_buf, sum_buf, rot, out, query_start_loc,
        num_seqs, num_rows, num_splits, *acc_strides, *stat_strides, *out.stride(), rot.stride(0), rot.stride(1),
        **reduce_meta,
    )  # fmt: skip
