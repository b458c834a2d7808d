"""Offline probe: does splitting a decode tile's tokens among the warps, each warp with its own online softmax,
take the cross-warp traffic out of the context loop?

In today's kernel a 64-token tile is one wgmma M side spread over 4 warps: each tile's row max crosses warps
(shared memory and a barrier) and P goes through shared memory to the P.V wgmma, so every tile waits on its
slowest warp (docs/decode-tuning.md, "Where the 16 x 32K launch's time goes"). Here the tile becomes a batch of 4
slices of 16 tokens, one per warp (a 3-D `tl.dot`, which Triton lowers to mma.sync with the batch on the warps):
each warp keeps its own max, sum and accumulator for its rows, and the 4 are merged once after the loop, as
split-K partials are. Toy loops over 64-token tiles (4-bit K and V words, per-token scales, the byte-permute
lookup, 16 query rows), compiled for sm_90a without a GPU:
- cta: today's shape (scores and output transposed, one softmax per tile for the whole program);
- warp: the batched form, scores and output transposed as in cta;
- warp_rows: the batched form with query rows on the MMA's M side (FlashAttention-2's order within a warp);
- warp_rows_k_fragment, warp_k_fragment: the two batched forms with the key columns relabelled as `k_fragment`
  relabels them for wgmma (fragment.fragment_columns), the query's the same way;
- cta_fp8_k: cta with the keys looked up as e4m3 bytes and the score MMA in fp8 (queries rounded to e4m3);
- cta_fragment, cta_fp8_k_fragment: the two with the tile's tokens and key columns in the wgmma A fragment's order,
  as the real kernel's `k_fragment` (fp8_fragment_columns for the 8-bit fragment);
- cta_fp8_kv_fragment: cta_fp8_k_fragment with the values in fp8 too: V^T [DIM, TILE] looked up as e4m3 bytes
  from words stored dim-major (a word holds 8 tokens of one coordinate, so the lookup's byte quads are 4 tokens,
  the k32 A fragment's contraction run) and P times the value norms rounded to e4m3 for an fp8 P.V MMA; the
  storage order of a tile's token columns is the inverse of the relabelling, so column j meets P's row j;
- cta_fp8_kv_halves_fragment: the same with P as two e4m3 halves (its rounding and the remainder's), two MMAs;
- cta_fp8_kv_token_major_fragment: values in fp8 from today's token-major words, V^T made by a transpose in the
  kernel (Triton converts it through shared memory);
- cta_fp8_kv_slot_order_fragment: cta_fp8_kv_fragment with the dim-major words in slot order, as a store would
  write pages, and P's rows reordered to V^T's relabelled columns instead (fp8_fragment_rows_from_tokens).
By default only the compiled code is compared; `--time` runs the forms on a GPU, each launch a grid of programs
over tiles of their own (by default the 16 x 32K and 16 x 4K launches' 384 programs of 171 and 21 tiles), timed in
a CUDA graph, each form's output checked against the first form's and fp32 torch. tests/test_probe_warp_softmax.py
checks each form against fp32 torch on the CPU (with a codebook gather in place of the lookup, which the
interpreter cannot run).

    python benchmarks/probe_warp_softmax.py
    python benchmarks/probe_warp_softmax.py --time --out benchmarks/results/probe_warp_softmax_h200_DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_resources  # noqa: E402  (a sibling script, not a package)

from turboquant_vllm import TQConfig  # noqa: E402
from turboquant_vllm.codec import KVCodec  # noqa: E402
from turboquant_vllm.kernels.fragment import (  # noqa: E402
    fp8_fragment_columns,
    fp8_fragment_rows_from_tokens,
    fragment_columns,
    fragment_rows,
    fragment_tokens,
)
from turboquant_vllm.kernels.lut import lut_decode_words, lut_tables, round_e4m3  # noqa: E402
from turboquant_vllm.kernels.page import split_words  # noqa: E402

TILE = 64  # tokens a tile
ROWS = 16  # query rows (a GQA group padded to the MMA's N)
DIM = 128
WORDS = DIM // 8  # int32 words of 4-bit indices a token
WARPS = 4


@triton.jit
def _tile(ptr, t, lut_ptr, cent_ptr, LUT: tl.constexpr, TILE: tl.constexpr, DIM: tl.constexpr, WORDS: tl.constexpr,
          FRAG: tl.constexpr = False):  # fmt: skip
    """fp16 centroids [TILE, DIM] of tile t's 4-bit words: the byte-permute lookup, or (LUT=False, for the CPU
    interpreter, which cannot run PTX) a gather from the fp16 codebook. FRAG: tokens in fragment_tokens' order."""
    words = tl.load(ptr + t * TILE * WORDS + tl.arange(0, TILE)[:, None] * WORDS + tl.arange(0, WORDS)[None, :])
    if FRAG:
        words = fragment_tokens(words, TILE, WORDS)
    if LUT:
        return lut_decode_words(words, lut_ptr, TILE, DIM)
    else:
        return tl.load(cent_ptr + split_words(words, 4, DIM, TILE))


# One word's 8 coordinates as e4m3 bytes (coordinates 0-3 in $0, 4-7 in $1) from the 4 bytes of the word ($2) and
# an 8-byte table of magnitudes ($3: ranks 0-3, $7: ranks 4-7; Triton passes each 32-bit table 4 times at pack=4):
# lut.py's sign and rank arithmetic, then one byte permute picks 4 magnitudes and the sign bits are ORed in.
_FP8_ASM = tl.constexpr("""{
.reg .b32 f, fl, sel, selh, g, ma, mb, sa, sb;
not.b32 f, $2;
and.b32 f, f, 0x88888888;
shr.u32 fl, f, 3;
sub.u32 fl, f, fl;
xor.b32 sel, $2, fl;
and.b32 sel, sel, 0x77777777;
shr.u32 selh, sel, 16;
prmt.b32 ma, $3, $7, sel;
prmt.b32 mb, $3, $7, selh;
shl.b32 g, f, 4;
prmt.b32 sa, g, f, 0x5140;
prmt.b32 sb, g, f, 0x7362;
and.b32 sa, sa, 0x80808080;
and.b32 sb, sb, 0x80808080;
or.b32 $0, ma, sa;
or.b32 $1, mb, sb;
}""")


def fp8_alpha(centroids: torch.Tensor) -> float:
    """A power of two that puts the codebook's largest magnitude in [2, 4): every centroid then stays a normal e4m3
    number, rounded to 3 mantissa bits (the scores divide by it again)."""
    return float(2.0 ** (1 - math.floor(math.log2(centroids.abs().max().item()))))


def fp8_table(centroids: torch.Tensor, alpha: float) -> torch.Tensor:
    """int32 [2]: the e4m3 bytes of alpha * |c| for magnitude ranks 0-7 (centroid 8 + r), as _FP8_ASM reads them."""
    mags = (centroids[8:].float() * alpha).to(torch.float8_e4m3fn).view(torch.uint8)
    return mags.contiguous().view(torch.int32)


@triton.jit
def _tile_fp8(ptr, t, lut8_ptr, cent_ptr, LUT: tl.constexpr, ALPHA: tl.constexpr, TILE: tl.constexpr,
              DIM: tl.constexpr, WORDS: tl.constexpr, FRAG: tl.constexpr = False):  # fmt: skip
    """e4m3 ALPHA * centroids [TILE, DIM] of tile t's 4-bit words: _FP8_ASM over the words' bytes, or (LUT=False,
    for the CPU interpreter) the fp16 codebook gathered, scaled and rounded. FRAG: tokens in fragment_tokens'
    order, columns in fp8_fragment_columns'."""
    if LUT:
        nbytes: tl.constexpr = WORDS * 4
        b = tl.load(ptr.to(tl.pointer_type(tl.uint8)) + t * TILE * nbytes + tl.arange(0, TILE)[:, None] * nbytes
                    + tl.arange(0, nbytes)[None, :])  # fmt: skip
        if FRAG:
            b = fragment_tokens(b, TILE, nbytes)
        lo, hi = tl.load(lut8_ptr), tl.load(lut8_ptr + 1)
        c03, c47 = tl.inline_asm_elementwise(_FP8_ASM, "=r,=r,r,r,r,r,r,r,r,r,r", [b, lo, hi],
                                             dtype=(tl.float8e4nv, tl.float8e4nv), is_pure=True, pack=4)  # fmt: skip
        # c03[.., 4w + j] is coordinate 8w + j, c47[.., 4w + j] coordinate 8w + 4 + j
        x = tl.join(tl.reshape(c03, (TILE, WORDS, 4)), tl.reshape(c47, (TILE, WORDS, 4)))  # [TILE, WORDS, 4, 2]
        k = tl.reshape(tl.permute(x, (0, 1, 3, 2)), (TILE, DIM))
    else:
        words = tl.load(ptr + t * TILE * WORDS + tl.arange(0, TILE)[:, None] * WORDS + tl.arange(0, WORDS)[None, :])
        if FRAG:
            words = fragment_tokens(words, TILE, WORDS)
        k = (tl.load(cent_ptr + split_words(words, 4, DIM, TILE)).to(tl.float32) * ALPHA).to(tl.float8e4nv)
    if FRAG:
        k = fp8_fragment_columns(k, TILE, DIM)
    return k


@triton.jit
def _warp_slices(k_ptr, v_ptr, ks_ptr, vs_ptr, t, lut_ptr, cent_ptr, LUT: tl.constexpr, K_FRAG: tl.constexpr,
                 TILE: tl.constexpr, DIM: tl.constexpr, WORDS: tl.constexpr, WARPS: tl.constexpr):  # fmt: skip
    """Tile t as WARPS slices of TILE // WARPS tokens: K [WARPS, SLICE, DIM] (columns relabelled by
    fragment_columns if K_FRAG), V likewise in page order, and their scales [WARPS, SLICE]."""
    SLICE: tl.constexpr = TILE // WARPS
    k = _tile(k_ptr, t, lut_ptr, cent_ptr, LUT, TILE, DIM, WORDS)
    if K_FRAG:
        k = fragment_columns(k, TILE, DIM)
    v = _tile(v_ptr, t, lut_ptr, cent_ptr, LUT, TILE, DIM, WORDS)
    ks = tl.load(ks_ptr + t * TILE + tl.arange(0, TILE))
    vs = tl.load(vs_ptr + t * TILE + tl.arange(0, TILE))
    return (tl.reshape(k, (WARPS, SLICE, DIM)), tl.reshape(v, (WARPS, SLICE, DIM)), tl.reshape(ks, (WARPS, SLICE)),
            tl.reshape(vs, (WARPS, SLICE)))  # fmt: skip


@triton.jit
def _probe_kernel(k_ptr, v_ptr, ks_ptr, vs_ptr, q_ptr, lut_ptr, lut8_ptr, cent_ptr, out_ptr, n_tiles,
                  WARP_SPLIT: tl.constexpr, LUT: tl.constexpr, TILE: tl.constexpr, ROWS: tl.constexpr,
                  DIM: tl.constexpr, WORDS: tl.constexpr, WARPS: tl.constexpr, FP8_ALPHA: tl.constexpr):  # fmt: skip
    """out [ROWS, DIM] = softmax(q K^T) V over n_tiles * TILE tokens, q in log2 units (exp2 softmax).
    Program p reads its own n_tiles tiles (the p-th block of the K/V words and scales) and writes out[p]."""
    pid = tl.program_id(0)
    k_ptr += pid * n_tiles * TILE * WORDS
    v_ptr += pid * n_tiles * TILE * WORDS
    ks_ptr += pid * n_tiles * TILE
    vs_ptr += pid * n_tiles * TILE
    out_ptr += pid * ROWS * DIM
    dim = tl.arange(0, DIM)
    q_t = tl.load(q_ptr + tl.arange(0, ROWS)[None, :] * DIM + dim[:, None]).to(tl.float16)  # [DIM, ROWS]
    if WARP_SPLIT == 2 or WARP_SPLIT == 3:  # rows on M: P leaves the score MMA in the layout P.V takes it in
        K_FRAG: tl.constexpr = WARP_SPLIT == 3  # key columns relabelled for the mma.sync B fragment
        q = tl.trans(q_t)
        if K_FRAG:
            q = fragment_columns(q, ROWS, DIM)
        q3 = tl.broadcast_to(q[None, :, :], (WARPS, ROWS, DIM))
        m3 = tl.full([WARPS, ROWS], float("-inf"), tl.float32)
        l3 = tl.zeros([WARPS, ROWS], tl.float32)
        acc3 = tl.zeros([WARPS, ROWS, DIM], tl.float32)
        for t in range(n_tiles):
            k3, v3, ks, vs = _warp_slices(k_ptr, v_ptr, ks_ptr, vs_ptr, t, lut_ptr, cent_ptr, LUT, K_FRAG, TILE, DIM,
                                          WORDS, WARPS)  # fmt: skip
            s = tl.dot(q3, tl.permute(k3, (0, 2, 1))) * ks[:, None, :]  # [WARPS, ROWS, SLICE tokens]
            m_new = tl.maximum(m3, tl.max(s, 2))
            p = tl.exp2(s - m_new[:, :, None])
            alpha = tl.exp2(m3 - m_new)
            l3 = l3 * alpha + tl.sum(p, 2)
            pv = (p * vs[:, None, :]).to(tl.float16)
            acc3 = acc3 * alpha[:, :, None] + tl.dot(pv, v3)
            m3 = m_new
        m = tl.max(m3, 0)
        w = tl.exp2(m3 - m[None, :])
        acc_t = tl.trans(tl.sum(acc3 * w[:, :, None], 0))
        l_i = tl.sum(l3 * w, 0)
    elif WARP_SPLIT == 1 or WARP_SPLIT == 4:
        K_FRAG: tl.constexpr = WARP_SPLIT == 4  # key columns relabelled for the mma.sync A fragment
        if K_FRAG:
            q_t = tl.trans(fragment_columns(tl.trans(q_t), ROWS, DIM))
        q3 = tl.broadcast_to(q_t[None, :, :], (WARPS, DIM, ROWS))
        m3 = tl.full([WARPS, ROWS], float("-inf"), tl.float32)
        l3 = tl.zeros([WARPS, ROWS], tl.float32)
        acc3 = tl.zeros([WARPS, DIM, ROWS], tl.float32)
        for t in range(n_tiles):
            k3, v3, ks, vs = _warp_slices(k_ptr, v_ptr, ks_ptr, vs_ptr, t, lut_ptr, cent_ptr, LUT, K_FRAG, TILE, DIM,
                                          WORDS, WARPS)  # fmt: skip
            s = tl.dot(k3, q3) * ks[:, :, None]  # [WARPS, SLICE tokens, ROWS]: each warp its own tokens
            m_new = tl.maximum(m3, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None, :])
            alpha = tl.exp2(m3 - m_new)
            l3 = l3 * alpha + tl.sum(p, 1)
            pv = (p * vs[:, :, None]).to(tl.float16)
            acc3 = acc3 * alpha[:, None, :] + tl.dot(tl.permute(v3, (0, 2, 1)), pv)
            m3 = m_new
        m = tl.max(m3, 0)  # the warps' partials merged once, as split-K partials are
        w = tl.exp2(m3 - m[None, :])
        acc_t = tl.sum(acc3 * w[:, None, :], 0)
        l_i = tl.sum(l3 * w, 0)
    else:  # cta, and cta_fp8_k: keys looked up as e4m3 bytes, the score MMA in fp8 (queries rounded to e4m3)
        FP8_V: tl.constexpr = WARP_SPLIT >= 8  # values as e4m3 bytes too, the P.V MMA in fp8
        V_TOKEN_MAJOR: tl.constexpr = WARP_SPLIT == 10  # ... from today's token-major words, transposed in the kernel
        P_REORDER: tl.constexpr = WARP_SPLIT == 11  # ... dim-major in slot order: P's rows follow V^T's columns
        P_HALVES: tl.constexpr = WARP_SPLIT == 9  # P as two e4m3 halves (its rounding and the remainder's), 2 MMAs
        FP8_K: tl.constexpr = WARP_SPLIT == 5 or WARP_SPLIT == 7 or FP8_V
        FRAG: tl.constexpr = WARP_SPLIT == 6 or WARP_SPLIT == 7 or FP8_V  # tokens and columns in the A fragment's order
        if FP8_K:
            q8 = tl.load(q_ptr + tl.arange(0, ROWS)[:, None] * DIM + dim[None, :]).to(tl.float8e4nv)
            q8_t = tl.trans(fp8_fragment_columns(q8, ROWS, DIM) if FRAG else q8)
        elif FRAG:
            q_t = tl.trans(fragment_columns(tl.trans(q_t), ROWS, DIM))
        rows = fragment_rows(TILE) if FRAG else tl.arange(0, TILE)  # the scales in the tiles' token order
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc_t = tl.zeros([DIM, ROWS], tl.float32)
        for t in range(n_tiles):
            if V_TOKEN_MAJOR:  # V [TILE, DIM] with its tokens in the keys' order, then V^T for the MMA's A operand
                v8 = _tile_fp8(v_ptr, t, lut8_ptr, cent_ptr, LUT, FP8_ALPHA, TILE, DIM, WORDS, False)
                v = tl.trans(fragment_tokens(v8, TILE, DIM))
            elif FP8_V:  # V^T [DIM, TILE]: a K tile's shape with rows and columns swapped (TILE // 8 words a row)
                v = _tile_fp8(v_ptr, t, lut8_ptr, cent_ptr, LUT, FP8_ALPHA, DIM, TILE, TILE // 8, FRAG)
            else:
                v = _tile(v_ptr, t, lut_ptr, cent_ptr, LUT, TILE, DIM, WORDS, FRAG)
            ks = tl.load(ks_ptr + t * TILE + rows)
            vs = tl.load(vs_ptr + t * TILE + rows)
            if FP8_K:  # [TILE tokens, ROWS]
                k8 = _tile_fp8(k_ptr, t, lut8_ptr, cent_ptr, LUT, FP8_ALPHA, TILE, DIM, WORDS, FRAG)
                if LUT:  # noqa: SIM108 (a compile-time branch: the interpreter takes the other)
                    s = tl.dot(k8, q8_t)
                else:  # the CPU interpreter's fp8 dot is not exact: the same e4m3 values, multiplied in fp32
                    s = tl.dot(k8.to(tl.float32), q8_t.to(tl.float32))
                s = s * (ks * (1.0 / FP8_ALPHA))[:, None]
            else:  # the tile's tokens across all warps
                k = _tile(k_ptr, t, lut_ptr, cent_ptr, LUT, TILE, DIM, WORDS, FRAG)
                if FRAG:
                    k = fragment_columns(k, TILE, DIM)
                s = tl.dot(k, q_t) * ks[:, None]
            m_new = tl.maximum(m_i, tl.max(s, 0))
            p = tl.exp2(s - m_new[None, :])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            if P_REORDER:  # P's rows from the keys' token order to the one V^T's relabelled columns hold
                p = fp8_fragment_rows_from_tokens(p, TILE, ROWS)
                vs = fp8_fragment_rows_from_tokens(vs[:, None], TILE, 1).reshape(TILE)
            if FP8_V and LUT:
                pv = p * vs[:, None]
                pv8 = pv.to(tl.float8e4nv)
                acc_t = acc_t * alpha[None, :] + tl.dot(v, pv8)
                if P_HALVES:
                    acc_t += tl.dot(v, (pv - pv8.to(tl.float32)).to(tl.float8e4nv))
            elif FP8_V:  # the interpreter: P rounded without its e4m3 cast (see round_e4m3), the dot in fp32
                pv = p * vs[:, None]
                pv_hi = round_e4m3(pv)
                if P_HALVES:
                    pv_hi += round_e4m3(pv - pv_hi)
                acc_t = acc_t * alpha[None, :] + tl.dot(v.to(tl.float32), pv_hi)
            else:
                pv = (p * vs[:, None]).to(tl.float16)
                acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), pv)
            m_i = m_new
        if FP8_V:  # acc_t's rows are V^T's, in fragment_tokens' order, and scaled by FP8_ALPHA
            acc_t = acc_t * (1.0 / FP8_ALPHA)
            dim = fragment_rows(DIM) if FRAG and not V_TOKEN_MAJOR else dim
    out = acc_t / l_i[None, :]
    tl.store(out_ptr + tl.arange(0, ROWS)[None, :] * DIM + dim[:, None], out)


FORMS = {
    "cta": 0,
    "warp": 1,
    "warp_rows": 2,
    "warp_rows_k_fragment": 3,
    "warp_k_fragment": 4,
    "cta_fp8_k": 5,
    "cta_fragment": 6,
    "cta_fp8_k_fragment": 7,
    "cta_fp8_kv_fragment": 8,
    "cta_fp8_kv_halves_fragment": 9,
    "cta_fp8_kv_token_major_fragment": 10,
    "cta_fp8_kv_slot_order_fragment": 11,
}
CENTROIDS = KVCodec(TQConfig(), 1, DIM).key.centroids.to(torch.float16)  # 4-bit keys and values alike
FP8_ALPHA = fp8_alpha(CENTROIDS)
CONSTANTS = {"TILE": TILE, "ROWS": ROWS, "DIM": DIM, "WORDS": WORDS, "WARPS": WARPS, "FP8_ALPHA": FP8_ALPHA}


def compile_probe(form: str) -> dict:
    pointers = {"k_ptr": "*i32", "v_ptr": "*i32", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "q_ptr": "*fp32",
                "lut_ptr": "*i32", "lut8_ptr": "*i32", "cent_ptr": "*fp16", "out_ptr": "*fp32"}  # fmt: skip
    constexprs = {"WARP_SPLIT": FORMS[form], "LUT": True, **CONSTANTS}
    return {"form": form, **kernel_resources.compile_toy_loop(_probe_kernel, pointers, constexprs, WARPS)}


def probe_inputs(programs: int, n_tiles: int, device: str, seed: int = 0) -> dict:
    """Random 4-bit K/V words and scales for `programs` programs of n_tiles tiles each, a query, the codebook
    (fp16) and its lookup tables (fp16 pairs, e4m3 bytes): the toy kernel's arguments, by name."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = programs * n_tiles * TILE
    lut = lut_tables(CENTROIDS)
    assert lut is not None, "the 4-bit codebook is symmetric in fp16, so the lookup tables exist"
    words = torch.randint(-(2**31), 2**31 - 1, (2, tokens, WORDS), generator=g, dtype=torch.int64).to(torch.int32)
    scales = torch.rand(2, tokens, generator=g) * 0.5 + 0.5
    args = {"k_ptr": words[0], "v_ptr": words[1], "ks_ptr": scales[0], "vs_ptr": scales[1],
            "q_ptr": torch.randn(ROWS, DIM, generator=g) * 2, "lut_ptr": lut,
            "lut8_ptr": fp8_table(CENTROIDS, FP8_ALPHA), "cent_ptr": CENTROIDS}  # fmt: skip
    return {name: t.to(device) for name, t in args.items()}


def fragment_orders() -> tuple[torch.Tensor, torch.Tensor]:
    """The cta_fp8_kv_fragment form's relabellings as index vectors: the token of P's row j (fragment_rows at TILE),
    and the stored token column that fp8_fragment_columns puts at column j of a [DIM, TILE] tile. V^T's rows are
    relabelled too (fragment_tokens), but the output is stored through the same order (fragment_rows at DIM), so a
    stored row is its coordinate."""
    i = torch.arange(TILE)
    token_of_row = (i & ~63) | ((i >> 3) & 1) << 5 | ((i >> 5) & 1) << 4 | ((i >> 4) & 1) << 3 | (i & 7)
    stored_column = torch.arange(TILE).reshape(4, TILE // 32, 2, 4).permute(1, 2, 0, 3).reshape(TILE)
    return token_of_row, stored_column


def values_dim_major(
    words: torch.Tensor, scales: torch.Tensor, centroids: torch.Tensor, slot_order: bool = False
) -> torch.Tensor:
    """V [tokens, DIM] from cta_fp8_kv_fragment's words: each tile a [DIM, TILE // 8] block (stored token column
    8w + j = nibble j of word w), its columns in the order that meets P's rows after the relabellings, or with
    slot_order (cta_fp8_kv_slot_order_fragment) column c the tile's token c."""
    token_of_row, stored_column = (x.to(words.device) for x in fragment_orders())
    if slot_order:
        token_of_row = stored_column = torch.arange(TILE, device=words.device)
    shifts = 4 * torch.arange(8, device=words.device)
    idx = (words.reshape(-1, DIM, TILE // 8).to(torch.int64)[..., None] >> shifts) & 15  # [tiles, DIM, words, 8]
    stored = idx.flatten(2)  # [tiles, coordinate, stored column]
    v = torch.empty(stored.shape[0], TILE, DIM, dtype=torch.int64, device=words.device)
    v[:, token_of_row] = stored[:, :, stored_column].transpose(1, 2)
    return centroids[v.reshape(-1, DIM)] * scales[:, None]


def torch_reference(
    inputs: dict,
    program: int,
    n_tiles: int,
    fp8_k: bool = False,
    fp8_v: bool = False,
    rounded: bool = True,
    p_halves: bool = False,
    v_token_major: bool = False,
    slot_order: bool = False,
) -> torch.Tensor:
    """fp32 torch attention of one program's tiles: indices unpacked from the words (coordinate 8w + j = nibble j).
    With fp8_k, keys and queries rounded to e4m3 as the cta_fp8_k form rounds them (keys scaled by FP8_ALPHA);
    with fp8_v, the values read dim-major (values_dim_major; v_token_major: as the keys) and their centroids rounded
    the same way. rounded=False
    keeps those forms' storage but not their rounding (what it costs); with it, the fp8_v form's P (times the value
    norms) is rounded to e4m3 tile by tile, in the kernel's online softmax (p_halves: plus its remainder's
    rounding)."""
    rows = slice(program * n_tiles * TILE, (program + 1) * n_tiles * TILE)
    shifts = 4 * torch.arange(8, device=inputs["k_ptr"].device)
    cent = inputs["cent_ptr"].float()
    e4m3 = torch.float8_e4m3fn
    cent8 = (cent * FP8_ALPHA).to(e4m3).float() / FP8_ALPHA if rounded else cent

    def dequantise(words: torch.Tensor, scales: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        idx = (words[rows].to(torch.int64)[..., None] >> shifts) & 15  # [tokens, WORDS, 8]
        return centroids[idx.flatten(1)] * scales[rows, None]

    if fp8_k:
        k = dequantise(inputs["k_ptr"], inputs["ks_ptr"], cent8)
        q = inputs["q_ptr"].to(e4m3).float() if rounded else inputs["q_ptr"].half().float()
    else:
        k = dequantise(inputs["k_ptr"], inputs["ks_ptr"], cent)
        q = inputs["q_ptr"].half().float()
    s = q @ k.T  # [ROWS, tokens], log2 units
    if fp8_v and rounded:  # the form's online softmax, tile by tile, with P times the value norms rounded to e4m3
        ones = torch.ones_like(inputs["vs_ptr"])
        if v_token_major:
            v = dequantise(inputs["v_ptr"], ones, cent8)
        else:
            v = values_dim_major(inputs["v_ptr"][rows], ones[rows], cent8, slot_order)
        vs = inputs["vs_ptr"][rows]
        m = torch.full((ROWS,), float("-inf"), device=s.device)
        l_sum = torch.zeros(ROWS, device=s.device)
        acc = torch.zeros(ROWS, DIM, device=s.device)
        for t in range(n_tiles):
            tile = slice(t * TILE, (t + 1) * TILE)
            m_new = torch.maximum(m, s[:, tile].amax(1))
            p = torch.exp2(s[:, tile] - m_new[:, None])
            alpha = torch.exp2(m - m_new)
            l_sum = l_sum * alpha + p.sum(1)
            pv = p * vs[tile]
            pv8 = pv.to(e4m3).float()
            if p_halves:
                pv8 = pv8 + (pv - pv8).to(e4m3).float()
            acc = acc * alpha[:, None] + pv8 @ v[tile]
            m = m_new
        return acc / l_sum[:, None]
    if fp8_v and not v_token_major:
        v = values_dim_major(inputs["v_ptr"][rows], inputs["vs_ptr"][rows], cent8, slot_order)
    elif fp8_v:
        v = dequantise(inputs["v_ptr"], inputs["vs_ptr"], cent8)
    else:
        v = dequantise(inputs["v_ptr"], inputs["vs_ptr"], cent)
    return torch.softmax(s * math.log(2.0), dim=-1) @ v  # exp2 softmax


def value_storage(form: str) -> str:
    """How a form reads the value words: token-major rows, or dim-major in relabelled or in slot order."""
    if "fp8_kv" not in form or "token_major" in form:
        return "token_major"
    return "dim_major_slot_order" if "slot_order" in form else "dim_major_relabelled"


def reference_options(form: str) -> dict:
    """torch_reference's options for a form, by its name."""
    return {"fp8_k": "fp8_k" in form, "fp8_v": "fp8_kv" in form, "p_halves": "halves" in form,
            "v_token_major": "token_major" in form, "slot_order": "slot_order" in form}  # fmt: skip


def time_probe(form: str, inputs: dict, programs: int, n_tiles: int, rep: int) -> tuple[dict, torch.Tensor]:
    """One form's launch of `programs` programs on the GPU, timed in a CUDA graph: us, packed bytes read a second
    (136 bytes a token: 2 x 64 bytes of words, 2 fp32 scales), the compiled registers; and its output."""
    out = torch.empty(programs, ROWS, DIM, device="cuda")

    def launch():
        return _probe_kernel[(programs,)](*inputs.values(), out, n_tiles, WARP_SPLIT=FORMS[form], LUT=True,
                                          num_warps=WARPS, **CONSTANTS)  # fmt: skip

    kernel = launch()
    torch.cuda.synchronize()
    ms = float(triton.testing.do_bench_cudagraph(launch, rep=rep))
    nbytes = programs * n_tiles * TILE * (2 * WORDS * 4 + 2 * 4)
    row = {"form": form, "programs": programs, "tiles_a_program": n_tiles, "us": ms * 1e3,
           "us_a_tile_round": ms * 1e3 / n_tiles, "packed_tb_per_s": nbytes / ms / 1e9,
           "registers": kernel.n_regs, "spills": kernel.n_spills}  # fmt: skip
    return row, out.clone()


def time_forms(shapes: list[tuple[int, int]], rep: int, forms: list[str]) -> list[dict]:
    """The forms at each (programs, tiles a program); each form's output checked against the first form's, and its
    first program's against fp32 torch (torch_reference)."""
    rows = []
    for programs, n_tiles in shapes:
        inputs = probe_inputs(programs, n_tiles, "cuda")
        reference = None
        for form in forms:
            row, out = time_probe(form, inputs, programs, n_tiles, rep)
            if reference is None:
                reference = out
            same_values = value_storage(form) == value_storage(forms[0])  # else the same words are other values
            diff = float((out - reference).abs().max() / reference.abs().max())
            row["max_rel_diff_vs_first"] = diff if same_values else None
            want = torch_reference(inputs, 0, n_tiles, **reference_options(form))
            row["max_rel_err_vs_torch"] = float((out[0] - want).abs().max() / want.abs().max())
            if "fp8_k" in form:  # what rounding keys and queries to e4m3 costs against the fp16 codebook
                exact = torch_reference(inputs, 0, n_tiles, **{**reference_options(form), "rounded": False})
                row["max_rel_err_vs_torch_unrounded"] = float((out[0] - exact).abs().max() / exact.abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
        del inputs
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", action="store_true", help="time the forms on the GPU instead of compiling offline")
    p.add_argument(
        "--shapes",
        default="384x171,384x21",
        help="PROGRAMSxTILES launches to time (default: 16 x 32K and 16 x 4K at 3 splits, 8 KV heads)",
    )
    p.add_argument("--forms", default=",".join(FORMS), help="comma-separated forms to time, the first the baseline")
    p.add_argument("--rep", type=int, default=200, help="do_bench_cudagraph repetition time, ms")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.time:
        result = {"probe": "warp_softmax", "target": "sm_90a (compiled, not run)", "triton": triton.__version__,
                  "rows": [compile_probe(form) for form in FORMS]}  # fmt: skip
    elif not torch.cuda.is_available():
        print("--time needs a CUDA GPU; none found.")
        return 2
    else:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        forms = args.forms.split(",")
        result = {
            "probe": "warp_softmax",
            "target": torch.cuda.get_device_name(),
            "triton": triton.__version__,
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "rows": time_forms(shapes, args.rep, forms),
        }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
