"""Split-K combine for paged attention, and what it shares with the attention kernel (including the handshake by
which store programs hand rotated queries to the split programs of the same launch)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from turboquant_vllm.kernels.recent import write_window
from turboquant_vllm.kernels.rotate import rotate_rows

REDUCE_BLOCK_R = 16  # rows per program when the reduce un-rotates by a dot (a dot needs 16)
MAX_LIVE_SEQS = 32  # most sequences a launch counts its live ones among (paged_attention's split_slots)
_LIVE_SEQS = tl.constexpr(MAX_LIVE_SEQS)
REDUCE_PLAIN_ROWS = 4  # rows per program for a plain weighted sum: more programs for a one-sequence batch
REDUCE_STEP_ELEMENTS = 16384  # fp32 values of one step without a dot, [rows, splits or columns, BLOCK_D]: 64 a
# thread at 8 warps
REDUCE_NUM_WARPS = 8


@triton.jit
def _publish_queries(q_ptr, q_off, row_ok, stride_qd, out_ptr, out_off, rot_ptr, stride_r0, stride_r1, ticket_ptr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr,
                     PREC: tl.constexpr):  # fmt: skip
    """Rotate a tile's query rows into the workspace (out_off: each row's offset there) and set its ticket to 1
    (release), for the split programs of the same launch that wait in _published_queries."""
    y = rotate_rows(q_ptr, q_off, row_ok, stride_qd, rot_ptr, stride_r0, stride_r1, HEAD_DIM, BLOCK_D, CHUNK, ROWS,
                    PREC)  # fmt: skip
    dim = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + out_off[:, None] + dim[None, :], y, mask=row_ok[:, None] & (dim < HEAD_DIM)[None, :])
    tl.debug_barrier()  # every thread's rows are written before the release below
    tl.atomic_add(ticket_ptr, 1, sem="release")


@triton.jit
def _published_queries(out_ptr, out_off, row_ok, ticket_ptr, num_readers, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr):  # fmt: skip
    """The rows _publish_queries wrote, once its ticket is set (acquire; read past a possibly stale L1). Each of the
    num_readers programs counts itself on the ticket, and the last one resets it to 0 for the next launch."""
    seen = tl.atomic_add(ticket_ptr, 0, sem="acquire")
    while seen == 0:
        seen = tl.atomic_add(ticket_ptr, 0, sem="acquire")
    dim = tl.arange(0, BLOCK_D)
    y = tl.load(out_ptr + out_off[:, None] + dim[None, :], mask=row_ok[:, None] & (dim < HEAD_DIM)[None, :], other=0.0,
                cache_modifier=".cg")  # fmt: skip
    if tl.atomic_add(ticket_ptr, 1, sem="relaxed") == num_readers:
        tl.store(ticket_ptr, 0)
    return y


@triton.jit(do_not_specialize=["num_rows"])
def _rotate_queries_kernel(
    q_ptr,  # [num_tokens, NUM_HEADS, HEAD_DIM], original basis, any strides
    out_ptr,  # fp32, contiguous [>= num_tokens, NUM_HEADS, HEAD_DIM]
    rot_ptr,
    num_rows,  # num_tokens * NUM_HEADS
    stride_qt,
    stride_qh,
    stride_qd,
    stride_r0,
    stride_r1,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CHUNK: tl.constexpr,
    PREC: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    """q R^T for BLOCK_R (token, head) rows: a step's queries rotated once, so the split programs of an
    attention launch read them instead of each rotating its own with the whole of R."""
    if PDL:  # the attention launch may start its page reads now; q is ready once the kernel ahead is
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = row < num_rows
    row_off = (row // NUM_HEADS).to(tl.int64) * stride_qt + (row % NUM_HEADS) * stride_qh
    y = rotate_rows(q_ptr, row_off, ok, stride_qd, rot_ptr, stride_r0, stride_r1, HEAD_DIM, BLOCK_D, CHUNK, BLOCK_R,
                    PREC)  # fmt: skip
    dim = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + dim[None, :], y, mask=ok[:, None] & (dim < HEAD_DIM))


@triton.jit
def _store_unrotated(
    out_ptr,
    row_off,  # int64 [ROWS]
    row_ok,  # bool [ROWS]
    stride_d,
    o,  # fp32 [ROWS, BLOCK_D], |o| of order 1 (columns past HEAD_DIM are ignored)
    rot_ptr,
    stride_r0,
    stride_r1,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    BY_DOT: tl.constexpr = True,
    ROTATED: tl.constexpr = True,
):
    """Store o in the original basis: o @ R, CHUNK output columns at a time (a [BLOCK_D, CHUNK] slice of R per
    step), or o as it is if it is not ROTATED.

    BY_DOT=False multiplies and adds in fp32 instead of a dot: for programs of fewer rows than a dot takes (16),
    so a one-sequence batch's rows spread over many programs."""
    k = tl.arange(0, BLOCK_D)
    if not ROTATED:
        tl.store(out_ptr + row_off[:, None] + k[None, :] * stride_d, o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (k < HEAD_DIM)[None, :])  # fmt: skip
    else:
        o_op = o.to(OP_DTYPE)
        for c0 in range(0, HEAD_DIM, CHUNK):
            n = c0 + tl.arange(0, CHUNK)
            n_ok = n < HEAD_DIM
            r = tl.load(
                rot_ptr + k[:, None] * stride_r0 + n[None, :] * stride_r1,
                mask=(k < HEAD_DIM)[:, None] & n_ok[None, :],
                other=0.0,
            )
            if BY_DOT:  # noqa: SIM108 - a constexpr branch, resolved at compile time
                y = tl.dot(o_op, r.to(OP_DTYPE), input_precision=PREC)
            else:
                y = tl.sum(o[:, :, None] * r[None, :, :], 1)
            tl.store(
                out_ptr + row_off[:, None] + n[None, :] * stride_d,
                y.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & n_ok[None, :],
            )


@triton.jit
def find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
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
def live_splits(qsl_ptr, num_seqs, num_splits, split_slots):
    """Splits per sequence in this launch: num_splits, or with split_slots > 0 as many as share split_slots among
    the sequences that have query rows (at least 1, at most num_splits). CUDA-graph padding rows have none, so the
    live sequences of a padded batch split finer in the same grid (decode_tiles.choose_split_grid)."""
    s = tl.arange(0, _LIVE_SEQS)
    ok = (s < num_seqs) & (split_slots > 0)
    q_lens = tl.load(qsl_ptr + s + 1, mask=ok, other=0) - tl.load(qsl_ptr + s, mask=ok, other=0)
    live = tl.maximum(tl.sum((q_lens > 0).to(tl.int32), 0), 1)
    return tl.where(split_slots > 0, tl.minimum(tl.maximum(split_slots // live, 1), num_splits), num_splits)


@triton.jit
def _merge_splits(
    ws_acc_ptr,
    ws_max_ptr,
    ws_sum_ptr,
    m_off,  # int64 [ROWS], offset of each row's split 0 in ws_max / ws_sum
    a_off,  # int64 [ROWS], the same in ws_acc
    ok,  # bool [ROWS]
    num_splits,
    stride_as,
    stride_ms,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STEP_SPLITS: tl.constexpr,
    ROTATED: tl.constexpr,
    CACHE: tl.constexpr,  # load cache modifier: ".cg" when other programs of the same launch wrote the partials
):
    """Each row's normalised output, fp32 [ROWS, BLOCK_D], from its splits' softmax partials.

    ROTATED: partials are unnormalised sums (the result stays in the rotated basis); otherwise each split stored
    its normalised output and this is a weighted sum. STEP_SPLITS splits are read per step with independent loads.
    """
    dim = tl.arange(0, BLOCK_D)
    dim_ok = dim < HEAD_DIM
    m_run = tl.full([ROWS], float("-inf"), tl.float32)
    l_run = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, STEP_SPLITS):
        split = s0 + tl.arange(0, STEP_SPLITS)
        live = ok[:, None] & (split < num_splits)[None, :]  # [ROWS, STEP_SPLITS]
        stat_off = m_off[:, None] + split[None, :] * stride_ms
        m_s = tl.load(ws_max_ptr + stat_off, mask=live, other=float("-inf"), cache_modifier=CACHE)
        l_s = tl.load(ws_sum_ptr + stat_off, mask=live, other=0.0, cache_modifier=CACHE)
        a_s = tl.load(ws_acc_ptr + (a_off[:, None] + split[None, :] * stride_as)[:, :, None] + dim[None, None, :],
                      mask=live[:, :, None] & dim_ok[None, None, :], other=0.0, cache_modifier=CACHE)  # fmt: skip
        m_new = tl.maximum(m_run, tl.max(m_s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_ref)
        beta = tl.exp2(m_s - m_ref[:, None])
        if not ROTATED:
            a_s = a_s * l_s[:, :, None]
        # Splits that saw no token (l_s == 0) never stored their acc: whatever is there must not reach the sum.
        a_s = tl.where((l_s > 0)[:, :, None], a_s * beta[:, :, None], 0.0)
        acc = acc * alpha[:, None] + tl.sum(a_s, 1)
        l_run = l_run * alpha + tl.sum(l_s * beta, 1)
        m_run = m_new
    return acc / tl.where(l_run > 0, l_run, 1.0)[:, None]


@triton.jit(do_not_specialize=["num_seqs", "num_rows", "num_splits", "split_slots", "recent_entries"])
def _reduce_splits_kernel(
    ws_acc_ptr,  # fp32 [max_tokens, num_heads, max_splits, HEAD_DIM], rotated basis, unnormalised
    ws_max_ptr,  # fp32 [max_tokens, num_heads, max_splits], running max (log2 units)
    ws_sum_ptr,  # fp32 [max_tokens, num_heads, max_splits], sum of exp2(score - max)
    rot_ptr,
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    qsl_ptr,  # [num_seqs + 1]
    num_seqs,
    num_rows,  # num_tokens * NUM_HEADS
    num_splits,
    split_slots,  # live_splits
    stride_at,
    stride_ah,
    stride_as,
    stride_mt,
    stride_mh,
    stride_ms,
    stride_ot,
    stride_oh,
    stride_od,
    stride_r0,
    stride_r1,
    # WRITE_RECENT: the exact window's writer (recent.write_window), one program per (sequence, KV head) after the
    # reduce's programs, in place of a launch of its own
    k_ptr,
    v_ptr,
    block_table_ptr,
    seq_lens_ptr,
    recent_kv_ptr,
    recent_tag_ptr,
    recent_entries,
    num_kv_heads,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    STEP_SPLITS: tl.constexpr,
    ROTATED: tl.constexpr,
    UNROTATE_BY_DOT: tl.constexpr,  # BLOCK_R >= REDUCE_BLOCK_R
    ROT_CHUNK: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
    ROT_AHEAD: tl.constexpr = False,  # all of R loaded before the partials (decode_tiles.Tiles.reduce_rot_ahead)
    LIVE_SPLITS: tl.constexpr = False,  # counts live sequences (decode_tiles.live_split_tiles)
    WRITE_RECENT: tl.constexpr = 0,  # the window's recent_tokens, 0: no writer programs
    BLOCK_SIZE: tl.constexpr = 16,  # tokens per page (the writer's slots)
    WRITER_ROT_CHUNK: tl.constexpr = 32,  # rotate.WRITER_ROT_CHUNK, passed with WRITE_RECENT (recent.py)
):
    """One (token, head) row per tile row: merge the splits' softmax partials (_merge_splits), rotate back, store.

    ROTATED partials are un-rotated after the merge: by a dot for 16-row programs, by multiply-adds for fewer rows.
    The writer programs (WRITE_RECENT) start with the reduce's, once the attention launch has read the table.
    """
    if ROT_AHEAD:  # R is no kernel's output: its loads need not wait for the attention launch
        dim = tl.arange(0, BLOCK_D)
        rot = tl.load(rot_ptr + dim[:, None] * stride_r0 + dim[None, :] * stride_r1,
                      mask=(dim < HEAD_DIM)[:, None] & (dim < HEAD_DIM)[None, :], other=0.0)  # fmt: skip
    if PDL:  # a store launched after this one may start now; the partials are the attention launch's
        gdc_launch_dependents()
        gdc_wait()
    if WRITE_RECENT:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if tl.program_id(0) >= tl.cdiv(num_rows, BLOCK_R):
            w = tl.program_id(0) - tl.cdiv(num_rows, BLOCK_R)
            write_window(w // num_kv_heads, (w % num_kv_heads).to(tl.int64), num_kv_heads, k_ptr, v_ptr,
                         block_table_ptr, seq_lens_ptr, qsl_ptr, rot_ptr, recent_kv_ptr, recent_tag_ptr,
                         recent_entries, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_bt,
                         stride_r0, stride_r1, WRITE_RECENT, BLOCK_SIZE, HEAD_DIM, BLOCK_D,
                         WRITER_ROT_CHUNK)  # fmt: skip
            return
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tok = (row // NUM_HEADS).to(tl.int64)
    head = row % NUM_HEADS
    ok = (row < num_rows) & (tok >= tl.load(qsl_ptr)) & (tok < tl.load(qsl_ptr + num_seqs))
    m_off = tok * stride_mt + head * stride_mh
    a_off = tok * stride_at + head * stride_ah
    splits = live_splits(qsl_ptr, num_seqs, num_splits, split_slots) if LIVE_SPLITS else num_splits
    o = _merge_splits(ws_acc_ptr, ws_max_ptr, ws_sum_ptr, m_off, a_off, ok, splits, stride_as, stride_ms,
                      BLOCK_R, HEAD_DIM, BLOCK_D, STEP_SPLITS, ROTATED, "")  # fmt: skip
    if ROT_AHEAD:  # o @ R as _store_unrotated's dot-free steps take it, then stored as it is
        o = tl.sum(o[:, :, None] * rot[None, :, :], 1)
    _store_unrotated(out_ptr, tok * stride_ot + head * stride_oh, ok, stride_od, o, rot_ptr, stride_r0, stride_r1,
                     HEAD_DIM, BLOCK_D, ROT_CHUNK, OP_DTYPE, PREC, UNROTATE_BY_DOT,
                     ROTATED and not ROT_AHEAD)  # fmt: skip


def reduce_grid(num_rows: int, block_r: int = REDUCE_BLOCK_R) -> tuple[int]:
    return (triton.cdiv(num_rows, block_r),)
