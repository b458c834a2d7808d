"""The byte-permute codebook lookup (kernels/lut.py): its PTX run by a small interpreter, its tables, its layout."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from turboquant_vllm.codebook import _cell_stats, coordinate_mse, e4m3_scale, lloyd_max
from turboquant_vllm.kernels import lut

MASK = np.uint64(0xFFFFFFFF)


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PTX prmt.b32 (default mode): byte i of the result is byte (c >> 4i) & 7 of {b, a}; bit 3 replicates its sign."""
    pool = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a)
    for i in range(4):
        sel = (c >> np.uint32(4 * i)) & np.uint32(0xF)
        byte = ((pool >> (np.uint64(8) * (sel & np.uint32(7)).astype(np.uint64))) & np.uint64(0xFF)).astype(np.uint32)
        byte = np.where(sel & np.uint32(8), np.where(byte & np.uint32(0x80), np.uint32(0xFF), np.uint32(0)), byte)
        out |= byte << np.uint32(8 * i)
    return out


def _wrap(x: np.ndarray) -> np.ndarray:
    return (x & MASK).astype(np.uint32)


_OPS = {
    "not.b32": lambda a: ~a,
    "and.b32": lambda a, b: a & b,
    "xor.b32": lambda a, b: a ^ b,
    "or.b32": lambda a, b: a | b,
    "shr.u32": lambda a, b: a >> b,
    "shl.b32": lambda a, b: _wrap(a.astype(np.uint64) << np.uint64(b)),
    "sub.u32": lambda a, b: _wrap(a.astype(np.uint64) - b.astype(np.uint64)),
    "prmt.b32": lambda a, b, c: _prmt(a, b, np.broadcast_to(c, a.shape).astype(np.uint32)),
}


def run_ptx(asm: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the straight-line b32 PTX of lut's lookups over uint32 arrays (inputs and outputs by $ name)."""
    regs = dict(inputs)

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        return np.uint32(int(tok, 0)) if tok[0].isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            lo, hi, src = re.match(r"\{(\S+), (\S+)\}, (\S+)", rest).groups()
            regs[lo], regs[hi] = regs[src] & np.uint32(0xFFFF), regs[src] >> np.uint32(16)
            continue
        dst, *args = [t.strip() for t in rest.split(",")]
        x = [val(t) for t in args]
        regs[dst] = _OPS[op](*x).astype(np.uint32)
    return regs


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_ptx_lookup_matches_the_codebook(head_dim):
    centroids = torch.tensor(lloyd_max(4, head_dim).centroids, dtype=torch.float32)
    tables = lut.lut_tables(centroids)
    assert tables is not None
    rng = np.random.default_rng(head_dim)
    words = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    words[:16] = np.array([sum(i << (4 * j) for j in range(8)) for i in range(16)], dtype=np.uint64).astype(np.uint32)
    t = tables.numpy().astype(np.uint32)
    regs = run_ptx(lut._ASM.value, {"$8": words, "$9": np.full_like(words, t[0]), "$10": np.full_like(words, t[1]),
                                    "$11": np.full_like(words, t[2]), "$12": np.full_like(words, t[3])})  # fmt: skip
    got = np.stack([regs[f"${j}"] for j in range(8)], -1).astype(np.uint16).view(np.float16)
    nibbles = (words[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    want = centroids.half().numpy()[nibbles]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_ptx_pair_lookup_matches_the_codebook(head_dim):
    """The packed variant: each 32-bit output holds coordinates 2p (low half) and 2p + 1 of the word."""
    centroids = torch.tensor(lloyd_max(4, head_dim).centroids, dtype=torch.float32)
    t = lut.lut_tables(centroids).numpy().astype(np.uint32)
    words = np.random.default_rng(head_dim + 1).integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    inputs = {"$4": words, **{f"${6 + 2 * i}": np.full_like(words, t[i]) for i in range(4)}}
    regs = run_ptx(lut._ASM_PAIRS.value, inputs)
    pairs = np.stack([regs[f"${p}"] for p in range(4)], -1)  # [N, 4] uint32
    got = np.stack([pairs & 0xFFFF, pairs >> 16], -1).reshape(-1, 8).astype(np.uint16).view(np.float16)
    nibbles = (words[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    np.testing.assert_array_equal(got, centroids.half().numpy()[nibbles])


def test_tables_need_a_symmetric_fp16_codebook():
    c = torch.tensor(lloyd_max(4, 128).centroids, dtype=torch.float32)
    assert lut.lut_tables(c) is not None
    bent = c.clone()
    bent[3] += 1e-2
    assert lut.lut_tables(bent) is None
    assert lut.lut_tables(torch.tensor(lloyd_max(3, 128).centroids)) is None  # 8 entries: not this path


@triton.jit
def _planes_kernel(src_ptr, out_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    G: tl.constexpr = BLOCK_D // 8
    base = src_ptr + tl.arange(0, ROWS)[:, None] * BLOCK_D + tl.arange(0, G)[None, :] * 8
    rows = lut.planes_to_rows(tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3),
                              tl.load(base + 4), tl.load(base + 5), tl.load(base + 6), tl.load(base + 7),
                              ROWS, BLOCK_D)  # fmt: skip
    tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], rows)


@triton.jit
def _pairs_kernel(src_ptr, out_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    G: tl.constexpr = BLOCK_D // 8
    base = src_ptr + tl.arange(0, ROWS)[:, None, None] * BLOCK_D + tl.arange(0, G)[None, :, None] * 8
    base += tl.arange(0, 2)[None, None, :]
    rows = lut.pairs_to_rows(tl.load(base), tl.load(base + 2), tl.load(base + 4), tl.load(base + 6), ROWS, BLOCK_D)
    tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], rows)


@pytest.mark.parametrize("kernel", [_planes_kernel, _pairs_kernel], ids=["planes", "pairs"])
def test_interleave_back_to_coordinate_order(device, kernel):
    src = torch.arange(4 * 64, dtype=torch.float32, device=device).view(4, 64)
    out = torch.empty_like(src)
    kernel[(1,)](src, out, ROWS=4, BLOCK_D=64)
    torch.testing.assert_close(out, src, rtol=0, atol=0)


@triton.jit
def _lookup_kernel(words_ptr, lut_ptr, out_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PAIRS: tl.constexpr):
    G: tl.constexpr = BLOCK_D // 8
    words = tl.load(words_ptr + tl.arange(0, ROWS)[:, None] * G + tl.arange(0, G)[None, :])
    rows = lut.decode_lut(words, lut_ptr, ROWS, BLOCK_D, PAIRS)
    tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], rows)


@pytest.mark.gpu
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("rows, head_dim", [(64, 128), (128, 128), (16, 64)])
def test_lookup_in_a_kernel_matches_the_codebook(cuda, pairs, rows, head_dim):
    """On the GPU the PTX runs inside Triton's layouts: which elements share an asm call (pack=2) is Triton's choice."""
    centroids = torch.tensor(lloyd_max(4, head_dim).centroids, dtype=torch.float32)
    tables = lut.lut_tables(centroids).to(cuda)
    g = torch.Generator().manual_seed(rows + head_dim)
    words = torch.randint(-(2**31), 2**31, (rows, head_dim // 8), generator=g, dtype=torch.int64).to(torch.int32)
    out = torch.empty(rows, head_dim, dtype=torch.float16, device=cuda)
    _lookup_kernel[(1,)](words.to(cuda), tables, out, ROWS=rows, BLOCK_D=head_dim, PAIRS=pairs)
    nibbles = ((words.to(torch.int64) & 0xFFFFFFFF)[:, :, None] >> (4 * torch.arange(8))) & 0xF
    torch.testing.assert_close(out.cpu(), centroids.half()[nibbles.reshape(rows, head_dim)], rtol=0, atol=0)


def e4m3_keys(head_dim: int) -> torch.Tensor:
    """The fp8 key path's codebook for 4-bit keys: e4m3_scale * centroids, rounded to e4m3 (as KVCodec builds it)."""
    c = lloyd_max(4, head_dim).centroids
    return (torch.tensor(c) * e4m3_scale(c, head_dim)).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_ptx_fp8_lookup_matches_the_codebook(head_dim):
    """lut._FP8_ASM: two 32-bit outputs of 4 e4m3 bytes each, coordinates 0-3 and 4-7 of the word."""
    keys = e4m3_keys(head_dim)
    t = lut.fp8_tables(keys.float()).numpy().astype(np.uint32)
    words = np.random.default_rng(head_dim + 2).integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    words[:16] = np.array([sum(i << (4 * j) for j in range(8)) for i in range(16)], dtype=np.uint64).astype(np.uint32)
    regs = run_ptx(lut._FP8_ASM.value, {"$2": words, "$3": np.full_like(words, t[0]), "$7": np.full_like(words, t[1])})
    got = np.stack([regs["$0"], regs["$1"]], -1).view(np.uint8).reshape(-1, 8)  # little-endian: byte j = coordinate j
    nibbles = (words[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    np.testing.assert_array_equal(got, keys.view(torch.uint8).numpy()[nibbles])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fp8_codebook_scale_beats_powers_of_two(bits):
    """e4m3_scale's factor adds no more MSE than the power of two that puts the largest centroid in [8, 16) (the
    indices keep their cells, so rounding c adds mass * (c' - c)^2), and keeps every centroid a normal e4m3 number
    (>= 2^-6) well inside the range (<= 448)."""
    cb = lloyd_max(bits, 128)
    mass, _ = _cell_stats(cb.boundaries, 128)

    def added(a: float) -> float:
        rounded = torch.tensor(cb.centroids * a).to(torch.float8_e4m3fn).double().numpy() / a
        return float(np.sum(mass * (rounded - cb.centroids) ** 2))

    alpha = e4m3_scale(cb.centroids, 128)
    scaled = np.abs(cb.centroids) * alpha
    assert scaled.min() >= 2**-6 and scaled.max() < 32
    pow2 = 8.0 * 2.0 ** -np.floor(np.log2(np.abs(cb.centroids).max()))
    assert added(alpha) <= added(pow2), (alpha, pow2)
    assert added(alpha) < 0.03 * coordinate_mse(cb.centroids, 128)  # 4 bits: +2.4%


@triton.jit
def _fp8_lookup_kernel(words_ptr, table_ptr, out_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    G: tl.constexpr = BLOCK_D // 8
    words = tl.load(words_ptr + tl.arange(0, ROWS)[:, None] * G + tl.arange(0, G)[None, :])
    keys = lut.lut_fp8_words(words, table_ptr, ROWS, BLOCK_D)
    tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], keys.to(tl.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, head_dim", [(64, 128), (128, 128), (16, 64)])
def test_fp8_lookup_in_a_kernel_matches_the_codebook(cuda, rows, head_dim):
    """lut_fp8_words inside Triton's layouts (which bytes share an asm call at pack=4 is Triton's choice)."""
    keys = e4m3_keys(head_dim)
    table = lut.fp8_tables(keys.float()).to(cuda)
    g = torch.Generator().manual_seed(rows + head_dim + 1)
    words = torch.randint(-(2**31), 2**31, (rows, head_dim // 8), generator=g, dtype=torch.int64).to(torch.int32)
    out = torch.empty(rows, head_dim, device=cuda)
    _fp8_lookup_kernel[(1,)](words.to(cuda), table, out, ROWS=rows, BLOCK_D=head_dim)
    nibbles = ((words.to(torch.int64) & 0xFFFFFFFF)[:, :, None] >> (4 * torch.arange(8))) & 0xF
    torch.testing.assert_close(out.cpu(), keys.float()[nibbles.reshape(rows, head_dim)], rtol=0, atol=0)
