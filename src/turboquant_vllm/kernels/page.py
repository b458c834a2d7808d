"""Addresses inside a packed page, shared by the store, dequantise and attention kernels (layout.py)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def token_fields(
    cache_ptr, block, t, head,
    PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
    K_INDEX_OFFSET: tl.constexpr, K_INDEX_BYTES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr, V_INDEX_BYTES: tl.constexpr, V_SCALE_OFFSET: tl.constexpr,
):  # fmt: skip
    """Pointers to token t of page `block`, KV head `head`: (K index bytes, K scale, V index bytes, V scale).

    block and t are int64 tensors of one shape (any tokens); the scale pointers are fp32.
    """
    run = cache_ptr + block * PAGE_BYTES + head * RUN_BYTES
    k_index = run + K_INDEX_OFFSET + t * K_INDEX_BYTES
    k_scale = (run + K_SCALE_OFFSET).to(tl.pointer_type(tl.float32)) + t
    v_index = run + V_INDEX_OFFSET + t * V_INDEX_BYTES
    v_scale = (run + V_SCALE_OFFSET).to(tl.pointer_type(tl.float32)) + t
    return k_index, k_scale, v_index, v_scale
