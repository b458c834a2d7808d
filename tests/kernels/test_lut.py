"""The byte-permute codebook lookup (kernels/lut.py): its PTX run by a small interpreter, its tables, its layout."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from turboquant_vllm.codebook import lloyd_max
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
    "shr.u32": lambda a, b: a >> b,
    "shl.b32": lambda a, b: _wrap(a.astype(np.uint64) << np.uint64(b)),
    "sub.u32": lambda a, b: _wrap(a.astype(np.uint64) - b.astype(np.uint64)),
    "prmt.b32": lambda a, b, c: _prmt(a, b, np.broadcast_to(c, a.shape).astype(np.uint32)),
}


def run_ptx(asm: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the straight-line b32 PTX of lut._ASM over uint32 arrays ($8.. inputs, $0.. 16-bit outputs)."""
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
