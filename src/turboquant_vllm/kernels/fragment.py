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
def fragment_columns(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns of x [ROWS, BLOCK_D] in page order (coordinate d = 8 * word + nibble) relabelled for the A fragment.

    A thread of the load holds words l * W .. l * W + W - 1 (W = BLOCK_D // 32, l = lane % 4); coordinate
    d = 8 * (W * l + w) + 4 * ph + 2 * pl + e goes to column 32 * w + 16 * ph + 8 * pl + 2 * l + e, which
    the fragment gives the same thread, as the fp16 pair (e = 0, 1) that the lookup already packs together.
    """
    W: tl.constexpr = BLOCK_D // 32
    y = tl.reshape(x, (ROWS, 4, W, 2, 2, 2))
    return tl.reshape(tl.permute(y, (0, 2, 3, 4, 1, 5)), (ROWS, BLOCK_D))
