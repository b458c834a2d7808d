"""The paged kernel's online softmax: one score tile's update, and one more tile of exact K/V rows scored in it."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softmax_probs(s, m_i, TOK_AXIS: tl.constexpr = 1):
    """A score tile s (log2 units; tokens on TOK_AXIS, query rows on the other) against each row's running max
    m_i: the tile's probabilities p, the factor alpha that rescales earlier sums, and the new max. Rows that have
    seen only -inf keep a reference of 0 so exp2 never sees inf - inf."""
    m_new = tl.maximum(m_i, tl.max(s, TOK_AXIS))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.exp2(s - tl.expand_dims(m_ref, TOK_AXIS)), tl.exp2(m_i - m_ref), m_new


@triton.jit
def softmax_step(s, m_i, l_i, TOK_AXIS: tl.constexpr = 1):
    """One online-softmax update: softmax_probs plus each row's running sum l_i, returned as (p, alpha, max, sum)."""
    p, alpha, m_new = softmax_probs(s, m_i, TOK_AXIS)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, TOK_AXIS)


@triton.jit
def exact_rows_step(
    q_rot, acc, m_i, l_i, kv_ptr, row, ok, kh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, OP_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Score rows of an exact side table (sinks.py, recent.py) as one more tile: (acc, m_i, l_i) updated.

    kv_ptr: [rows, 2, num_kv_heads, HEAD_DIM], R k and R v (the basis q_rot and acc are in); row: int64 [TILE], the
    table rows to score; ok: bool [TILE], which of them count. q_rot: [BLOCK_M, BLOCK_D] in log2 units.
    """
    kv_heads = tl.num_programs(1)
    dim = tl.arange(0, BLOCK_D)
    off = row * (2 * kv_heads * HEAD_DIM) + kh * HEAD_DIM
    mask = ok[:, None] & (dim < HEAD_DIM)[None, :]
    k = tl.load(kv_ptr + off[:, None] + dim[None, :], mask=mask, other=0.0)
    v = tl.load(kv_ptr + off[:, None] + kv_heads * HEAD_DIM + dim[None, :], mask=mask, other=0.0)
    s = tl.dot(q_rot, tl.trans(k.to(OP_DTYPE)), input_precision=PREC)
    p, alpha, m_i, l_i = softmax_step(tl.where(ok[None, :], s, float("-inf")), m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(p.to(OP_DTYPE), v.to(OP_DTYPE), input_precision=PREC)
    return acc, m_i, l_i
