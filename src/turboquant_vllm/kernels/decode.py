"""Paged attention that reads packed TurboQuant pages directly: decode, prefill chunks and mixed batches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode_tiles
from turboquant_vllm.kernels.decode_args import check_attention_args
from turboquant_vllm.kernels.decode_reduce import (
    REDUCE_BLOCK_R,
    _merge_splits,
    _publish_queries,
    _published_queries,
    _reduce_splits_kernel,
    _rotate_queries_kernel,
    _store_unrotated,
    find_seq,
    live_splits,
    reduce_grid,
)
from turboquant_vllm.kernels.fragment import (
    fold_row_halves,
    fp8_fragment_rows_from_tokens,
    fp8_queries,
    fragment_columns,
    fragment_rows,
    value_fragment_dims,
    value_fragment_probs,
)
from turboquant_vllm.kernels.lut import round_e4m3
from turboquant_vllm.kernels.page import context_tile, key_tile, tile_pages, value_tile
from turboquant_vllm.kernels.pdl import pdl_launch, pdl_option
from turboquant_vllm.kernels.recent import RecentTable, recent_context_end, recent_rows, reduce_writer_args
from turboquant_vllm.kernels.rotate import rotate_rows, rotate_vector
from turboquant_vllm.kernels.sinks import SinkTable, trusted_sinks
from turboquant_vllm.kernels.softmax import exact_rows_step, softmax_probs, softmax_step
from turboquant_vllm.kernels.store import store_kv, store_tokens
from turboquant_vllm.kernels.workspace import AttentionWorkspace
from turboquant_vllm.key_offset import KeyOffset

LOG2E = 1.4426950408889634


# Counts that change from step to step are not specialised on (Triton would compile a variant for 1, for
# multiples of 16 and for the rest): a batch size first seen while serving then never stalls on a compile.
@triton.jit(do_not_specialize=["num_seqs", "num_splits", "split_slots"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    rot_ptr, k_cent_ptr, v_cent_ptr, lut_ptr, koff_ptr, out_ptr, ws_acc_ptr, ws_max_ptr, ws_sum_ptr, ws_q_ptr,
    ws_ticket_ptr, slot_ptr, k_bnd_ptr, k_cent32_ptr, v_bnd_ptr, v_cent32_ptr, koff_orig_ptr,
    sink_kv_ptr, sink_tag_ptr, recent_kv_ptr, recent_tag_ptr,
    num_seqs, num_splits, split_slots, qk_scale, sink_entries, recent_entries,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od, stride_bt,
    stride_at, stride_ah, stride_as, stride_mt, stride_mh, stride_ms, stride_r0, stride_r1,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, ROT_CHUNK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
    K_INDEX_OFFSET: tl.constexpr, K_INDEX_BYTES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr, V_INDEX_BYTES: tl.constexpr, V_SCALE_OFFSET: tl.constexpr, V_COORD: tl.constexpr,
    INDEX_ALIGN: tl.constexpr, OP_DTYPE: tl.constexpr, PREC: tl.constexpr, FUSED: tl.constexpr,
    PREFETCH: tl.constexpr, PAGES_AHEAD: tl.constexpr, TILE_ROW_SUM: tl.constexpr, HAS_KEY_OFFSET: tl.constexpr,
    K_LUT: tl.constexpr, V_LUT: tl.constexpr, LUT_PAIRS: tl.constexpr,
    SWAP_AB: tl.constexpr, K_FRAGMENT: tl.constexpr, V_FRAGMENT: tl.constexpr, UNROTATED_PARTIALS: tl.constexpr,
    Q_ROTATED: tl.constexpr, Q_PUBLISHED: tl.constexpr,
    TAIL_MERGE: tl.constexpr, MERGE_SPLITS: tl.constexpr,
    STORE_NEW: tl.constexpr, STORE_BLOCK_K: tl.constexpr, STORE_CONTRACT_LAST: tl.constexpr,
    NORM_CORRECTION: tl.constexpr, TINY: tl.constexpr, PDL: tl.constexpr, SINKS: tl.constexpr,
    SINK_TILE: tl.constexpr, LIVE_SPLITS: tl.constexpr, FP8_KEYS: tl.constexpr, FP8_SCALE: tl.constexpr,
    RECENT: tl.constexpr, RECENT_TILE: tl.constexpr, FP8_QUERY_HALVES: tl.constexpr, FP8_HALVES_IN_ROWS: tl.constexpr,
    FP8_VALUES: tl.constexpr, FP8_V_SCALE: tl.constexpr, V_FP8_FRAGMENT: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_Q query tokens x GROUP heads of one KV head, over one split of the context.

    Context K/V stay in the rotated basis (scores = (q R^T) . c[k_idx] * k_scale); this step's
    exact tokens are handled by the last split: scores against q itself, V rotated on the fly.
    With HAS_KEY_OFFSET, a key stored relative to the layer's offset (negative scale) scores
    |k_scale| * (q R^T) . c[k_idx] + (q R^T) . (R offset), koff_ptr holding R offset per KV head.
    With STORE_NEW the launch also quantises its tiles' new K/V into their pages (slot_ptr), as store.store_kv
    would: no program reads those slots from the pages in this launch. One more program per (query tile, KV head),
    first in launch order, stores them and reads no context, so no split program's tail grows by a store.
    With Q_PUBLISHED those programs first rotate their tile's queries into the workspace and publish them with a
    ticket (release), which the split programs wait for (acquire) after their first page reads; the last reader
    resets it. The store programs are dispatched first and wait on nothing of this launch, so the wait ends.
    With TAIL_MERGE the split program that stores its partials last (a ticket per program row) merges them all
    and writes the output, so no reduce launch follows.
    With PDL (kernels/pdl.py) the block table and the first tile's pages are read before waiting for the kernel
    ahead: none of them is written in this step.
    With SINKS (kernels/sinks.py) split 0 scores the sequence's first SINKS context tokens from the exact side
    table where it holds them, as one more tile, and masks them out of its first packed tile.
    With RECENT (kernels/recent.py) the newest RECENT context positions that the window table holds, as one run up
    to the context's end, leave every split's packed tiles; the last split scores them from the table.
    With FP8_KEYS (Tiles.fp8_keys) the context's keys are FP8_SCALE * centroids in e4m3 (lut_fp8_words, or under
    the CPU interpreter a gather from k_cent_ptr, which then holds those values) and the scores an fp8 MMA against
    the queries rounded to e4m3 (with FP8_QUERY_HALVES, plus a second fp8 MMA against the rounding's remainder,
    itself rounded; with FP8_HALVES_IN_ROWS both halves in one MMA, in the tile's padding rows); the step's own tokens
    still score against the unrounded queries.
    With V_COORD the pages hold V coordinate-major (layout.py, TQConfig.fp8_values): with FP8_VALUES the tile's V^T
    is FP8_V_SCALE * centroids in e4m3 and the value product an fp8 MMA against the probabilities times the value
    norms rounded to e4m3 (docs/decode-tuning.md, "Values in fp8"); otherwise the values are gathered for the
    16/32-bit product.
    """
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if STORE_NEW:  # the store programs come first in launch order
        split -= 1
    seq = tl.maximum(find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q), 0)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q0 = (pid - q_start // BLOCK_Q - seq) * BLOCK_Q
    splits = live_splits(qsl_ptr, num_seqs, num_splits, split_slots) if LIVE_SPLITS else num_splits  # padded batches
    if (q0 < 0) | (q0 >= q_len) | (split >= splits):
        if PDL:  # every program waits, so the launch never completes before the kernel ahead
            gdc_wait()
        return
    kh = kv_head.to(tl.int64)
    row = tl.arange(0, BLOCK_M)
    qi = q0 + row // GROUP  # query index inside the sequence
    row_ok = (row // GROUP < BLOCK_Q) & (qi < q_len)
    tok = (q_start + qi).to(tl.int64)
    head = kv_head * GROUP + row % GROUP
    dim = tl.arange(0, BLOCK_D)
    dim_ok = dim < HEAD_DIM
    q_off = tok * stride_qt + head * stride_qh
    q_rot_off = (tok * (GROUP * tl.num_programs(1)) + head) * HEAD_DIM  # workspace queries: [tokens, heads, HEAD_DIM]
    ticket = ws_ticket_ptr + pid * tl.num_programs(1) + kv_head
    if STORE_NEW:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if split < 0:
            if PDL:  # this step's queries and K/V come from the kernel ahead
                gdc_wait()
            if Q_PUBLISHED:  # before the store: the split programs wait for these
                _publish_queries(q_ptr, q_off, row_ok, stride_qd, ws_q_ptr, q_rot_off, rot_ptr, stride_r0, stride_r1,
                                 ticket, HEAD_DIM, BLOCK_D, ROT_CHUNK, BLOCK_M, PREC)  # fmt: skip
            store_tokens(
                k_ptr, v_ptr, slot_ptr, q_start + q0, tl.minimum(q_len - q0, BLOCK_Q), kh, stride_kt, stride_kh,
                stride_vt, stride_vh, cache_ptr, rot_ptr, stride_r0, stride_r1, k_bnd_ptr, k_cent32_ptr, v_bnd_ptr,
                v_cent32_ptr, koff_orig_ptr, HEAD_DIM, BLOCK_D, BLOCK_SIZE, STORE_BLOCK_K, K_BITS, V_BITS, PAGE_BYTES,
                RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES,
                V_SCALE_OFFSET, NORM_CORRECTION, TINY, HAS_KEY_OFFSET, STORE_CONTRACT_LAST, V_COORD)  # fmt: skip
            return
    ctx_len = tl.load(seq_lens_ptr + seq) - q_len

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Cached context: this split's contiguous share of the BLOCK_N tiles, scored in the rotated basis.
    n_tiles = tl.cdiv(ctx_len, BLOCK_N)
    per_split = tl.cdiv(n_tiles, splits)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, n_tiles)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    # Software prefetch: tile t+1's loads are issued before tile t is computed, hiding their latency;
    # the tile after this split's last one reads nothing (positions past ctx_hi are masked). The first
    # tile's loads go out before the query rotation, whose R reads from L2 would otherwise delay them.
    # With PAGES_AHEAD the block-table entries are read one tile earlier still, so issuing tile t+1's page
    # reads never waits on a block-table read.
    ctx_hi = tl.minimum(ctx_len, tile_hi * BLOCK_N)
    if PREFETCH:
        pages = tile_pages(tile_lo, ctx_hi, bt_row, BLOCK_N, BLOCK_SIZE)
        live, k_words, k_scale, v_words, v_scale = context_tile(
            tile_lo, ctx_hi, pages, cache_ptr, kh, BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, K_BITS, V_BITS,
            PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES,
            V_SCALE_OFFSET, INDEX_ALIGN, K_FRAGMENT, bt_row, V_FRAGMENT, V_COORD, V_FP8_FRAGMENT)  # fmt: skip
        if PAGES_AHEAD:
            pages = tile_pages(tile_lo + 1, ctx_hi, bt_row, BLOCK_N, BLOCK_SIZE)
    if PDL:  # queries, this step's K/V and the workspace from here on
        gdc_wait()
    first_rows = fragment_rows(BLOCK_N) if K_FRAGMENT else tl.arange(0, BLOCK_N)  # in context_tile's order
    if SINKS:  # positions of the first tile (split 0's) that the exact tile replaces
        sink_block = tl.load(bt_row).to(tl.int64)
        sink_row0 = (sink_block % sink_entries) * SINKS
        sink_ctx = tl.where(split == 0, ctx_len, 0)  # other splits hold no sinks: no tag loads there
        sink_drop = trusted_sinks(first_rows, sink_ctx, sink_tag_ptr, sink_row0, sink_block, SINKS)
        if PREFETCH:
            live = live & ~sink_drop
    if RECENT:  # the packed context ends where the exact window's held run starts
        win_lo = tl.maximum(ctx_len - RECENT, SINKS)  # past the sinks: no position is scored twice
        ctx_main = ctx_len
        if (ctx_hi > win_lo) | (split == splits - 1):  # splits reaching the window, and the one that scores it
            ctx_main = recent_context_end(ctx_len, win_lo, bt_row, recent_tag_ptr, kh, recent_entries, BLOCK_SIZE,
                                          RECENT_TILE)  # fmt: skip
        ctx_hi = tl.minimum(ctx_hi, ctx_main)
        if PREFETCH:
            live = live & (tile_lo * BLOCK_N + first_rows < ctx_hi)
    if Q_PUBLISHED:  # rotated by this tile's store program
        q_rot = _published_queries(ws_q_ptr, q_rot_off, row_ok, ticket, splits, HEAD_DIM, BLOCK_D)
    elif Q_ROTATED:  # rotated by _rotate_queries_kernel into ws_q_ptr
        q_rot = tl.load(ws_q_ptr + q_rot_off[:, None] + dim[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    else:
        q_rot = rotate_rows(q_ptr, q_off, row_ok, stride_qd, rot_ptr, stride_r0, stride_r1,
                            HEAD_DIM, BLOCK_D, ROT_CHUNK, BLOCK_M, PREC)  # fmt: skip
    q_rot = q_rot * qk_scale  # log2 units: softmax uses exp2
    if HAS_KEY_OFFSET:
        q_dot_off = tl.sum(q_rot * tl.load(koff_ptr + kh * HEAD_DIM + dim, mask=dim_ok, other=0.0)[None, :], 1)
    if FP8_KEYS:  # the fp8 score MMA's query operands
        q8, q8_lo = fp8_queries(q_rot, BLOCK_M, BLOCK_D, SWAP_AB, K_FRAGMENT, FP8_QUERY_HALVES, FP8_HALVES_IN_ROWS)
    q_rot = q_rot.to(OP_DTYPE)
    TOK_AXIS: tl.constexpr = 0 if SWAP_AB else 1  # the axis of a score tile that holds its tokens
    ROW_AXIS: tl.constexpr = 1 - TOK_AXIS
    if SWAP_AB:  # scores and output transposed: the tile's tokens and head dims fill the MMA's M side
        q_rot_t = tl.trans(fragment_columns(q_rot, BLOCK_M, BLOCK_D) if K_FRAGMENT else q_rot)
        acc_t = tl.trans(acc)
    if TILE_ROW_SUM:  # per-position partial sums: the row sum crosses warps once, after the loop
        l_tile = tl.zeros([BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N], tl.float32)
    for tile in range(tile_lo, tile_hi):
        if PREFETCH:
            if not PAGES_AHEAD:
                pages = tile_pages(tile + 1, ctx_hi, bt_row, BLOCK_N, BLOCK_SIZE)
            nxt = context_tile(
                tile + 1, ctx_hi, pages, cache_ptr, kh, BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, K_BITS, V_BITS,
                PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES,
                V_SCALE_OFFSET, INDEX_ALIGN, K_FRAGMENT, bt_row, V_FRAGMENT, V_COORD, V_FP8_FRAGMENT)  # fmt: skip
            if PAGES_AHEAD:
                pages = tile_pages(tile + 2, ctx_hi, bt_row, BLOCK_N, BLOCK_SIZE)
        else:
            live, k_words, k_scale, v_words, v_scale = context_tile(
                tile, ctx_hi, tile_pages(tile, ctx_hi, bt_row, BLOCK_N, BLOCK_SIZE), cache_ptr, kh, BLOCK_N,
                BLOCK_SIZE, HEAD_DIM, BLOCK_D, K_BITS, V_BITS, PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES,
                K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES, V_SCALE_OFFSET, INDEX_ALIGN, K_FRAGMENT,
                bt_row, V_FRAGMENT, V_COORD, V_FP8_FRAGMENT)  # fmt: skip
            if SINKS:
                live = live & ~(sink_drop & (tile == 0))
        k = key_tile(k_words, lut_ptr, k_cent_ptr, BLOCK_N, BLOCK_D, K_BITS, OP_DTYPE, K_LUT, LUT_PAIRS, K_FRAGMENT,
                     FP8_KEYS)  # fmt: skip
        v = value_tile(v_words, lut_ptr, v_cent_ptr, BLOCK_N, BLOCK_D, V_BITS, OP_DTYPE, V_LUT, LUT_PAIRS, V_FRAGMENT,
                       V_COORD, FP8_VALUES, K_FRAGMENT, V_FP8_FRAGMENT)  # fmt: skip
        # [BLOCK_N, BLOCK_M] swapped, else [BLOCK_M, BLOCK_N]
        if FP8_KEYS:  # the interpreter's fp8 dot is not exact: there, the same e4m3 values multiplied in fp32
            a, b = (k, q8) if SWAP_AB else (q8, tl.trans(k))
            s = tl.dot(a, b) if K_LUT else tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            if FP8_HALVES_IN_ROWS:
                s = fold_row_halves(s, BLOCK_M, BLOCK_N, SWAP_AB)
            elif FP8_QUERY_HALVES:
                a, b = (k, q8_lo) if SWAP_AB else (q8_lo, tl.trans(k))
                s = tl.dot(a, b, s) if K_LUT else tl.dot(a.to(tl.float32), b.to(tl.float32), s, input_precision="ieee")
            s = s * (1.0 / FP8_SCALE)
        elif SWAP_AB:
            s = tl.dot(k, q_rot_t, input_precision=PREC)
        else:
            s = tl.dot(q_rot, tl.trans(k), input_precision=PREC)
        if HAS_KEY_OFFSET:
            shift = (k_scale < 0).to(tl.float32)
            s = s * tl.expand_dims(tl.abs(k_scale), ROW_AXIS) + (
                tl.expand_dims(q_dot_off, TOK_AXIS) * tl.expand_dims(shift, ROW_AXIS))  # fmt: skip
        else:
            s = s * tl.expand_dims(k_scale, ROW_AXIS)
        s = tl.where(tl.expand_dims(live, ROW_AXIS), s, float("-inf"))
        if TILE_ROW_SUM:
            p, alpha, m_i = softmax_probs(s, m_i, TOK_AXIS)
            l_tile = l_tile * tl.expand_dims(alpha, TOK_AXIS) + p
        else:
            p, alpha, m_i, l_i = softmax_step(s, m_i, l_i, TOK_AXIS)
        pv = p * tl.expand_dims(v_scale, ROW_AXIS)  # fp32; each product takes it in its operand type
        if FP8_VALUES:  # e4m3 probabilities times the value norms; the interpreter multiplies the same values in fp32
            if SWAP_AB:
                if K_FRAGMENT:
                    pv = fp8_fragment_rows_from_tokens(pv, BLOCK_N, BLOCK_M)  # in V^T's column order
                if V_LUT:
                    acc_t = acc_t * alpha[None, :] + tl.dot(v, pv.to(tl.float8e4nv))
                else:
                    acc_t = acc_t * alpha[None, :] + tl.dot(v.to(tl.float32), round_e4m3(pv), input_precision="ieee")
            elif V_LUT:
                acc = acc * alpha[:, None] + tl.dot(pv.to(tl.float8e4nv), tl.trans(v))
            else:
                acc = acc * alpha[:, None] + tl.dot(round_e4m3(pv), tl.trans(v).to(tl.float32), input_precision="ieee")
        elif V_FRAGMENT:
            pv = value_fragment_probs(pv.to(OP_DTYPE), BLOCK_N, BLOCK_M)
            acc_t = acc_t * alpha[None, :] + tl.dot(v, pv, input_precision=PREC)  # v: V^T (value_tile)
        elif SWAP_AB:
            acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), pv.to(OP_DTYPE), input_precision=PREC)
        else:
            acc = acc * alpha[:, None] + tl.dot(pv.to(OP_DTYPE), v, input_precision=PREC)
        if PREFETCH:
            live, k_words, k_scale, v_words, v_scale = nxt

    if PDL:  # the reduce launch may take the SMs this launch's programs leave from now on
        gdc_launch_dependents()
    if SWAP_AB:
        acc = tl.trans(acc_t)
    if V_FRAGMENT:
        acc = value_fragment_dims(acc, BLOCK_M)
    if FP8_VALUES:
        acc = acc * (1.0 / FP8_V_SCALE)
    if TILE_ROW_SUM:
        l_i = tl.sum(l_tile, TOK_AXIS)
    if SINKS:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if split == 0:  # the exact sinks, rotated like the pages: one more tile
            sink = tl.arange(0, SINK_TILE)
            sink_ok = trusted_sinks(sink, sink_ctx, sink_tag_ptr, sink_row0, sink_block, SINKS)
            acc, m_i, l_i = exact_rows_step(q_rot, acc, m_i, l_i, sink_kv_ptr, (sink_row0 + sink).to(tl.int64),
                                            sink_ok, kh, HEAD_DIM, BLOCK_D, OP_DTYPE, PREC)  # fmt: skip
    if RECENT:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if split == splits - 1:  # the window's held run, rotated like the pages: one more tile
            win_pos = win_lo + tl.arange(0, RECENT_TILE)
            win_row, held = recent_rows(win_pos, ctx_len, bt_row, recent_tag_ptr, kh, recent_entries, BLOCK_SIZE)
            acc, m_i, l_i = exact_rows_step(q_rot, acc, m_i, l_i, recent_kv_ptr, win_row, held & (win_pos >= ctx_main),
                                            kh, HEAD_DIM, BLOCK_D, OP_DTYPE, PREC)  # fmt: skip

    # This step's tokens (last split only), exact and causal: new token j is visible to query i iff j <= i.
    # One token at a time with fp32 vector math: scores in the original basis (q.k = Rq.Rk), V rotated by a
    # chunked mat-vec, so the accumulator stays in the rotated basis and no d x d tile ever sits in registers.
    if split == splits - 1:
        q = tl.load(q_ptr + q_off[:, None] + dim[None, :] * stride_qd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        for j in range(0, tl.minimum(q_len, q0 + BLOCK_Q)):
            kv_tok = (q_start + j).to(tl.int64)
            k_new = tl.load(k_ptr + kv_tok * stride_kt + kh * stride_kh + dim * stride_kd, mask=dim_ok, other=0.0)
            s_new = tl.sum(q * k_new.to(tl.float32)[None, :], 1) * qk_scale
            s_new = tl.where(row_ok & (j <= qi), s_new, float("-inf"))
            p_new, alpha, m_i, l_i = softmax_step(s_new[:, None], m_i, l_i)  # a one-column score tile
            v_rot = rotate_vector(v_ptr + kv_tok * stride_vt + kh * stride_vh, stride_vd, rot_ptr, stride_r0,
                                  stride_r1, HEAD_DIM, BLOCK_D, ROT_CHUNK)  # fmt: skip
            acc = acc * alpha[:, None] + p_new * v_rot[None, :]

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
        if TAIL_MERGE:
            tl.debug_barrier()  # every thread's partials are written before the release below
            if tl.atomic_add(ticket, 1, sem="acq_rel") == splits - 1:  # the others' partials are visible
                tl.store(ticket, 0)  # ready for the next launch (CUDA-graph replays)
                # L2 reads (.cg): this SM's L1 may hold stale lines of the workspace from an earlier launch
                o = _merge_splits(ws_acc_ptr, ws_max_ptr, ws_sum_ptr, tok * stride_mt + head * stride_mh,
                                  tok * stride_at + head * stride_ah, row_ok, splits, stride_as, stride_ms,
                                  BLOCK_M, HEAD_DIM, BLOCK_D, MERGE_SPLITS, not UNROTATED_PARTIALS, ".cg")  # fmt: skip
                _store_unrotated(out_ptr, tok * stride_ot + head * stride_oh, row_ok, stride_od, o, rot_ptr,
                                 stride_r0, stride_r1, HEAD_DIM, BLOCK_D, ROT_CHUNK, OP_DTYPE, PREC,
                                 ROTATED=not UNROTATED_PARTIALS)  # fmt: skip


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
    split_slots: int = 0,
    workspace: AttentionWorkspace | None = None,
    key_offset: KeyOffset | None = None,
    store_slots: torch.Tensor | None = None,
    sinks: SinkTable | None = None,
    recent: RecentTable | None = None,
    write_recent: bool = False,
) -> bool:
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
        max_query_len: host-side bound on q_len (an upper bound: fp8 query halves in rows rely on it); picks tiles.
        num_splits: split-K factor over the context (see choose_num_splits); 1 fuses everything.
        split_slots: with num_splits > 1, the launch instead splits each sequence that has query rows into
            split_slots // (such sequences) parts, 1 to num_splits (decode_tiles.choose_split_grid): a CUDA graph
            captured for a padded batch then splits the live sequences of a smaller one finer. 0: num_splits.
        workspace: preallocated split-K buffers; required for allocation-free (graph) launches.
        key_offset: the layer's key offset if its keys were stored with one (key_offset.py).
        store_slots: int32/int64 [num_tokens], optional: also store this step's K/V at these slots (negative =
            skip) instead of a store_kv before the call, with the bytes store_kv writes: in the attention launch
            where Tiles.fused_store_min_splits says so, else by store_kv right after it (which with programmatic
            dependent launch, kernels/pdl.py, runs alongside the attention's last programs).
        sinks: exact first tokens (kernels/sinks.py); each sequence's first sinks.sink_tokens context positions
            are read from it where it holds them, else from the pages.
        recent: exact newest tokens (kernels/recent.py); each sequence's newest recent.recent_tokens context
            positions are read from it where it holds them, else from the pages. block_size must be a multiple of 16.
        write_recent: no read of `recent` follows in this step: the launches after the attention do
            recent.write_recent's work too, and the call returns True, where it can: the store of store_slots after
            the attention (Tiles.window_writer_in_store, if each sequence has at most recent.recent_tokens query
            rows), else a split-K reduce (Tiles.window_writer_in_reduce).
    """
    offset = check_attention_args(codec, query, key, value, cache, block_table, seq_lens, query_start_loc, out,
                                  num_splits, split_slots, key_offset, store_slots, sinks, recent)  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = codec.layout.num_kv_heads
    num_seqs = query_start_loc.shape[0] - 1
    rot = codec.rotation
    if num_tokens == 0 or num_seqs <= 0:
        return False

    fused = num_splits == 1
    if fused:
        acc_buf = max_buf = sum_buf = q_buf = tickets = out
        acc_strides = stat_strides = (0, 0, 0)
    else:
        if workspace is None:
            workspace = AttentionWorkspace.allocate(num_tokens, num_heads, head_dim, num_splits, query.device,
                                                    max_seqs=num_seqs)  # fmt: skip
        workspace.check(num_tokens, num_heads, head_dim, num_splits, query.device)
        acc_buf, max_buf, sum_buf = workspace.acc, workspace.row_max, workspace.row_sum
        acc_strides, stat_strides = acc_buf.stride()[:3], max_buf.stride()
        q_buf, tickets = workspace.query, workspace.tickets

    pdl = pdl_launch(query.device)
    # The store writes the window where every token of the step is among its sequence's last recent_tokens: it has
    # R k and R v at hand. It then runs after this launch, whose programs read the table.
    window_in_store = (write_recent and recent is not None and store_slots is not None
                       and max_query_len <= recent.recent_tokens
                       and decode_tiles.window_in_store(head_dim))  # fmt: skip
    store_in_kernel = (store_slots is not None and not window_in_store
                       and decode_tiles.stores_in_attention(head_dim, num_splits))  # fmt: skip
    meta = decode_tiles.attention_meta(
        codec, num_heads, query.dtype, query.is_cuda, max_query_len, cache.shape[1], fused, num_splits,
        offset is not None, store_in_kernel, pdl, 0 if sinks is None else sinks.sink_tokens,
        0 if recent is None else recent.recent_tokens, decode_tiles.fp8_mma_usable(query.device))  # fmt: skip
    if meta["Q_ROTATED"] and not meta["Q_PUBLISHED"]:
        num_rows = num_tokens * num_heads
        _rotate_queries_kernel[reduce_grid(num_rows)](
            query, q_buf, rot, num_rows, *query.stride(), rot.stride(0), rot.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_R=REDUCE_BLOCK_R,
            CHUNK=meta["ROT_CHUNK"], PREC=meta["PREC"], PDL=pdl, **pdl_option(pdl),
        )  # fmt: skip
    grid = (triton.cdiv(num_tokens, meta["BLOCK_Q"]) + num_seqs, num_kv_heads, num_splits + int(meta["STORE_NEW"]))
    if meta["TAIL_MERGE"] or meta["Q_PUBLISHED"]:
        assert grid[0] * num_kv_heads <= tickets.numel(), (
            f"workspace tickets ({tickets.numel()}) cannot count {grid[0]} query tiles x {num_kv_heads} KV heads: "
            "allocate it with max_seqs >= the batch's sequences"
        )
    exact = query.dtype == torch.float32
    centroids = (codec.key.centroids, codec.value.centroids) if exact else codec.centroids_fp16
    if meta["FP8_KEYS"]:  # the gather path's key table (the GPU's lookup reads the same values from codec.lut)
        centroids = (codec.key_centroids_e4m3, centroids[1])
    if meta["FP8_VALUES"]:  # the same for the values
        centroids = (centroids[0], codec.value_centroids_e4m3)
    _attention_kernel[grid](
        query, key, value, cache, block_table, seq_lens, query_start_loc,
        rot, *centroids, codec.lut, rot if offset is None else offset, out, acc_buf, max_buf, sum_buf, q_buf,
        tickets, rot if store_slots is None else store_slots, codec.key.boundaries, codec.key.centroids,
        codec.value.boundaries, codec.value.centroids, rot if key_offset is None else key_offset.original,
        *((rot, rot) if sinks is None else (sinks.kv, sinks.tags)),
        *((rot, rot) if recent is None else (recent.kv, recent.tags)),
        num_seqs, num_splits, split_slots, float(scale) * LOG2E, 1 if sinks is None else sinks.entries,
        1 if recent is None else recent.entries,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        block_table.stride(0),
        *acc_strides, *stat_strides, rot.stride(0), rot.stride(1),
        **meta,
    )  # fmt: skip
    wrote = False
    if not (fused or meta["TAIL_MERGE"]):
        num_rows = num_tokens * num_heads
        window = recent.recent_tokens if write_recent and recent is not None and not window_in_store else 0
        rmeta = decode_tiles.reduce_meta(num_heads, head_dim, meta["BLOCK_D"], meta["UNROTATED_PARTIALS"],
                                         meta["OP_DTYPE"], meta["PREC"], num_splits, pdl, window)  # fmt: skip
        wrote = rmeta["WRITE_RECENT"] > 0
        writers, writer_args, writer_meta = reduce_writer_args(recent if wrote else None, key, value, block_table,
                                                               seq_lens, num_seqs, cache.shape[1])  # fmt: skip
        _reduce_splits_kernel[(reduce_grid(num_rows, rmeta["BLOCK_R"])[0] + writers,)](
            acc_buf, max_buf, sum_buf, rot, out, query_start_loc,
            num_seqs, num_rows, num_splits, split_slots, *acc_strides, *stat_strides, *out.stride(),
            rot.stride(0), rot.stride(1), *writer_args,
            **rmeta, **writer_meta,
        )  # fmt: skip
    if store_slots is not None and not store_in_kernel:
        store_kv(codec, key, value, cache, store_slots[:num_tokens], key_offset, after_attention=True,
                 recent=recent if window_in_store else None)  # fmt: skip
    return wrote or window_in_store
