"""4-bit codebook lookups in registers with byte permutes, for the attention kernel's inner loop.

A memory gather per coordinate (centroid table in L1) costs a load plus 64-bit address arithmetic:
on sm_90 that was ~10 instructions per coordinate and made decode compute-bound. The codebook is
symmetric (c[15 - i] = -c[i]), so a coordinate is a sign and one of 8 magnitudes, and `prmt` picks
4 bytes out of an 8-byte table in one instruction. One packed word (8 coordinates) becomes 8 fp16
values in 18 integer instructions, with no memory access.

`lut_tables` builds the four table registers on the host; `lut_decode_words` is the device side.
The CPU interpreter cannot run PTX, so kernels keep the gather path for it (and for 2/3 bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LUT_BITS = 4

# One 32-bit word w holds coordinates 0..7 as nibbles (coordinate k = index i_k at bits [4k, 4k+4)).
# f marks negative coordinates (i < 8, bit 3 clear); the magnitude rank is i & 7 for i >= 8 and
# 7 - (i & 7) below, i.e. (i ^ 7) & 7 where bit 3 is clear. Table registers hold the low bytes
# (lo0: ranks 0-3, lo1: 4-7) and high bytes (hi0, hi1) of the 8 fp16 magnitudes; interleaving them
# gives fp16 pairs, and XOR-ing the sign into each high byte negates. The sign of coordinate k
# sits at bit 4k+3 of f: g = f << 4 moves the even coordinates' signs to bit 7 of their bytes.
_ASM = tl.constexpr("""
{
.reg .b32 f, fl, sel, selh, la, ha, lb, hb, g, sa, sb, o01, o23, o45, o67;
not.b32 f, $8;
and.b32 f, f, 0x88888888;
shr.u32 fl, f, 3;
sub.u32 fl, f, fl;
xor.b32 sel, $8, fl;
and.b32 sel, sel, 0x77777777;
shr.u32 selh, sel, 16;
prmt.b32 la, $9, $10, sel;
prmt.b32 ha, $11, $12, sel;
prmt.b32 lb, $9, $10, selh;
prmt.b32 hb, $11, $12, selh;
shl.b32 g, f, 4;
prmt.b32 sa, g, f, 0x5140;
prmt.b32 sb, g, f, 0x7362;
and.b32 sa, sa, 0x80808080;
and.b32 sb, sb, 0x80808080;
xor.b32 ha, ha, sa;
xor.b32 hb, hb, sb;
prmt.b32 o01, la, ha, 0x5140;
prmt.b32 o23, la, ha, 0x7362;
prmt.b32 o45, lb, hb, 0x5140;
prmt.b32 o67, lb, hb, 0x7362;
mov.b32 {$0, $1}, o01;
mov.b32 {$2, $3}, o23;
mov.b32 {$4, $5}, o45;
mov.b32 {$6, $7}, o67;
}
""")


def lut_tables(centroids: torch.Tensor) -> torch.Tensor | None:
    """int32 [4] table registers (lo0, lo1, hi0, hi1) for a 16-entry codebook, or None if the
    fp16 codebook is not exactly symmetric (then kernels must use the gather path)."""
    c = centroids.detach().to("cpu", torch.float16)
    if c.numel() != 2**LUT_BITS or not torch.equal(c.flip(0), -c):
        return None
    mags = c[8:].view(torch.uint8).view(8, 2)  # rank r = centroid 8 + r; little-endian (low, high) bytes
    return torch.cat([mags[:, 0], mags[:, 1]]).view(torch.int32)  # byte b of word w = rank 4w + b


@triton.jit
def lut_decode_words(words, lut_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp16 centroids [ROWS, BLOCK_D] of int32 words [ROWS, BLOCK_D // 8] (coordinate 8g + j = nibble j of word g)."""
    lo0 = tl.load(lut_ptr)
    lo1 = tl.load(lut_ptr + 1)
    hi0 = tl.load(lut_ptr + 2)
    hi1 = tl.load(lut_ptr + 3)
    c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
        _ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [words, lo0, lo1, hi0, hi1],
        dtype=(tl.float16,) * 8, is_pure=True, pack=1,
    )  # fmt: skip
    return planes_to_rows(c0, c1, c2, c3, c4, c5, c6, c7, ROWS, BLOCK_D)


@triton.jit
def planes_to_rows(c0, c1, c2, c3, c4, c5, c6, c7, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Interleave 8 tensors [ROWS, BLOCK_D // 8] (cj = coordinate j of each group) into rows [ROWS, BLOCK_D].

    Each join appends a trailing axis of 2; nested this way, coordinate j lands at [.., j >> 2, j >> 1 & 1,
    j & 1], so the reshape restores the order 8g + j with no data movement between threads.
    """
    x = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    return tl.reshape(x, (ROWS, BLOCK_D))
