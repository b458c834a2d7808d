"""Triton kernel that gathers tokens from the packed pages and dequantises them to dense K/V."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels.page import coordinate_indices, token_fields, value_field
from turboquant_vllm.key_offset import KeyOffset, check_key_offset

OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The original basis is the rotated kernel's output times R by a cuBLAS GEMM: in fp32 on the H200
# (store_dequant_h200_2026-11-30b.json) that took 338 us for 16K tokens against 771 us for the rotation inside
# the kernel. Half outputs do it in their own dtype (fp32 accumulation) straight into the output rows: a third of
# the traffic and tensor cores, for an error of a few 16-bit roundings (~2e-3 relative) next to the codebook's
# ~0.09. UNROTATE_ROWS slots at a time bound the scratch (32 MiB in bf16, 64 MiB in fp32, at 8 KV heads x 128).
UNROTATE_ROWS = 8192


@triton.jit
def _centroids(
    head_ptr,  # [BLOCK_T] pointers to this head's packed indices of each token
    live,  # bool [BLOCK_T]
    cent_ptr,  # fp32 [2^BITS]
    BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WIDTH: tl.constexpr,
):
    """centroids[idx] of coordinates 0 .. WIDTH, fp32 [BLOCK_T, WIDTH]; 0 past HEAD_DIM."""
    GROUPS: tl.constexpr = WIDTH // 8
    group = tl.arange(0, GROUPS)
    mask = live[:, None] & (group < HEAD_DIM // 8)[None, :]
    byte_off = head_ptr[:, None] + (group * BITS)[None, :]
    if BITS == 4:
        word = tl.load(byte_off.to(tl.pointer_type(tl.int32)), mask=mask, other=0)
    elif BITS == 2:
        word = tl.load(byte_off.to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.int32)
    else:
        b = tl.arange(0, 4)
        data = tl.load(
            byte_off[:, :, None] + b[None, None, :], mask=mask[:, :, None] & (b < BITS)[None, None, :], other=0
        )
        word = tl.sum(data.to(tl.int32) << (b * 8)[None, None, :], axis=2)
    shifts = tl.arange(0, 8) * BITS
    idx = tl.reshape((word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BLOCK_T, WIDTH))
    col_ok = tl.arange(0, WIDTH) < HEAD_DIM
    return tl.where(col_ok[None, :], tl.load(cent_ptr + idx), 0.0)


@triton.jit
def _dequant_head(
    out_ptr,  # [BLOCK_T, 1] pointers to this head's output rows
    head_ptr,  # [BLOCK_T] pointers to this head's packed indices of each token
    scale_ptr,  # [BLOCK_T] fp32 pointers to this head's scale of each token
    live,  # bool [BLOCK_T]
    in_range,  # bool [BLOCK_T]
    cent_ptr,  # fp32 [2^BITS]
    off_ptr,  # fp32 [HEAD_DIM], this head's offset in the rotated basis (read only if HAS_OFFSET)
    BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    COORD_T=None,  # int64 [BLOCK_T]: with it, head_ptr is the page's coordinate-major V field and this the slots
    BLOCK_SIZE: tl.constexpr = 16,
):
    """Write centroids[idx] * scale; with HAS_OFFSET, |scale| and the offset added where the scale is negative
    (key_offset.py)."""
    dim = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dim < HEAD_DIM
    scale = tl.load(scale_ptr, mask=live, other=0.0)[:, None]
    if HAS_OFFSET:
        shift = (scale < 0).to(tl.float32)
        scale = tl.abs(scale)
    if COORD_T is not None:
        idx = coordinate_indices(head_ptr, COORD_T, live, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE)
        y = tl.where(dim_ok[None, :], tl.load(cent_ptr + idx), 0.0) * scale
    else:
        y = _centroids(head_ptr, live, cent_ptr, BITS, HEAD_DIM, BLOCK_T, HEAD_DIM_PAD) * scale
    if HAS_OFFSET:
        y += shift * tl.load(off_ptr + dim, mask=dim_ok, other=0.0)[None, :]
    tl.store(out_ptr + dim[None, :], y.to(out_ptr.dtype.element_ty), mask=in_range[:, None] & dim_ok[None, :])


@triton.jit(do_not_specialize=["num_slots"])
def _dequant_kv_kernel(
    cache_ptr,  # uint8 pages [num_blocks, PAGE_BYTES], laid out as layout.py says
    slot_ptr,  # int32/int64 [num_slots]; negative = zeros
    k_cent_ptr,  # fp32 [2^K_BITS]
    v_cent_ptr,  # fp32 [2^V_BITS]
    koff_ptr,  # fp32 [num_kv_heads, HEAD_DIM] key offset in the rotated basis (read only if HAS_KEY_OFFSET)
    out_k_ptr,  # [num_slots, num_kv_heads, HEAD_DIM], last dim contiguous
    out_v_ptr,  # [num_slots, num_kv_heads, HEAD_DIM], last dim contiguous
    num_slots,
    stride_out_k_t,
    stride_out_k_h,
    stride_out_v_t,
    stride_out_v_h,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
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
    HAS_KEY_OFFSET: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = tok < num_slots
    slot = tl.load(slot_ptr + tok, mask=in_range, other=-1).to(tl.int64)
    live = in_range & (slot >= 0)
    block = slot // BLOCK_SIZE
    t = slot % BLOCK_SIZE
    for hh in range(HEADS_PER_PROGRAM):
        head = tl.program_id(1).to(tl.int64) * HEADS_PER_PROGRAM + hh
        k_index, k_scale, v_index, v_scale = token_fields(
            cache_ptr, block, t, head, PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET,
            V_INDEX_OFFSET, V_INDEX_BYTES, V_SCALE_OFFSET)  # fmt: skip
        _dequant_head(
            out_k_ptr + tok[:, None] * stride_out_k_t + head * stride_out_k_h,
            k_index, k_scale, live, in_range, k_cent_ptr, koff_ptr + head * HEAD_DIM,
            K_BITS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_T, HAS_KEY_OFFSET,
        )  # fmt: skip
        v_head, coord_t = v_index, None
        if V_COORD:
            v_head, coord_t = value_field(cache_ptr, block, head, PAGE_BYTES, RUN_BYTES, V_INDEX_OFFSET), t
        _dequant_head(
            out_v_ptr + tok[:, None] * stride_out_v_t + head * stride_out_v_h,
            v_head, v_scale, live, in_range, v_cent_ptr, koff_ptr,
            V_BITS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_T, False, coord_t, BLOCK_SIZE,
        )  # fmt: skip


def _launch_params(num_slots: int, num_kv_heads: int) -> tuple[int, int, int]:
    """(BLOCK_T, HEADS_PER_PROGRAM, num_warps), tuned on H200 (d=128, 256 to 32K slots)."""
    return 16, 1, 2


def _output(
    name: str, out: torch.Tensor | None, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    assert out.shape == shape, f"{name} must be {shape}, got {tuple(out.shape)}"
    assert out.dtype in OUTPUT_DTYPES, f"{name} must be fp16/bf16/fp32, got {out.dtype}"
    assert out.stride(2) == 1, f"{name} must be contiguous in head_dim, got strides {out.stride()}"
    assert out.device == device, f"{name} is on {out.device}, cache on {device}"
    return out


def _dequantize_rotated(
    codec: KVCodec, cache: torch.Tensor, slots: torch.Tensor, offset: torch.Tensor | None,
    out_k: torch.Tensor, out_v: torch.Tensor,
) -> None:  # fmt: skip
    """One launch: K/V of `slots` in the rotated basis into out_k/out_v (offset: rotated basis, or None)."""
    lay = codec.layout
    num_slots = slots.shape[0]
    block_t, heads, num_warps = _launch_params(num_slots, lay.num_kv_heads)
    assert lay.num_kv_heads % heads == 0
    grid = (triton.cdiv(num_slots, block_t), lay.num_kv_heads // heads)
    _dequant_kv_kernel[grid](
        cache,
        slots,
        codec.key.centroids,
        codec.value.centroids,
        codec.rotation if offset is None else offset,  # any fp32 pointer when there is no offset
        out_k,
        out_v,
        num_slots,
        out_k.stride(0),
        out_k.stride(1),
        out_v.stride(0),
        out_v.stride(1),
        HEAD_DIM_PAD=triton.next_power_of_2(lay.head_dim),
        BLOCK_T=block_t,
        HEADS_PER_PROGRAM=heads,
        **lay.kernel_constants(cache.shape[1]),
        HAS_KEY_OFFSET=offset is not None,
        num_warps=num_warps,
    )


def dequantize_kv(
    codec: KVCodec,
    cache: torch.Tensor,
    slots: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    rotated: bool = True,
    out_k: torch.Tensor | None = None,
    out_v: torch.Tensor | None = None,
    key_offset: KeyOffset | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense K and V [len(slots), num_kv_heads, head_dim] of the given cache slots.

    Args:
        cache: uint8 [num_blocks, block_size, bytes_per_token], contiguous; only tokens in `slots` are read.
        slots: int32/int64 [num_slots], slot = block * block_size + offset; negative slots give zeros.
        out_dtype: dtype of freshly allocated outputs (ignored for a given out_k/out_v, whose dtype wins).
        rotated: keep the rotated basis (what attention over pages uses); False multiplies back by R.
        out_k, out_v: optional preallocated outputs (e.g. under CUDA graphs), last dim contiguous.
        key_offset: the layer's key offset if its keys were stored with one (added back where recorded).
    """
    lay = codec.layout
    assert cache.dtype == torch.uint8 and cache.dim() == 3 and cache.shape[2] == lay.bytes_per_token, (
        f"cache must be uint8 [num_blocks, block_size, {lay.bytes_per_token}], got {cache.dtype} {tuple(cache.shape)}"
    )
    assert cache.is_contiguous(), "cache must be contiguous"
    assert slots.dim() == 1 and slots.dtype in (torch.int32, torch.int64), (
        f"slots must be a 1-D int32/int64 tensor, got {slots.dtype} {tuple(slots.shape)}"
    )
    assert out_dtype in OUTPUT_DTYPES, f"out_dtype must be fp16/bf16/fp32, got {out_dtype}"
    devices = {t.device for t in (cache, slots, codec.rotation)}
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
    offset = check_key_offset(key_offset, lay.num_kv_heads, lay.head_dim, cache.device, rotated=True)
    num_slots = slots.shape[0]
    shape = (num_slots, lay.num_kv_heads, lay.head_dim)
    out_k = _output("out_k", out_k, shape, out_dtype, cache.device)
    out_v = _output("out_v", out_v, shape, out_dtype, cache.device)
    if num_slots == 0:
        return out_k, out_v
    if rotated:
        _dequantize_rotated(codec, cache, slots, offset, out_k, out_v)
        return out_k, out_v
    d = lay.head_dim
    block = (min(UNROTATE_ROWS, num_slots), *shape[1:])
    k_scratch = torch.empty(block, dtype=out_k.dtype, device=cache.device)
    v_scratch = torch.empty(block, dtype=out_v.dtype, device=cache.device)
    for lo in range(0, num_slots, UNROTATE_ROWS):  # x = (x @ R.T) @ R: R is orthogonal
        hi = min(lo + UNROTATE_ROWS, num_slots)
        k_rot, v_rot = k_scratch[: hi - lo], v_scratch[: hi - lo]
        _dequantize_rotated(codec, cache, slots[lo:hi], offset, k_rot, v_rot)
        for rows, out in ((k_rot, out_k), (v_rot, out_v)):
            rot = codec.rotation_half.get(rows.dtype, codec.rotation)
            dst = out[lo:hi]
            if dst.is_contiguous():
                torch.mm(rows.view(-1, d), rot, out=dst.view(-1, d))
            else:
                dst.copy_(torch.mm(rows.view(-1, d), rot).view(rows.shape))
    return out_k, out_v
