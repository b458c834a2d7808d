"""Triton kernel that quantises new K/V tokens and scatter-writes them into the packed pages."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels.page import (
    store_coordinate_groups,
    store_coordinate_indices,
    token_fields,
    value_field,
)
from turboquant_vllm.kernels.pdl import pdl_launch, pdl_option
from turboquant_vllm.kernels.recent import RecentTable, store_window_rows
from turboquant_vllm.key_offset import KeyOffset, check_key_offset
from turboquant_vllm.quantizer import TINY_NORM

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Programs of fewer than 16 tokens rotate by a broadcast multiply-sum (_rotate_step). True: its contraction runs
# over the product's last axis, R's contiguous one, so each output's partial sums stay within a warp; False: over
# the middle axis, which spreads them over the warps. Offline (sm_90a, one token, d=128) the last-axis form takes 80
# registers instead of 197 at 32 columns of R a step and fits 64 columns (163, no spill; the other spills 296 bytes),
# but has more shuffles. In the attention launch's fused store it lost at every shape on the H200
# (decode_sweep_h200_2026-12-01q.json); the separate store launch has not been timed with it.
CONTRACT_LAST = False


@triton.jit
def _bucketize(y, bnd_ptr, cent_ptr, BITS: tl.constexpr):
    """Index = number of boundaries strictly below y (torch.bucketize, right=False), and its centroid."""
    idx = tl.zeros(y.shape, tl.int32)
    cent = tl.zeros(y.shape, tl.float32) + tl.load(cent_ptr)
    for i in tl.static_range((1 << BITS) - 1):
        above = y > tl.load(bnd_ptr + i)
        idx += above.to(tl.int32)
        cent = tl.where(above, tl.load(cent_ptr + i + 1), cent)
    return idx, cent


@triton.jit
def _bucketize_search(y, bnd_ptr, cent_ptr, BITS: tl.constexpr):
    """_bucketize by binary search over the sorted boundaries: BITS gathered compares instead of 2^BITS - 1."""
    idx = tl.zeros(y.shape, tl.int32)
    for level in tl.static_range(BITS):
        idx += tl.where(y > tl.load(bnd_ptr + idx + ((1 << (BITS - 1 - level)) - 1)), 1 << (BITS - 1 - level), 0)
    return idx, tl.load(cent_ptr + idx)


@triton.jit
def _rotate_step(unit, rot, rot_lo, acc, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 CONTRACT_LAST: tl.constexpr):  # fmt: skip
    """acc + unit @ R[:, kd].T in fp32 for one slice kd of the contraction, rot being that slice as R[:, kd] if
    CONTRACT_LAST, else its transpose. Below tl.dot's 16 rows a broadcast multiply-sum (same FMAs) contracting over
    the product's last (CONTRACT_LAST) or middle axis. With DOT_PRECISION "tf32_split" rot and rot_lo are the slices
    of R's tf32 high and low parts (tf32_parts) and unit is exact in tf32: two plain tf32 dots then multiply
    exactly and leave only the low part's ~2^-21 of R's rounding. One return: Triton checks every return's shape."""
    if CONTRACT_LAST:
        out = acc + tl.sum(unit[:, None, :] * rot[None, :, :], axis=2)
    elif BLOCK_T >= 16:
        if DOT_PRECISION == "tf32_split":
            out = tl.dot(unit, rot_lo, tl.dot(unit, rot, acc, input_precision="tf32"), input_precision="tf32")
        else:
            out = tl.dot(unit, rot, acc, input_precision=DOT_PRECISION)
    else:
        out = acc + tl.sum(unit[:, :, None] * rot[None, :, :], axis=1)
    return out


@triton.jit
def _store_indices(
    head_ptr,  # [BLOCK_T] pointers to this head's packed indices of each token
    idx,  # int32 [BLOCK_T, HEAD_DIM_PAD]
    live,  # bool [BLOCK_T]
    BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """Pack 8 indices into one BITS-byte little-endian word per group and store it."""
    GROUPS: tl.constexpr = HEAD_DIM_PAD // 8
    shifts = tl.arange(0, 8) * BITS
    word = tl.sum(tl.reshape(idx, (BLOCK_T, GROUPS, 8)) << shifts[None, None, :], axis=2)
    group = tl.arange(0, GROUPS)
    mask = live[:, None] & (group < HEAD_DIM // 8)[None, :]
    byte_off = head_ptr[:, None] + (group * BITS)[None, :]
    if BITS == 4:
        tl.store(byte_off.to(tl.pointer_type(tl.int32)), word, mask=mask)
    elif BITS == 2:
        tl.store(byte_off.to(tl.pointer_type(tl.int16)), word.to(tl.int16), mask=mask)
    else:
        b = tl.arange(0, 4)
        data = ((word[:, :, None] >> (b * 8)[None, None, :]) & 0xFF).to(tl.uint8)
        tl.store(byte_off[:, :, None] + b[None, None, :], data, mask=mask[:, :, None] & (b < BITS)[None, None, :])


@triton.jit
def store_head(
    k_ptr,  # [BLOCK_T, 1] pointers to each token's key row of this head (head_dim contiguous)
    v_ptr,  # [BLOCK_T, 1] the same for values
    live,  # bool [BLOCK_T]: tokens to write
    block,  # int64 [BLOCK_T]: page of each token
    t,  # int64 [BLOCK_T]: position in its page
    head,  # int64: KV head
    cache_ptr, rot_ptr, rot_lo_ptr, stride_rot_0, stride_rot_1, k_bnd_ptr, k_cent_ptr, v_bnd_ptr, v_cent_ptr,
    koff_ptr, koff_rot_ptr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
    K_INDEX_OFFSET: tl.constexpr, K_INDEX_BYTES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr, V_INDEX_BYTES: tl.constexpr, V_SCALE_OFFSET: tl.constexpr,
    NORM_CORRECTION: tl.constexpr, TINY: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_KEY_OFFSET: tl.constexpr,
    CONTRACT_LAST: tl.constexpr, BUCKET_SEARCH: tl.constexpr = False, V_COORD: tl.constexpr = False,
    BLOCK_SIZE: tl.constexpr = 16, MERGE_V_GROUPS: tl.constexpr = False, EXACT_ROWS: tl.constexpr = False,
):  # fmt: skip
    """Quantise BLOCK_T tokens' K and V of one head and write indices and scales into their pages (V's
    coordinate-major with V_COORD, layout.py; BLOCK_SIZE is read only then, and MERGE_V_GROUPS, which merges
    rows of 8 consecutive slots into whole words: store_coordinate_groups). Returns the tokens' R k and R v in fp32
    [BLOCK_T, HEAD_DIM_PAD] (EXACT_ROWS: also where the key is stored relative to the offset) for an exact window.

    Shared by the store kernel and the attention kernel's fused store (kernels/decode.py). With DOT_PRECISION
    "tf32_split" rot_ptr / rot_lo_ptr hold R's tf32 parts (tf32_parts), and a key stored relative to the offset
    is rotated whole, its rotated offset (koff_rot_ptr) subtracted after: the dot's operand stays exact in tf32."""
    SPLIT: tl.constexpr = DOT_PRECISION == "tf32_split"
    dim = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dim < HEAD_DIM
    x_mask = live[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + dim[None, :], mask=x_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + dim[None, :], mask=x_mask, other=0.0).to(tl.float32)
    k_norm = tl.sqrt_rn(tl.sum(k * k, axis=1))
    v_norm = tl.sqrt_rn(tl.sum(v * v, axis=1))
    shift = tl.zeros([BLOCK_T], tl.float32)  # 1.0 where the key is stored relative to the offset
    if HAS_KEY_OFFSET:
        off = tl.load(koff_ptr + head * HEAD_DIM + dim, mask=dim_ok, other=0.0)
        shifted = k - off[None, :]
        shifted_norm = tl.sqrt_rn(tl.sum(shifted * shifted, axis=1))
        shift = (shifted_norm < k_norm).to(tl.float32)
        k_norm = tl.where(shift > 0, shifted_norm, k_norm)
    k_den = tl.maximum(k_norm, TINY)[:, None]
    v_den = tl.maximum(v_norm, TINY)[:, None]

    # rotated = (x @ R.T) / norm, accumulated over BLOCK_K-wide slices of x (re-read, L1-hot) so the fp32 FMA
    # dot keeps a small operand footprint. Dividing after the rotation takes one IEEE division per output
    # coordinate; dividing each slice first repeated BLOCK_K of them in every thread that holds the slice.
    k_rot = tl.zeros([BLOCK_T, HEAD_DIM_PAD], tl.float32)
    v_rot = tl.zeros([BLOCK_T, HEAD_DIM_PAD], tl.float32)
    for k0 in range(0, HEAD_DIM, BLOCK_K):
        kd = k0 + tl.arange(0, BLOCK_K)
        kd_ok = kd < HEAD_DIM
        chunk_mask = live[:, None] & kd_ok[None, :]
        k_part = tl.load(k_ptr + kd[None, :], mask=chunk_mask, other=0.0).to(tl.float32)
        if HAS_KEY_OFFSET and not SPLIT:
            k_part -= shift[:, None] * tl.load(koff_ptr + head * HEAD_DIM + kd, mask=kd_ok, other=0.0)[None, :]
        v_part = tl.load(v_ptr + kd[None, :], mask=chunk_mask, other=0.0).to(tl.float32)
        if CONTRACT_LAST:  # rot[i, j] = R[i, k0 + j], read once for K and V
            rot_off = dim[:, None] * stride_rot_0 + kd[None, :] * stride_rot_1
            rot_mask = dim_ok[:, None] & kd_ok[None, :]
        else:  # rot[i, j] = R[j, k0 + i]
            rot_off = dim[None, :] * stride_rot_0 + kd[:, None] * stride_rot_1
            rot_mask = kd_ok[:, None] & dim_ok[None, :]
        rot = tl.load(rot_ptr + rot_off, mask=rot_mask, other=0.0)
        rot_lo = tl.load(rot_lo_ptr + rot_off, mask=rot_mask, other=0.0) if SPLIT else rot
        k_rot = _rotate_step(k_part, rot, rot_lo, k_rot, BLOCK_T, DOT_PRECISION, CONTRACT_LAST)
        v_rot = _rotate_step(v_part, rot, rot_lo, v_rot, BLOCK_T, DOT_PRECISION, CONTRACT_LAST)
    k_exact = k_rot  # R k and R v, what an exact window keeps (returned)
    v_exact = v_rot
    if HAS_KEY_OFFSET and SPLIT:  # R (k - offset) = R k - R offset
        k_rot -= shift[:, None] * tl.load(koff_rot_ptr + head * HEAD_DIM + dim, mask=dim_ok, other=0.0)[None, :]
    elif HAS_KEY_OFFSET and EXACT_ROWS:  # the offset's share back: R (k - offset) + R offset
        k_exact += shift[:, None] * tl.load(koff_rot_ptr + head * HEAD_DIM + dim, mask=dim_ok, other=0.0)[None, :]
    k_rot = tl.math.div_rn(k_rot, k_den)
    v_rot = tl.math.div_rn(v_rot, v_den)

    if BUCKET_SEARCH:
        k_idx, k_cent = _bucketize_search(k_rot, k_bnd_ptr, k_cent_ptr, K_BITS)
        v_idx, v_cent = _bucketize_search(v_rot, v_bnd_ptr, v_cent_ptr, V_BITS)
    else:
        k_idx, k_cent = _bucketize(k_rot, k_bnd_ptr, k_cent_ptr, K_BITS)
        v_idx, v_cent = _bucketize(v_rot, v_bnd_ptr, v_cent_ptr, V_BITS)
    k_head_ptr, k_scale_ptr, v_head_ptr, v_scale_ptr = token_fields(
        cache_ptr, block, t, head, PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET,
        V_INDEX_OFFSET, V_INDEX_BYTES, V_SCALE_OFFSET)  # fmt: skip
    _store_indices(k_head_ptr, k_idx, live, K_BITS, HEAD_DIM, BLOCK_T, HEAD_DIM_PAD)
    if V_COORD and MERGE_V_GROUPS:
        store_coordinate_groups(cache_ptr, block, t, head, v_idx, live, PAGE_BYTES, RUN_BYTES, V_INDEX_OFFSET,
                                HEAD_DIM, HEAD_DIM_PAD, BLOCK_T, BLOCK_SIZE)  # fmt: skip
    elif V_COORD:
        run_v = value_field(cache_ptr, block, head, PAGE_BYTES, RUN_BYTES, V_INDEX_OFFSET)
        store_coordinate_indices(run_v, t, v_idx, live, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE)
    else:
        _store_indices(v_head_ptr, v_idx, live, V_BITS, HEAD_DIM, BLOCK_T, HEAD_DIM_PAD)
    if NORM_CORRECTION:
        k_cent = tl.where(dim_ok[None, :], k_cent, 0.0)
        v_cent = tl.where(dim_ok[None, :], v_cent, 0.0)
        k_scale = tl.math.div_rn(k_norm, tl.maximum(tl.sqrt_rn(tl.sum(k_cent * k_cent, axis=1)), TINY))
        v_scale = tl.math.div_rn(v_norm, tl.maximum(tl.sqrt_rn(tl.sum(v_cent * v_cent, axis=1)), TINY))
    else:
        k_scale = k_norm
        v_scale = v_norm
    if HAS_KEY_OFFSET:
        k_scale = tl.where(shift > 0, -k_scale, k_scale)  # the sign records the shift
    tl.store(k_scale_ptr, k_scale, mask=live)
    tl.store(v_scale_ptr, v_scale, mask=live)
    return k_exact, v_exact


@triton.jit
def store_tokens(
    k_ptr, v_ptr, slot_ptr, tok0, num_tok, kh, stride_kt, stride_kh, stride_vt, stride_vh,
    cache_ptr, rot_ptr, stride_r0, stride_r1, k_bnd_ptr, k_cent_ptr, v_bnd_ptr, v_cent_ptr, koff_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, STORE_BLOCK_K: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
    K_INDEX_OFFSET: tl.constexpr, K_INDEX_BYTES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr, V_INDEX_BYTES: tl.constexpr, V_SCALE_OFFSET: tl.constexpr,
    NORM_CORRECTION: tl.constexpr, TINY: tl.constexpr, HAS_KEY_OFFSET: tl.constexpr,
    STORE_CONTRACT_LAST: tl.constexpr, V_COORD: tl.constexpr,
):  # fmt: skip
    """Store tokens tok0 .. tok0 + num_tok - 1 of KV head kh at their slots, one token at a time (store_head): the
    attention kernel's fused store (kernels/decode.py)."""
    for j in range(0, num_tok):
        kv_tok = tl.zeros([1], tl.int64) + tok0 + j  # one-token tiles for store_head
        slot = tl.load(slot_ptr + kv_tok).to(tl.int64)
        store_head(k_ptr + kv_tok[:, None] * stride_kt + kh * stride_kh,
                   v_ptr + kv_tok[:, None] * stride_vt + kh * stride_vh, slot >= 0, slot // BLOCK_SIZE,
                   slot % BLOCK_SIZE, kh, cache_ptr, rot_ptr, rot_ptr, stride_r0, stride_r1, k_bnd_ptr, k_cent_ptr,
                   v_bnd_ptr, v_cent_ptr, koff_ptr, koff_ptr, HEAD_DIM, BLOCK_D, 1, STORE_BLOCK_K, K_BITS, V_BITS,
                   PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET, V_INDEX_OFFSET,
                   V_INDEX_BYTES, V_SCALE_OFFSET, NORM_CORRECTION, TINY, "ieee", HAS_KEY_OFFSET,
                   STORE_CONTRACT_LAST, False, V_COORD, BLOCK_SIZE)  # fmt: skip


@triton.jit(do_not_specialize=["num_tokens"])
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, HEAD_DIM] fp16/bf16/fp32, last dim contiguous
    value_ptr,  # [num_tokens, num_kv_heads, HEAD_DIM]
    cache_ptr,  # uint8 pages [num_blocks, PAGE_BYTES], laid out as layout.py says
    slot_ptr,  # int32/int64 [num_tokens]; negative = skip
    rot_ptr,  # fp32 [HEAD_DIM, HEAD_DIM], any strides: rotated = x @ R.T (R's tf32 high part with "tf32_split")
    rot_lo_ptr,  # R's tf32 low part, the same strides (read only with DOT_PRECISION "tf32_split")
    k_bnd_ptr,  # fp32 [2^K_BITS - 1]
    k_cent_ptr,  # fp32 [2^K_BITS]
    v_bnd_ptr,  # fp32 [2^V_BITS - 1]
    v_cent_ptr,  # fp32 [2^V_BITS]
    koff_ptr,  # fp32 [num_kv_heads, HEAD_DIM] key offset, original basis (read only if HAS_KEY_OFFSET)
    koff_rot_ptr,  # the same offset in the rotated basis (read with HAS_KEY_OFFSET and "tf32_split" or WINDOW)
    window_kv_ptr,  # WINDOW: the exact window's table (kernels/recent.py RecentTable.kv and .tags)
    window_tag_ptr,
    window_entries,
    num_tokens,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_rot_0,
    stride_rot_1,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PAGE_BYTES: tl.constexpr,
    RUN_BYTES: tl.constexpr,
    K_INDEX_OFFSET: tl.constexpr,
    K_INDEX_BYTES: tl.constexpr,
    K_SCALE_OFFSET: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr,
    V_INDEX_BYTES: tl.constexpr,
    V_SCALE_OFFSET: tl.constexpr,
    V_COORD: tl.constexpr,  # V indices coordinate-major (layout.py)
    MERGE_V_GROUPS: tl.constexpr,  # with V_COORD: rows of 8 tokens merged into whole words (BLOCK_T % 8 == 0)
    NORM_CORRECTION: tl.constexpr,
    TINY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_KEY_OFFSET: tl.constexpr,
    CONTRACT_LAST: tl.constexpr,
    BUCKET_SEARCH: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,  # kernels/pdl.py: the next kernel may start now (it waits for this one's writes)
    PDL_AFTER: tl.constexpr,  # launched with PDL after a kernel whose writes it does not read (paged_attention)
    WINDOW: tl.constexpr = False,  # also write every token's R k, R v into the exact window, after the kernel ahead
):
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = tok < num_tokens
    slot = tl.load(slot_ptr + tok, mask=in_range, other=-1).to(tl.int64)
    live = in_range & (slot >= 0)
    block = slot // BLOCK_SIZE
    t = slot % BLOCK_SIZE
    for hh in range(HEADS_PER_PROGRAM):
        head = tl.program_id(1).to(tl.int64) * HEADS_PER_PROGRAM + hh
        k_ptr = key_ptr + tok[:, None] * stride_key_t + head * stride_key_h  # [BLOCK_T, 1]
        v_ptr = value_ptr + tok[:, None] * stride_value_t + head * stride_value_h
        k_exact, v_exact = store_head(
            k_ptr, v_ptr, live, block, t, head, cache_ptr, rot_ptr, rot_lo_ptr, stride_rot_0, stride_rot_1,
            k_bnd_ptr, k_cent_ptr, v_bnd_ptr, v_cent_ptr, koff_ptr, koff_rot_ptr, HEAD_DIM, HEAD_DIM_PAD, BLOCK_T,
            BLOCK_K, K_BITS, V_BITS, PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET,
            V_INDEX_OFFSET, V_INDEX_BYTES, V_SCALE_OFFSET, NORM_CORRECTION, TINY, DOT_PRECISION, HAS_KEY_OFFSET,
            CONTRACT_LAST, BUCKET_SEARCH, V_COORD, BLOCK_SIZE, MERGE_V_GROUPS, WINDOW)  # fmt: skip
        if WINDOW:  # once the attention ahead has read the table (with PDL; else stream order says so)
            if PDL_AFTER:
                gdc_wait()
            store_window_rows(slot, live, head, tl.num_programs(1) * HEADS_PER_PROGRAM, k_exact, v_exact,
                              window_kv_ptr, window_tag_ptr, window_entries, HEAD_DIM, HEAD_DIM_PAD)  # fmt: skip
    if PDL_AFTER:  # this launch completes only after the kernel ahead does
        gdc_wait()


SMALL_BATCH_TOKENS = 32  # up to here one token per program; below LARGE_BATCH_TOKENS four
LARGE_BATCH_TOKENS = 256


class StoreLaunch(NamedTuple):
    """How one store_kv launch tiles its work: tokens and KV heads a program, R's columns a rotation step."""

    block_t: int  # tokens a program; from 16 the rotation is a tl.dot, below a broadcast multiply-sum
    block_k: int  # columns of R a rotation step
    heads: int  # KV heads a program
    num_warps: int
    # tl.dot's input precision (from 16 tokens a program). Plain tf32 would move coordinates across codebook
    # boundaries. "ieee": the fp32 FMA dot. "tf32x3": Triton splits both operands into tf32 parts in the kernel.
    # "tf32_split": R's parts are split once (tf32_parts) and 16-bit inputs are exact in tf32, so two plain tf32
    # dots keep fp32's precision (fp32 inputs fall back to "ieee").
    precision: str = "ieee"
    bucket_search: bool = False  # indices by binary search over the boundaries (_bucketize_search)
    # Coordinate-major values (TQConfig.fp8_values): a program's rows of 8 consecutive slots written as whole words
    # instead of two atomics a nibble (page.store_coordinate_groups; block_t a multiple of 8). On the H200 16K / 32K
    # tokens took 368.5 / 727.7 us instead of 560.6 / 1082.0 (store_dequant_merge_h200_2026-12-05.json).
    merge_value_groups: bool = False


def _launch_params(num_tokens: int, num_kv_heads: int) -> StoreLaunch:
    """Tuned on H200 (d=128, 256 to 32K tokens).

    A decode step has few tokens: 16-token tiles would leave most SMs idle (16 x 8 heads = 8 programs, 26 us a
    layer in the engine profile engine_profile_h200_2026-11-30h.json), so small batches take one or four tokens
    per program; BLOCK_T * BLOCK_K stays at 32 to bound the broadcast product. Several heads per program (fewer
    R reads) measured slower at every batch size, so each program takes one head. Fewer warps (whose reductions
    need fewer barriers) lost at 1 and 16 tokens: 5.3 / 5.6 us with 4 warps, 5.5 / 5.8 with 2, 6.3 / 6.5 with one
    warp and 16 columns of R a step (store_dequant_h200_2026-12-02h.json).

    Prefill-sized launches take 32 tokens a program, R split into two tf32-exact parts and indices by binary
    search (store_dequant_h200_2026-12-02e.json, 16K / 32K bf16 tokens): 351.1 / 692.2 us, against 473.4 / 938.1
    with 16 tokens and the fp32 FMA dot, 388.8 / 773.4 with "tf32_split" alone (16 tokens), 437.8 / 870.0 with
    "tf32x3". Offline (kernel_resources.py) the fp32 dot's 16-token program is ~4,900 SASS instructions at 254
    registers, a fifth of them the linear index scan; split and searched, 141 registers, which leaves room for
    32 tokens a program. At 32 tokens the linear scan ties the search (352.7 / 692.1 us against 350.6 / 691.6,
    store_dequant_h200_2026-12-02f.json).
    """
    if num_tokens <= SMALL_BATCH_TOKENS:
        return StoreLaunch(1, 32, 1, 4)
    if num_tokens < LARGE_BATCH_TOKENS:
        return StoreLaunch(4, 8, 1, 4)
    return StoreLaunch(32, 32, 1, 4, "tf32_split", bucket_search=True, merge_value_groups=True)


def store_meta(codec: KVCodec, launch: StoreLaunch, block_size: int, key_offset: bool, pdl: bool,
               after_attention: bool, window: bool = False) -> dict[str, Any]:  # fmt: skip
    """_store_kv_kernel's compile-time arguments for `launch`: what store_kv launches, and what
    benchmarks/kernel_resources.py compiles offline."""
    lay = codec.layout
    return dict(
        HEAD_DIM_PAD=triton.next_power_of_2(lay.head_dim),
        BLOCK_T=launch.block_t,
        BLOCK_K=launch.block_k,
        HEADS_PER_PROGRAM=launch.heads,
        **lay.kernel_constants(block_size),
        NORM_CORRECTION=codec.config.norm_correction,
        TINY=TINY_NORM,
        DOT_PRECISION=launch.precision,
        HAS_KEY_OFFSET=key_offset,
        CONTRACT_LAST=CONTRACT_LAST and launch.block_t < 16,  # from 16 tokens a program the rotation is a dot
        BUCKET_SEARCH=launch.bucket_search,
        MERGE_V_GROUPS=launch.merge_value_groups and launch.block_t % 8 == 0,
        LAUNCH_DEPENDENTS=pdl,
        PDL_AFTER=pdl and after_attention,
        WINDOW=window,
    )


def one_token_store_meta() -> dict[str, int | bool]:
    """How a one-token store rotates, as the attention kernel's fused store takes it (decode.py): the same bytes."""
    return {"STORE_BLOCK_K": _launch_params(1, 1).block_k, "STORE_CONTRACT_LAST": CONTRACT_LAST}


def check_slots(slot_mapping: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    assert slot_mapping.dim() == 1 and slot_mapping.dtype in (torch.int32, torch.int64), (
        f"slot_mapping must be a 1-D int32/int64 tensor, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
    )
    assert slot_mapping.shape[0] >= num_tokens, f"slot_mapping has {slot_mapping.shape[0]} slots for {num_tokens}"
    assert slot_mapping.device == device, f"slot_mapping is on {slot_mapping.device}, the cache on {device}"


def _check_input(name: str, x: torch.Tensor, num_tokens: int, num_kv_heads: int, head_dim: int) -> None:
    assert x.dtype in INPUT_DTYPES, f"{name} must be fp16/bf16/fp32, got {x.dtype}"
    assert x.dim() == 3 and x.shape[1:] == (num_kv_heads, head_dim), (
        f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}], got {tuple(x.shape)}"
    )
    assert x.shape[0] >= num_tokens, f"{name} has {x.shape[0]} tokens but slot_mapping has {num_tokens}"
    assert x.stride(2) == 1, f"{name} must be contiguous in head_dim, got strides {x.stride()}"


def store_kv(
    codec: KVCodec,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_offset: KeyOffset | None = None,
    *,
    after_attention: bool = False,
    recent: RecentTable | None = None,
) -> None:
    """Quantise K and V of new tokens and write them into their pages of `cache` in one launch.

    Args:
        key, value: [>= num_tokens, num_kv_heads, head_dim], fp16/bf16/fp32; may be strided views
            (e.g. of a fused qkv tensor) as long as head_dim is contiguous.
        cache: uint8 [num_blocks, block_size, bytes_per_token], contiguous, written in place.
        slot_mapping: int32/int64 [num_tokens]; slot = block * block_size + offset, negative = skip.
            Its length is the token count: key/value rows beyond it (CUDA-graph padding) are ignored.
        key_offset: store keys relative to this layer's offset where that shortens them (key_offset.py).
        after_attention: the launch follows the attention kernels of the same step, which never read these slots:
            with programmatic dependent launch (kernels/pdl.py) it runs alongside their last programs.
        recent: also write every stored token's exact K/V into this window table (kernels/recent.py), as
            recent.write_recent would: only after_attention, once no reader of the table is left in the step, and
            for tokens that are each among the last recent.recent_tokens of their sequence's new tokens.
    """
    lay = codec.layout
    num_tokens = slot_mapping.shape[0]
    check_slots(slot_mapping, num_tokens, cache.device)
    _check_input("key", key, num_tokens, lay.num_kv_heads, lay.head_dim)
    _check_input("value", value, num_tokens, lay.num_kv_heads, lay.head_dim)
    assert cache.dtype == torch.uint8 and cache.dim() == 3 and cache.shape[2] == lay.bytes_per_token, (
        f"cache must be uint8 [num_blocks, block_size, {lay.bytes_per_token}], got {cache.dtype} {tuple(cache.shape)}"
    )
    assert cache.is_contiguous(), "cache must be contiguous"
    devices = {t.device for t in (key, value, cache, slot_mapping, codec.rotation)}
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
    offset = check_key_offset(key_offset, lay.num_kv_heads, lay.head_dim, cache.device)
    if recent is not None:
        assert after_attention, "the store writes the exact window only after the step's attention has read it"
        recent.check(lay.num_kv_heads, lay.head_dim, cache.device)
    if num_tokens == 0:
        return

    pdl = pdl_launch(cache.device)
    launch = _launch_params(num_tokens, lay.num_kv_heads)
    if launch.precision == "tf32_split" and (launch.block_t < 16 or torch.float32 in (key.dtype, value.dtype)):
        launch = launch._replace(precision="ieee")  # no dot below 16 tokens; fp32 inputs are not exact in tf32
    rot_hi, rot_lo = codec.rotation_tf32 if launch.precision == "tf32_split" else (codec.rotation, codec.rotation)
    assert lay.num_kv_heads % launch.heads == 0
    grid = (triton.cdiv(num_tokens, launch.block_t), lay.num_kv_heads // launch.heads)
    _store_kv_kernel[grid](
        key,
        value,
        cache,
        slot_mapping,
        rot_hi,
        rot_lo,
        codec.key.boundaries,
        codec.key.centroids,
        codec.value.boundaries,
        codec.value.centroids,
        codec.rotation if offset is None else offset,  # any fp32 pointer when there is no offset
        codec.rotation if offset is None else key_offset.rotated,
        *((cache, slot_mapping, 1) if recent is None else (recent.kv, recent.tags, recent.entries)),
        num_tokens,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        rot_hi.stride(0),
        rot_hi.stride(1),
        **store_meta(codec, launch, cache.shape[1], offset is not None, pdl, after_attention, recent is not None),
        num_warps=launch.num_warps,
        **pdl_option(pdl and after_attention),
    )
