"""Products with a head's rotation R inside kernels, a slice of R's columns at a time so it never sits whole in
registers: the attention and reduce kernels rotate queries and outputs, the exact tables' writers new K/V."""

from __future__ import annotations

import triton
import triton.language as tl

WRITER_ROT_CHUNK = 32  # columns of R per step where the exact tables' writers rotate a token's K and V


@triton.jit
def rotate_rows(
    ptr,  # rows x in the original basis, any float dtype
    row_off,  # int64 [ROWS], element offset of each row
    row_ok,  # bool [ROWS]
    stride_d,
    rot_ptr,  # fp32 [HEAD_DIM, HEAD_DIM]
    stride_r0,
    stride_r1,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    ROWS: tl.constexpr,
    PREC: tl.constexpr,
):
    """x @ R.T, fp32 [ROWS, BLOCK_D] (0 past HEAD_DIM), summed over CHUNK-wide slices of the contraction.

    x is read from memory slice by slice so R never sits whole in registers.
    """
    col = tl.arange(0, BLOCK_D)
    y = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, HEAD_DIM, CHUNK):
        k = c0 + tl.arange(0, CHUNK)
        k_ok = k < HEAD_DIM
        x = tl.load(ptr + row_off[:, None] + k[None, :] * stride_d, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        r_t = tl.load(  # r_t[k, n] = R[n, k]
            rot_ptr + col[None, :] * stride_r0 + k[:, None] * stride_r1,
            mask=k_ok[:, None] & (col < HEAD_DIM)[None, :],
            other=0.0,
        )
        y += tl.dot(x.to(tl.float32), r_t, input_precision=PREC)
    return y


@triton.jit
def rotate_vector(x_ptr, stride_d, rot_ptr, stride_r0, stride_r1,
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
def rotate_pair(a_ptr, stride_a, b_ptr, stride_b, rot_ptr, stride_r0, stride_r1,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """(R @ a, R @ b), fp32 [BLOCK_D] each, for two vectors in memory (a token's key and value): each CHUNK-column
    slice of R is loaded once for both, where two rotate_vector calls would load it twice."""
    n = tl.arange(0, BLOCK_D)
    ya = tl.zeros([BLOCK_D], tl.float32)
    yb = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, HEAD_DIM, CHUNK):
        k = c0 + tl.arange(0, CHUNK)
        k_ok = k < HEAD_DIM
        a = tl.load(a_ptr + k * stride_a, mask=k_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + k * stride_b, mask=k_ok, other=0.0).to(tl.float32)
        r = tl.load(rot_ptr + n[:, None] * stride_r0 + k[None, :] * stride_r1,
                    mask=(n < HEAD_DIM)[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        ya += tl.sum(r * a[None, :], 1)
        yb += tl.sum(r * b[None, :], 1)
    return ya, yb
