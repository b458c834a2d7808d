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
_LOOKUP = """
.reg .b32 f, fl, sel, selh, la, ha, lb, hb, g, sa, sb;
not.b32 f, {w};
and.b32 f, f, 0x88888888;
shr.u32 fl, f, 3;
sub.u32 fl, f, fl;
xor.b32 sel, {w}, fl;
and.b32 sel, sel, 0x77777777;
shr.u32 selh, sel, 16;
prmt.b32 la, {lo0}, {lo1}, sel;
prmt.b32 ha, {hi0}, {hi1}, sel;
prmt.b32 lb, {lo0}, {lo1}, selh;
prmt.b32 hb, {hi0}, {hi1}, selh;
shl.b32 g, f, 4;
prmt.b32 sa, g, f, 0x5140;
prmt.b32 sb, g, f, 0x7362;
and.b32 sa, sa, 0x80808080;
and.b32 sb, sb, 0x80808080;
xor.b32 ha, ha, sa;
xor.b32 hb, hb, sb;
"""
# Outputs as four fp16 pairs (coordinates 0-1, 2-3, 4-5, 6-7), each a 32-bit register o01 .. o67.
_PAIRS = """
prmt.b32 {o01}, la, ha, 0x5140;
prmt.b32 {o23}, la, ha, 0x7362;
prmt.b32 {o45}, lb, hb, 0x5140;
prmt.b32 {o67}, lb, hb, 0x7362;
"""
# One fp16 per output: $0-$7 (16-bit registers), word $8, tables $9-$12.
_ASM = tl.constexpr(
    "{\n.reg .b32 o01, o23, o45, o67;"
    + _LOOKUP.format(w="$8", lo0="$9", lo1="$10", hi0="$11", hi1="$12")
    + _PAIRS.format(o01="o01", o23="o23", o45="o45", o67="o67")
    + "mov.b32 {$0, $1}, o01;\nmov.b32 {$2, $3}, o23;\nmov.b32 {$4, $5}, o45;\nmov.b32 {$6, $7}, o67;\n}"
)
# pack=2: a pair per 32-bit output $0-$3; Triton passes each input twice (both elements of the pair axis):
# the word as $4 $5, the tables as $6 $7 .. $12 $13.
_ASM_PAIRS = tl.constexpr(
    "{"
    + _LOOKUP.format(w="$4", lo0="$6", lo1="$8", hi0="$10", hi1="$12")
    + _PAIRS.format(o01="$0", o23="$1", o45="$2", o67="$3")
    + "}"
)


def lut_tables(centroids: torch.Tensor) -> torch.Tensor | None:
    """int32 [4] table registers (lo0, lo1, hi0, hi1) for a 16-entry codebook, or None if the
    fp16 codebook is not exactly symmetric (then kernels must use the gather path)."""
    c = centroids.detach().to("cpu", torch.float16)
    if c.numel() != 2**LUT_BITS or not torch.equal(c.flip(0), -c):
        return None
    mags = c[8:].view(torch.uint8).view(8, 2)  # rank r = centroid 8 + r; little-endian (low, high) bytes
    return torch.cat([mags[:, 0], mags[:, 1]]).view(torch.int32)  # byte b of word w = rank 4w + b


@triton.jit
def _table_registers(lut_ptr):
    """The four table registers of lut_tables: (lo0, lo1, hi0, hi1)."""
    return tl.load(lut_ptr), tl.load(lut_ptr + 1), tl.load(lut_ptr + 2), tl.load(lut_ptr + 3)


@triton.jit
def lut_planes(words, lut_ptr):
    """The 8 fp16 centroids of each int32 word (any shape), as 8 tensors of that shape: nibble j in the j-th."""
    lo0, lo1, hi0, hi1 = _table_registers(lut_ptr)
    return tl.inline_asm_elementwise(
        _ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [words, lo0, lo1, hi0, hi1],
        dtype=(tl.float16,) * 8, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def lut_decode_words(words, lut_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp16 centroids [ROWS, BLOCK_D] of int32 words [ROWS, BLOCK_D // 8] (coordinate 8g + j = nibble j of word g)."""
    c0, c1, c2, c3, c4, c5, c6, c7 = lut_planes(words, lut_ptr)
    return planes_to_rows(c0, c1, c2, c3, c4, c5, c6, c7, ROWS, BLOCK_D)


@triton.jit
def lut_decode_pairs(words, lut_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """lut_decode_words with the lookup's fp16 pairs kept packed, so no register moves repack them."""
    lo0, lo1, hi0, hi1 = _table_registers(lut_ptr)
    w2 = tl.join(words, words)  # [ROWS, GROUPS, 2]: a pair axis held by one thread
    o0, o1, o2, o3 = tl.inline_asm_elementwise(
        _ASM_PAIRS, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [w2, lo0, lo1, hi0, hi1],
        dtype=(tl.float16,) * 4, is_pure=True, pack=2,
    )  # fmt: skip
    return pairs_to_rows(o0, o1, o2, o3, ROWS, BLOCK_D)


@triton.jit
def decode_lut(words, lut_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PAIRS: tl.constexpr):
    """lut_decode_pairs if PAIRS else lut_decode_words (Tiles.lut_pairs)."""
    if PAIRS:
        return lut_decode_pairs(words, lut_ptr, ROWS, BLOCK_D)
    else:
        return lut_decode_words(words, lut_ptr, ROWS, BLOCK_D)


@triton.jit
def pairs_to_rows(o0, o1, o2, o3, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Interleave 4 tensors [ROWS, BLOCK_D // 8, 2] (op[.., g, e] = coordinate 2p + e of group g) into rows.

    The joins append the pair index's two bits after e (low bit first); the permute moves e last again.
    """
    x = tl.join(tl.join(o0, o1), tl.join(o2, o3))  # [ROWS, GROUPS, e, p & 1, p >> 1]
    return tl.reshape(tl.permute(x, (0, 1, 4, 3, 2)), (ROWS, BLOCK_D))


@triton.jit
def planes_to_rows(c0, c1, c2, c3, c4, c5, c6, c7, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Interleave 8 tensors [ROWS, BLOCK_D // 8] (cj = coordinate j of each group) into rows [ROWS, BLOCK_D].

    Each join appends a trailing axis of 2; nested this way, coordinate j lands at [.., j >> 2, j >> 1 & 1,
    j & 1], so the reshape restores the order 8g + j with no data movement between threads.
    """
    x = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    return tl.reshape(x, (ROWS, BLOCK_D))


# Keys as e4m3 bytes for an fp8 score MMA (Tiles.fp8_keys): the same sign and rank arithmetic, then one byte permute
# picks 4 magnitudes out of an 8-byte table and the sign bits are ORed in; 16 instructions a word, two registers out.
# $0: coordinates 0-3, $1: 4-7; $2: the word's 4 bytes; $3 and $7: the tables (Triton passes each 4 times at pack=4).
_FP8_ASM = tl.constexpr(
    "{\n.reg .b32 f, fl, sel, selh, g, ma, mb, sa, sb;\n"
    "not.b32 f, $2;\nand.b32 f, f, 0x88888888;\nshr.u32 fl, f, 3;\nsub.u32 fl, f, fl;\n"
    "xor.b32 sel, $2, fl;\nand.b32 sel, sel, 0x77777777;\nshr.u32 selh, sel, 16;\n"
    "prmt.b32 ma, $3, $7, sel;\nprmt.b32 mb, $3, $7, selh;\n"
    "shl.b32 g, f, 4;\nprmt.b32 sa, g, f, 0x5140;\nprmt.b32 sb, g, f, 0x7362;\n"
    "and.b32 sa, sa, 0x80808080;\nand.b32 sb, sb, 0x80808080;\nor.b32 $0, ma, sa;\nor.b32 $1, mb, sb;\n}"
)


def fp8_tables(centroids_e4m3: torch.Tensor) -> torch.Tensor:
    """int32 [2] table registers for _FP8_ASM: the e4m3 bytes of magnitude ranks 0-7 (centroid 8 + r) of a
    16-entry symmetric codebook already scaled and rounded to e4m3 values (KVCodec.key_centroids_e4m3)."""
    mags = centroids_e4m3[8:].to("cpu", torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)
    return mags.contiguous().view(torch.int32)


@triton.jit
def lut_fp8_words(words, table_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """e4m3 centroids [ROWS, BLOCK_D] (coordinate order) of 4-bit int32 words [ROWS, BLOCK_D // 8].

    The words are split into bytes and joined again only for the asm's sake (it takes 4 bytes a register at
    pack=4); the compiler folds that back into the word, so the loop carries 32-bit words, not bytes.
    """
    b = tl.join(tl.join(words & 255, words >> 16 & 255), tl.join(words >> 8 & 255, words >> 24 & 255))
    b = tl.reshape(b.to(tl.uint8), (ROWS, BLOCK_D // 2))  # [.., 4w + j]: byte j of word w
    lo, hi = tl.load(table_ptr), tl.load(table_ptr + 1)
    c03, c47 = tl.inline_asm_elementwise(
        _FP8_ASM, "=r,=r,r,r,r,r,r,r,r,r,r", [b, lo, hi],
        dtype=(tl.float8e4nv, tl.float8e4nv), is_pure=True, pack=4,
    )  # fmt: skip
    # c03[.., 4w + j] is coordinate 8w + j and c47[.., 4w + j] coordinate 8w + 4 + j
    x = tl.join(tl.reshape(c03, (ROWS, BLOCK_D // 8, 4)), tl.reshape(c47, (ROWS, BLOCK_D // 8, 4)))
    return tl.reshape(tl.permute(x, (0, 1, 3, 2)), (ROWS, BLOCK_D))


@triton.jit
def round_e4m3(x):
    """fp32 x rounded to the nearest e4m3 value (ties to even), as fp32: e4m3's conversion without relying on it,
    since Triton 3.6's CPU interpreter loses the carry of mantissas that round up to the next power of two.
    Normal e4m3 keeps 3 mantissa bits; below 2^-6 the spacing is 2^-9; magnitudes saturate at 448."""
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    tiny = tl.floor(x * 512.0 + 0.5) * (1.0 / 512.0)  # ties (measure zero for real inputs) round up
    r = tl.where(tl.abs(x) < 0.015625, tiny, normal)
    return tl.minimum(tl.maximum(r, -448.0), 448.0)
