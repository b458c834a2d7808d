"""Orders of a decode tile that put each decoded key where Hopper's wgmma wants it in registers.

With swapped operands the key tile [BLOCK_N tokens, BLOCK_D] is the MMA's A operand, read from registers.
Decoded in page order it sits in the load's blocked layout (a thread: 4 consecutive index words of a
token), not in the A fragment's (a thread: coordinate pairs 2l, 2l + 1, + 8, + 16 .. of two tokens 8
apart), so Triton converted it through shared memory every tile: stores, a barrier, ldmatrix.

A dot product does not care about the order of its contraction axis, nor softmax about the order of a
tile's tokens, so the kernel may relabel both instead: `fragment_tokens` renames a tile's rows and
`fragment_columns` its head_dim axis (the query gets the same column order) so that the labels each
thread already holds are the ones the A fragment asks of it. Both are reshapes and permutes only: no
data moves, and the result is the same scores in another order. Their correctness does not depend on
layouts (the CPU interpreter checks it); whether the conversion disappears does (benchmarks/kernel_resources.py
counts the shared-memory stores of the context loop).
"""

from __future__ import annotations

import triton
import triton.language as tl

from turboquant_vllm.kernels.lut import round_e4m3


@triton.jit
def fragment_tokens(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows of x [ROWS, COLS] (ROWS a multiple of 64) reordered: row bits (5, 4, 3) become (4, 3, 5).

    The load puts row bits 3-4 on the 4 warps and bit 5 in registers; a 64-row wgmma A fragment has bit 3
    in registers and bits 4-5 on the warps.
    """
    y = tl.reshape(x, (ROWS // 64, 2, 2, 2, 8, COLS))
    return tl.reshape(tl.permute(y, (0, 2, 3, 1, 4, 5)), (ROWS, COLS))


@triton.jit
def fragment_rows(ROWS: tl.constexpr):
    """int32 [ROWS]: the tile row (token) that row i of fragment_tokens' order holds, so per-token vectors can be
    loaded in that order directly (a loaded vector reordered by reshapes would need a conversion)."""
    i = tl.arange(0, ROWS)
    return (i & ~63) | ((i >> 3) & 1) << 5 | ((i >> 5) & 1) << 4 | ((i >> 4) & 1) << 3 | (i & 7)


@triton.jit
def unfragment_tokens(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The inverse of fragment_tokens: rows of x [ROWS, COLS] in its order put back in natural order."""
    y = tl.reshape(x, (ROWS // 64, 2, 2, 2, 8, COLS))  # row bits (4, 3, 5) of fragment_tokens' order
    return tl.reshape(tl.permute(y, (0, 3, 1, 2, 4, 5)), (ROWS, COLS))


@triton.jit
def fp8_fragment_rows_from_tokens(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows of x [ROWS, COLS] (a tile's tokens, in fragment_tokens' order) reordered so that row j is the token
    that column j of an fp8_fragment_columns-relabelled [.., ROWS] tile holds: the probabilities of a swapped tile
    in the order of the coordinate-major V^T columns they multiply (TQConfig.fp8_values)."""
    natural = unfragment_tokens(x, ROWS, COLS)
    z = tl.reshape(natural, (4, ROWS // 32, 2, 4, COLS))  # token 8 W a + 8 w + 4 h + b, W = ROWS // 32
    return tl.reshape(tl.permute(z, (1, 2, 0, 3, 4)), (ROWS, COLS))


@triton.jit
def fragment_columns(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns of x [ROWS, BLOCK_D] in page order (coordinate d = 8 * word + nibble) relabelled for the A fragment.

    A thread of the load holds words l * W .. l * W + W - 1 (W = BLOCK_D // 32, l = lane % 4); coordinate
    d = 8 * (W * l + w) + 4 * ph + 2 * pl + e goes to column 32 * w + 16 * ph + 8 * pl + 2 * l + e, which
    the fragment gives the same thread, as the fp16 pair (e = 0, 1) that the lookup already packs together.
    """
    W: tl.constexpr = BLOCK_D // 32
    y = tl.reshape(x, (ROWS, 4, W, 2, 2, 2))
    return tl.reshape(tl.permute(y, (0, 2, 3, 4, 1, 5)), (ROWS, BLOCK_D))


@triton.jit
def fp8_fragment_columns(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """fragment_columns for 8-bit keys (Tiles.fp8_keys): the k32 A fragment gives a thread bytes 4l .. 4l + 3 and
    16 + 4l .. 16 + 4l + 3 of each 32 columns, and the lookup (lut.lut_fp8_words) one register of 4 bytes for each
    half h of a word, so coordinate d = 8 (W l + i) + 4 h + b goes to column 32 i + 16 h + 4 l + b."""
    W: tl.constexpr = BLOCK_D // 32
    y = tl.reshape(x, (ROWS, 4, W, 2, 4))
    return tl.reshape(tl.permute(y, (0, 2, 3, 1, 4)), (ROWS, BLOCK_D))


# Values (Tiles.v_fragment, docs/design-v-fragment.md): V^T [BLOCK_D = 128 dims, BLOCK_N tokens] is the A operand of
# the value product. Thread (warp w, lane 4q + l) of its fragment holds dims 64b + 16w + 8a + q and columns
# 64jp + 16jl + 8h + 2l + e. Read from today's pages: the thread takes 2 bytes (stored coordinates 4(8w + q) ..
# + 3, relabelled as its dims: nibble 2b + a) of each token of its 16-token groups (page.value_fragment_words),
# and column c is the tile's token 16(l + 4jp) + 4jl + 2h + e, so each group lies in one page.


@triton.jit
def value_fragment_tile(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK_N: tl.constexpr):
    """V^T [128, BLOCK_N] in the A fragment's order from the 8 decoded planes [128 lanes, BLOCK_N // 8] of
    page.value_fragment_words (plane n: nibble n = 4e + 2b + a of each word)."""
    x = tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7)))
    x = tl.reshape(x, (4, 8, 4, BLOCK_N // 64, 4, 2, 2, 2, 2))  # w, q, l, jp, jl, h | a, b, e
    return tl.reshape(tl.permute(x, (7, 0, 6, 1, 3, 4, 5, 2, 8)), (128, BLOCK_N))  # (b w a q) x (jp jl h l e)


@triton.jit
def value_fragment_probs(p, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows of p [ROWS, COLS], in fragment_tokens' order, reordered to value_fragment_tile's token columns: row c
    takes the row r whose bits (0-6) are those of c in the order (0, 3, 4, 2, 5, 1, 6)."""
    y = tl.reshape(p, (ROWS // 64, 2, 2, 2, 2, 2, 2, COLS))  # row bits 6 | 5 4 3 2 1 0
    return tl.reshape(tl.permute(y, (0, 2, 4, 5, 3, 1, 6, 7)), (ROWS, COLS))


@triton.jit
def value_fragment_dims(acc, ROWS: tl.constexpr):
    """acc [ROWS, 128] over value_fragment_tile's dims (64b + 16w + 8a + q) back in page order (4(8w + q) + 2b + a)."""
    y = tl.reshape(acc, (ROWS, 2, 4, 2, 8))
    return tl.reshape(tl.permute(y, (0, 2, 4, 1, 3)), (ROWS, 128))


@triton.jit
def fp8_query_operand(q, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SWAP_AB: tl.constexpr, K_FRAGMENT: tl.constexpr):
    """e4m3 queries [ROWS, BLOCK_D] (fp32 values already rounded to e4m3) as the fp8 score MMA takes them:
    swapped, the B operand [BLOCK_D, ROWS], its rows in fp8_fragment_columns' order where the keys are."""
    q8 = q.to(tl.float8e4nv)
    if SWAP_AB:
        q8 = tl.trans(fp8_fragment_columns(q8, ROWS, BLOCK_D) if K_FRAGMENT else q8)
    return q8


@triton.jit
def fp8_queries(
    q, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SWAP_AB: tl.constexpr, K_FRAGMENT: tl.constexpr,
    HALVES: tl.constexpr, IN_ROWS: tl.constexpr,
):  # fmt: skip
    """The fp8 score MMA's query operands from fp32 queries q [ROWS, BLOCK_D]: q rounded to e4m3 and, with HALVES,
    the rounding's remainder rounded again, as a second operand (a second MMA) or with IN_ROWS in the first one's
    padding rows (fold_row_halves then adds each pair). Without HALVES the second operand is the first."""
    if IN_ROWS:
        q = repeat_top_rows(q, ROWS, BLOCK_D)
    hi = round_e4m3(q)
    lo = round_e4m3(q - hi)
    if IN_ROWS:
        hi = tl.where((tl.arange(0, ROWS) < ROWS // 2)[:, None], hi, lo)
    q8 = fp8_query_operand(hi, ROWS, BLOCK_D, SWAP_AB, K_FRAGMENT)
    return q8, fp8_query_operand(lo, ROWS, BLOCK_D, SWAP_AB, K_FRAGMENT) if HALVES and not IN_ROWS else q8


# Query halves in rows (Tiles.fp8_halves_in_rows_min_splits): where a decode tile's real query rows fit in its top
# half, the bottom half (padding) takes their rounded remainders, so one fp8 MMA scores both halves. Row r and
# r + ROWS // 2 then land in the same thread of both MMA layouts (mma.sync's rows g and g + 8, wgmma's column pairs
# of n-blocks 0 and 1 for the swapped tile), so adding them back is register arithmetic.


@triton.jit
def repeat_top_rows(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """x [ROWS, COLS] with its bottom ROWS // 2 rows replaced by copies of its top ones."""
    top, _ = tl.split(tl.permute(tl.reshape(x, (2, ROWS // 2, COLS)), (1, 2, 0)))
    return tl.reshape(tl.permute(tl.join(top, top), (2, 0, 1)), (ROWS, COLS))


@triton.jit
def fold_row_halves(s, ROWS: tl.constexpr, TOKENS: tl.constexpr, SWAP_AB: tl.constexpr):
    """Scores of a tile whose query rows r and r + ROWS // 2 hold one query's two halves: every row the pair's sum.
    s: [TOKENS, ROWS] swapped, else [ROWS, TOKENS]. Triton 3.6 gives the result a linear layout equal to the MMA's
    without recognising it, and runs the softmax in both (a split and join did the same; docs/decode-tuning.md)."""
    if SWAP_AB:
        both = tl.expand_dims(tl.sum(tl.reshape(s, (TOKENS, 2, ROWS // 2)), 1), 1)
        s = tl.reshape(tl.broadcast_to(both, (TOKENS, 2, ROWS // 2)), (TOKENS, ROWS))
    else:
        both = tl.expand_dims(tl.sum(tl.reshape(s, (2, ROWS // 2, TOKENS)), 0), 0)
        s = tl.reshape(tl.broadcast_to(both, (2, ROWS // 2, TOKENS)), (ROWS, TOKENS))
    return s
