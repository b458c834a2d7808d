"""paged_attention against paged_attention_ref (and SDPA for fresh prefill): decode, prefill, mixed, splits."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
import triton.language as tl

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode_tiles, pdl
from turboquant_vllm.kernels import store as store_module
from turboquant_vllm.kernels.decode import paged_attention
from turboquant_vllm.kernels.decode_tiles import choose_num_splits, choose_split_grid, live_splits
from turboquant_vllm.kernels.reference import paged_attention_ref, sequence_slots, store_ref
from turboquant_vllm.kernels.store import store_kv
from turboquant_vllm.kernels.workspace import AttentionWorkspace
from turboquant_vllm.key_offset import KeyOffset

POISON = 0xFF  # bytes of pages the kernel must never read: their fp32 scales are NaN
TOL_FP32 = 1e-4  # max |err| / max |ref| with fp32 inputs (only summation order differs)
TOL_HALF = 2e-2  # the same with bf16/fp16 inputs and outputs (fp16 dot operands, 16-bit output rounding)


@dataclass
class Batch:
    """One attention step: packed context pages plus this step's exact query/key/value rows."""

    ref_codec: KVCodec  # CPU
    codec: KVCodec  # on the test device
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())

    def expected(self) -> torch.Tensor:
        return paged_attention_ref(
            self.ref_codec, self.query.cpu(), self.key.cpu(), self.value.cpu(), self.cache.cpu(),
            self.block_table.cpu(), self.seq_lens.cpu(), self.query_start_loc.cpu(), self.scale,
        )  # fmt: skip

    def run(self, num_splits: int = 1, out: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        out = torch.full_like(self.query, float("nan")) if out is None else out
        paged_attention(
            self.codec, self.query, self.key, self.value, self.cache, self.block_table, self.seq_lens,
            self.query_start_loc, self.scale, out,
            max_query_len=kwargs.pop("max_query_len") if "max_query_len" in kwargs else self.max_query_len,
            num_splits=num_splits, **kwargs,
        )  # fmt: skip
        return out


def make_batch(
    device: torch.device,
    seq_lens: list[int],
    q_lens: list[int],
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    k_bits: int = 4,
    v_bits: int = 4,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    extra_tokens: int = 0,
    seed: int = 0,
) -> Batch:
    """Context tokens go to shuffled pages through store_ref; everything else in the cache is poison.

    The new tokens' own slots are poisoned too: the kernel must take them from key/value.
    """
    assert len(seq_lens) == len(q_lens) and all(s >= q for s, q in zip(seq_lens, q_lens, strict=True))
    g = torch.Generator().manual_seed(seed)
    config = TQConfig(k_bits=k_bits, v_bits=v_bits)
    ref = KVCodec(config, num_kv_heads, head_dim)
    blocks = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(blocks) + 1
    num_blocks = sum(blocks) + 2
    order = torch.randperm(num_blocks, generator=g)
    poison_block = int(order[-1])
    block_table = torch.full((len(seq_lens), max_blocks), poison_block, dtype=torch.int32)
    cache = torch.full((num_blocks, block_size, ref.layout.bytes_per_token), POISON, dtype=torch.uint8)
    used = 0
    for s, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens, strict=True)):
        block_table[s, : blocks[s]] = order[used : used + blocks[s]]
        used += blocks[s]
        ctx = seq_len - q_len
        pos = torch.arange(ctx)
        slots = block_table[s].long()[pos // block_size] * block_size + pos % block_size
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=g) * (1 + torch.rand(ctx, num_kv_heads, 1, generator=g))
        store_ref(ref, k, torch.randn(ctx, num_kv_heads, head_dim, generator=g), cache, slots)
    num_tokens = sum(q_lens) + extra_tokens
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=g) * 1.5
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g) * 1.5
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    return Batch(
        ref, KVCodec(config, num_kv_heads, head_dim, device),
        query.to(device, dtype), key.to(device, dtype), value.to(device, dtype), cache.to(device),
        block_table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device), qsl.to(device),
        head_dim**-0.5,
    )  # fmt: skip


def assert_matches(got: torch.Tensor, want: torch.Tensor, tol: float, rows: int | None = None) -> None:
    rows = want.shape[0] if rows is None else rows
    got, want = got[:rows].float().cpu(), want[:rows]
    assert torch.isfinite(got).all(), "non-finite output (a poisoned page was read?)"
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < tol, f"max |err| / max |ref| = {err:.3g} >= {tol}"


@pytest.mark.parametrize(("k_bits", "v_bits"), [(4, 4), (3, 3), (2, 2), (4, 2)])
def test_decode_bits_ragged(device, k_bits, v_bits):
    """q_len = 1 with lengths 1, on and across page boundaries."""
    b = make_batch(device, [1, 16, 17, 47], [1, 1, 1, 1], num_heads=8, num_kv_heads=2, k_bits=k_bits, v_bits=v_bits)
    assert_matches(b.run(), b.expected(), TOL_FP32)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (5, 1), (16, 1)])
def test_head_ratios(device, num_heads, num_kv_heads):
    """GQA groups of 1, 4, 5 (rows padded to the tile) and 16; q_len 3 also spans query tokens per tile."""
    b = make_batch(device, [9, 33], [1, 3], num_heads=num_heads, num_kv_heads=num_kv_heads, seed=1)
    assert_matches(b.run(), b.expected(), TOL_FP32)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_head_dims(device, head_dim):
    b = make_batch(device, [21, 40], [1, 3], head_dim=head_dim, k_bits=3, v_bits=4, seed=2)
    assert_matches(b.run(), b.expected(), TOL_FP32)


@pytest.mark.parametrize(("block_size", "num_splits"), [(8, 1), (32, 3), (48, 2)])
def test_block_sizes(device, block_size, num_splits):
    """Pages smaller than, or unrelated to, the kernel's token tile."""
    b = make_batch(device, [7, 70, 97], [1, 2, 1], block_size=block_size, seed=3)
    assert_matches(b.run(num_splits=num_splits), b.expected(), TOL_FP32)


def test_fresh_prefill_is_exact_causal_attention(device):
    """No context: the result is plain causal attention over the exact K/V (checked against SDPA)."""
    q_lens = [1, 7, 21]
    b = make_batch(device, q_lens, q_lens, num_heads=6, num_kv_heads=2, seed=4)
    got = b.run()
    assert_matches(got, b.expected(), TOL_FP32)
    qsl = b.query_start_loc.tolist()
    for s in range(len(q_lens)):
        rows = slice(qsl[s], qsl[s + 1])
        q, k, v = (x[rows].cpu().transpose(0, 1)[None] for x in (b.query, b.key, b.value))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=b.scale, enable_gqa=True)
        torch.testing.assert_close(got[rows].cpu(), want[0].transpose(0, 1), rtol=1e-4, atol=1e-5)


def test_chunked_prefill_with_context(device):
    b = make_batch(device, [50, 29, 60], [17, 5, 20], num_heads=4, num_kv_heads=1, seed=5)
    want = b.expected()
    assert_matches(b.run(), want, TOL_FP32)
    assert_matches(b.run(num_splits=4), want, TOL_FP32)


def test_mixed_decode_prefill_and_empty(device):
    """Decode rows, prefill chunks and a sequence with no query rows, in one launch."""
    b = make_batch(device, [30, 12, 44, 1, 19], [1, 12, 0, 1, 6], num_heads=8, num_kv_heads=2, seed=6)
    want = b.expected()
    assert_matches(b.run(), want, TOL_FP32)
    assert_matches(b.run(num_splits=2, max_query_len=1), want, TOL_FP32)  # an understated bound only costs speed


def test_splits_and_tiles_agree(device):
    """Any split count (more than there are tiles too) and either tile shape give the same numbers."""
    b = make_batch(device, [3, 60, 33], [1, 1, 2], seed=7)
    base = b.run()
    assert_matches(base, b.expected(), TOL_FP32)
    for num_splits, max_query_len in ((9, 2), (2, 64)):
        got = b.run(num_splits=num_splits, max_query_len=max_query_len)
        torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_swapped_mma_operands_agree(device, monkeypatch, num_splits):
    """swap_ab (K.q^T and V^T.p^T: the tile's tokens on the MMA's M side) computes the same decode attention
    (key offsets: test_key_offset_scores_match_reference)."""
    monkeypatch.setitem(decode_tiles.TILES, 64, dataclasses.replace(decode_tiles.TILES[64], swap_ab=True))
    b = make_batch(device, [3, 300, 133], [1, 1, 1], seed=8)  # several 64-token tiles a split
    assert_matches(b.run(num_splits=num_splits), b.expected(), TOL_FP32)


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize(("pages_ahead", "tile_row_sum"), [(True, False), (False, True), (True, True)])
def test_pages_ahead_and_tile_row_sums_agree(device, monkeypatch, swap_ab, pages_ahead, tile_row_sum):
    """Block-table entries read a tile ahead and softmax sums kept per position until the loop ends compute the
    same decode attention: splits of 0, 1 and several 64-token tiles, a context ending inside a page. Prefill tiles
    (a query longer than a decode tile holds) keep the plain loop."""
    tiles = dataclasses.replace(
        decode_tiles.TILES[64], swap_ab=swap_ab, pages_ahead=pages_ahead, tile_row_sum=tile_row_sum
    )
    monkeypatch.setitem(decode_tiles.TILES, 64, tiles)
    b = make_batch(device, [3, 300, 133, 90], [1, 1, 1, 1], seed=31)
    want = b.expected()
    for num_splits in (1, 2, 5):
        assert_matches(b.run(num_splits=num_splits), want, TOL_FP32)
    meta = decode_tiles.attention_meta(b.codec, 4, torch.float32, False, b.max_query_len, 16, False, 2)
    assert (meta["PAGES_AHEAD"], meta["TILE_ROW_SUM"]) == (pages_ahead, tile_row_sum)
    prefill = decode_tiles.attention_meta(b.codec, 4, torch.float32, False, 20, 16, False, 2)
    assert not prefill["PAGES_AHEAD"] and not prefill["TILE_ROW_SUM"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("k_fragment", "v_fragment", "block_size"),
    [(False, False, 16), (True, False, 16), (True, True, 16), (True, True, 32)],
)
def test_fragment_orders_agree(device, monkeypatch, dtype, k_fragment, v_fragment, block_size):
    """Keys and values decoded in the wgmma fragments' orders (kernels/fragment.py) give the same decode attention at
    head_dim 128: 64-token tiles at 1 and 3 splits and 128-token wide tiles, contexts ending inside a page and inside
    a 16-token group, poisoned pages around (the value loads read past the context unmasked). On the GPU only the
    bf16 case swaps operands, so only it takes these paths there."""
    tiles = dataclasses.replace(decode_tiles.TILES[128], k_fragment=k_fragment, v_fragment=v_fragment)
    monkeypatch.setitem(decode_tiles.TILES, 128, tiles)
    b = make_batch(device, [5, 300, 133, 700], [1, 1, 1, 1], num_heads=8, head_dim=128, block_size=block_size,
                   dtype=dtype, seed=37)  # fmt: skip
    want = b.expected()
    for num_splits in (1, 3, decode_tiles.WIDE_MIN_SPLITS):
        assert_matches(b.run(num_splits=num_splits), want, TOL_FP32 if dtype == torch.float32 else TOL_HALF)
    meta = decode_tiles.attention_meta(b.codec, 8, dtype, device.type == "cuda", 1, block_size, False, 3)
    assert (meta["K_FRAGMENT"], meta["V_FRAGMENT"]) == (k_fragment and meta["SWAP_AB"], v_fragment and meta["SWAP_AB"])


def test_swap_and_register_cap_only_for_decode_tiles():
    """The d=128 register cap fits the 64-token decode tile; wide and prefill tiles would spill under it, and a
    prefill tile's 64 query rows already fill the MMA's M side. On the GPU only register-lookup tiles swap."""
    codec = KVCodec(TQConfig(), 8, 128)
    tiles = decode_tiles.TILES[128]
    assert tiles.swap_ab and tiles.maxnreg

    def meta(max_query_len: int, num_splits: int) -> dict:
        return decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, max_query_len, 16, False, num_splits)

    decode_tile, wide, varlen = meta(1, 3), meta(1, decode_tiles.WIDE_MIN_SPLITS), meta(64, 3)
    assert decode_tile["SWAP_AB"] and decode_tile["maxnreg"] == tiles.maxnreg
    assert decode_tile["ROT_CHUNK"] == wide["ROT_CHUNK"] == tiles.rot_chunk  # the interpreter keeps its own
    assert wide["SWAP_AB"] and "maxnreg" not in wide and wide["num_warps"] == tiles.num_warps
    # the wide launch's own warps and cap (bench_decode.py's sweep), leaving the other launches alone
    wider = dataclasses.replace(tiles, wide_num_warps=2 * tiles.num_warps, wide_maxnreg=128, wide_rot_chunk=128)
    with patch.dict(decode_tiles.TILES, {128: wider}):
        assert meta(1, decode_tiles.WIDE_MIN_SPLITS)["num_warps"] == 2 * tiles.num_warps
        assert meta(1, decode_tiles.WIDE_MIN_SPLITS)["maxnreg"] == 128
        assert meta(1, decode_tiles.WIDE_MIN_SPLITS)["ROT_CHUNK"] == 128
        assert meta(1, 3) == decode_tile and meta(64, 3) == varlen
    assert not varlen["SWAP_AB"] and "maxnreg" not in varlen and varlen["BLOCK_M"] == tiles.varlen_m
    # both fragment orders on the swapped tiles by default (4-bit V, 16-token pages); the values' needs a page of
    # whole 16-token groups and 4-bit V
    assert all(m["K_FRAGMENT"] and m["V_FRAGMENT"] for m in (decode_tile, wide))
    assert not varlen["K_FRAGMENT"] and not varlen["V_FRAGMENT"]
    odd_pages = decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, 1, 8, False, 3)
    assert odd_pages["K_FRAGMENT"] and not odd_pages["V_FRAGMENT"]
    v3 = decode_tiles.attention_meta(KVCodec(TQConfig(v_bits=3), 8, 128), 32, torch.bfloat16, False, 1, 16, False, 3)
    assert v3["K_FRAGMENT"] and not v3["V_FRAGMENT"]
    gathers = KVCodec(TQConfig(k_bits=3, v_bits=3), 8, 128)  # codebook gathers: not swapped on the GPU
    gpu = decode_tiles.attention_meta(gathers, 32, torch.bfloat16, True, 1, 16, False, 3)
    assert not gpu["SWAP_AB"] and not gpu["K_LUT"] and "maxnreg" not in gpu
    assert decode_tiles.attention_meta(gathers, 32, torch.bfloat16, False, 1, 16, False, 3)["SWAP_AB"]  # interpreter


def test_programmatic_launch_only_where_enabled_and_supported(monkeypatch):
    """kernels/pdl.py: launches use PDL only when enabled, on CUDA devices of compute capability 9+; the metas then
    carry the launch option and the kernels' PDL switch together."""
    cuda0, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(pdl, "_capability_major", lambda index: 9)
    assert pdl.pdl_launch(cuda0) and not pdl.pdl_launch(cpu)  # on by default
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.pdl_launch(cuda0)
    monkeypatch.setattr(pdl, "ENABLED", True)
    monkeypatch.setattr(pdl, "_capability_major", lambda index: 8)
    assert not pdl.pdl_launch(cuda0)
    codec = KVCodec(TQConfig(), 8, 128)
    for on in (False, True):
        meta = decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, 1, 16, False, 3, pdl=on)
        rmeta = decode_tiles.reduce_meta(32, 128, 128, False, tl.float16, "tf32", 3, pdl=on)
        for m in (meta, rmeta):
            assert m["PDL"] == on and m.get("launch_pdl", False) == on


def test_workspace_padding_and_untouched_rows(device):
    """Oversized, NaN-filled workspace; padded token rows past query_start_loc[-1] keep their contents."""
    b = make_batch(device, [40, 9], [1, 2], extra_tokens=3, seed=8)
    ws = AttentionWorkspace.allocate(16, 4, 64, 8, device)
    for t in (ws.acc, ws.row_max, ws.row_sum):
        t.fill_(float("nan"))
    sentinel = torch.full_like(b.query, 7.0)
    out = b.run(num_splits=5, out=sentinel.clone(), workspace=ws)
    assert_matches(out, b.expected(), TOL_FP32, rows=3)
    assert (out[3:] == 7.0).all()
    fused = b.run(out=sentinel.clone())
    assert (fused[3:] == 7.0).all()
    torch.testing.assert_close(out, fused, rtol=1e-5, atol=1e-5)


def test_reduce_reads_splits_in_steps(device):
    """More splits than one reduce step reads (16 at d=64): the last step is part-masked, and splits
    that saw no token leave NaN in the workspace that must not reach the output."""
    assert decode_tiles.TILES[64].reduce_splits == 16
    b = make_batch(device, [1500, 5], [1, 1], seed=23)
    ws = AttentionWorkspace.allocate(2, 4, 64, 24, device)
    for t in (ws.acc, ws.row_max, ws.row_sum):
        t.fill_(float("nan"))
    assert_matches(b.run(num_splits=21, workspace=ws), b.expected(), TOL_FP32)


@pytest.mark.parametrize(
    ("head_dim", "change"),
    [
        (64, {"unrotated_min_splits": 2}),
        (128, {"unrotated_min_splits": decode_tiles.WIDE_MIN_SPLITS}),
        (128, {"unrotated_min_splits": 2, "reduce_plain_rows": 1}),
    ],
)
def test_unrotated_partials_agree(device, monkeypatch, head_dim, change):
    """Split programs that normalise and un-rotate their own partials (the reduce then a plain weighted sum)
    compute the same attention; NaN in unused workspace never reaches the output. With the switch at
    WIDE_MIN_SPLITS, 3 splits take the rotated reduce and 37 the plain one."""
    tiles = dataclasses.replace(decode_tiles.TILES[head_dim], **change)
    monkeypatch.setitem(decode_tiles.TILES, head_dim, tiles)
    b = make_batch(device, [700, 5, 130], [1, 1, 1], head_dim=head_dim, seed=24)
    ws = AttentionWorkspace.allocate(3, 4, head_dim, 40, device)
    for t in (ws.acc, ws.row_max, ws.row_sum):
        t.fill_(float("nan"))
    for num_splits in (3, 37):  # 37: past one plain step's splits (at most MAX_SPLITS a step)
        assert decode_tiles.at_least(tiles.unrotated_min_splits, num_splits) == (
            num_splits >= tiles.unrotated_min_splits
        )
        assert_matches(b.run(num_splits=num_splits, workspace=ws), b.expected(), TOL_FP32)


@pytest.mark.parametrize(("head_dim", "rows"), [(64, 1), (128, 4), (128, None)])
def test_reduce_unrotates_few_rows_without_a_dot(device, monkeypatch, head_dim, rows):
    """The rotated reduce in programs of fewer than 16 rows un-rotates by fp32 multiply-adds in column chunks;
    it must agree with the reference, with NaN left in unused workspace. rows=None: d=128 as configured, where
    only a launch of WIDE_MIN_SPLITS or more takes the few-row reduce (wide_reduce_rows)."""
    tiles = decode_tiles.TILES[head_dim]
    if rows is not None:
        tiles = dataclasses.replace(tiles, reduce_rows=rows, wide_reduce_rows=None, unrotated_min_splits=None)
    monkeypatch.setitem(decode_tiles.TILES, head_dim, tiles)
    wide = decode_tiles.WIDE_MIN_SPLITS
    for num_splits, expect_rows in ((3, rows or decode_tiles.REDUCE_BLOCK_R), (wide, rows or tiles.wide_reduce_rows)):
        meta = decode_tiles.reduce_meta(4, head_dim, head_dim, False, tl.float16, "tf32", num_splits)
        assert meta["ROTATED"] and meta["BLOCK_R"] == expect_rows
        assert meta["UNROTATE_BY_DOT"] == (expect_rows >= decode_tiles.REDUCE_BLOCK_R)
    b = make_batch(device, [700, 5, 130], [1, 1, 1], head_dim=head_dim, seed=25)
    ws = AttentionWorkspace.allocate(3, 4, head_dim, 40, device)
    for t in (ws.acc, ws.row_max, ws.row_sum):
        t.fill_(float("nan"))
    for num_splits in (3, 37):
        assert_matches(b.run(num_splits=num_splits, workspace=ws), b.expected(), TOL_FP32)


@pytest.mark.parametrize(
    ("head_dim", "change"),
    [(64, {}), (128, {"tail_merge_splits": 8}), (128, {"unrotated_min_splits": 2, "prerotate_q_min_splits": 2})],
)
def test_tail_merge_agrees(device, monkeypatch, head_dim, change):
    """The split program that stores its partials last merges them (no reduce launch): the same attention with
    prefill chunks, an empty sequence and splits that see no token, NaN in unused workspace never reaching the
    output, and every ticket back at zero afterwards, so the next launch (a CUDA-graph replay) starts clean.
    Fused and wide launches never merge in the tail."""
    tiles = dataclasses.replace(decode_tiles.TILES[head_dim], tail_merge_min_splits=2, **change)
    monkeypatch.setitem(decode_tiles.TILES, head_dim, tiles)
    b = make_batch(device, [700, 9, 130, 4, 66], [1, 3, 1, 0, 2], head_dim=head_dim, extra_tokens=2, seed=27)
    ws = AttentionWorkspace.allocate(9, 4, head_dim, 40, device)
    for t in (ws.acc, ws.row_max, ws.row_sum, ws.query):
        t.fill_(float("nan"))
    want = b.expected()
    with patch("turboquant_vllm.kernels.decode._reduce_splits_kernel", None):  # launching it would raise
        for num_splits, max_query_len in ((3, 3), (29, 3), (2, 1)):
            out = b.run(num_splits=num_splits, workspace=ws, max_query_len=max_query_len)
            assert_matches(out, want, TOL_FP32, rows=7)
            assert out[7:].isnan().all()  # padding rows untouched
            assert (ws.tickets == 0).all()
    for num_splits in (1, decode_tiles.WIDE_MIN_SPLITS):  # fused; wide launches keep the reduce
        meta = decode_tiles.attention_meta(b.codec, 4, torch.float32, False, 1, 16, num_splits == 1, num_splits)
        assert not meta["TAIL_MERGE"]


@pytest.mark.parametrize(("head_dim", "num_splits"), [(64, 3), (128, 37)])
def test_prerotated_queries_agree(device, monkeypatch, head_dim, num_splits):
    """Queries rotated once per step into the workspace (then read by every split program) give the same
    attention, with prefill chunks in the batch and query rows of padding that are left alone."""
    tiles = dataclasses.replace(decode_tiles.TILES[head_dim], prerotate_q_min_splits=2)
    monkeypatch.setitem(decode_tiles.TILES, head_dim, tiles)
    b = make_batch(device, [700, 5, 130], [1, 3, 1], head_dim=head_dim, extra_tokens=2, seed=26)
    ws = AttentionWorkspace.allocate(8, 4, head_dim, 40, device)
    ws.query.fill_(float("nan"))
    assert decode_tiles.at_least(tiles.prerotate_q_min_splits, num_splits)
    assert_matches(b.run(num_splits=num_splits, workspace=ws), b.expected(), TOL_FP32, rows=5)
    assert torch.isfinite(ws.query[:5]).all() and ws.query[7:].isnan().all()  # 5 query tokens + 2 of padding


@pytest.mark.parametrize(("head_dim", "num_splits", "offset"), [(64, 2, False), (64, 29, True), (128, 3, False)])
def test_published_queries_agree(device, monkeypatch, head_dim, num_splits, offset):
    """Where the launch has store programs (Tiles.fused_store_min_splits), they rotate the queries for the split
    programs (Tiles.publish_q) instead of a rotation launch: the same attention and stored pages, with prefill
    chunks, an empty sequence and padding rows in the batch, and every ticket back at zero afterwards."""
    tiles = dataclasses.replace(decode_tiles.TILES[head_dim], fused_store_min_splits=2, prerotate_q_min_splits=2,
                                publish_q=True)  # fmt: skip
    monkeypatch.setitem(decode_tiles.TILES, head_dim, tiles)
    seq_lens, q_lens = [300, 9, 130, 4, 66], [1, 3, 1, 0, 2]
    b = make_batch(device, seq_lens, q_lens, head_dim=head_dim, extra_tokens=2, seed=30)
    slots = torch.cat(
        [
            sequence_slots(b.block_table[s].cpu(), n, 16)[n - q :]
            for s, (n, q) in enumerate(zip(seq_lens, q_lens, strict=True))
        ]
        + [torch.tensor([-1, -1])]
    )
    slots = slots.to(device)  # the two padding tokens are stored nowhere
    g = torch.Generator().manual_seed(31)
    key_offset = KeyOffset.build(torch.randn(2, head_dim, generator=g), b.codec.rotation) if offset else None
    want_cache = b.cache.clone()
    store_kv(b.codec, b.key, b.value, want_cache, slots, key_offset)
    ws = AttentionWorkspace.allocate(9, 4, head_dim, 40, device)
    ws.query.fill_(float("nan"))
    meta = decode_tiles.attention_meta(b.codec, 4, torch.float32, False, 3, 16, False, num_splits, store_new=True)
    assert meta["Q_PUBLISHED"] and meta["STORE_NEW"]
    with patch("turboquant_vllm.kernels.decode._rotate_queries_kernel", None):  # launching it would raise
        out = b.run(num_splits=num_splits, workspace=ws, store_slots=slots, key_offset=key_offset)
    assert_matches(out, b.expected(), TOL_FP32, rows=7)  # context stored without the offset: every scale positive
    assert out[7:].isnan().all() and torch.equal(b.cache, want_cache)
    assert (ws.tickets == 0).all()
    assert torch.isfinite(ws.query[:7]).all() and ws.query[7:].isnan().all()


@pytest.mark.parametrize(
    ("num_splits", "offset", "contract_last", "in_kernel"),
    [(3, False, False, True), (2, True, False, True), (decode_tiles.WIDE_MIN_SPLITS, False, False, True),
     (3, True, True, True), (1, False, False, False), (3, True, False, False)],
)  # fmt: skip
def test_fused_store_writes_what_store_kv_writes(device, num_splits, offset, contract_last, in_kernel, monkeypatch):
    """paged_attention(store_slots=...) writes this step's K/V into the pages byte for byte as store_kv does,
    leaves a negative slot alone, and still attends the new tokens exactly (their slots held poison): in the
    attention launch from Tiles.fused_store_min_splits on (with either form of the one-token rotation,
    store.CONTRACT_LAST; by store programs of its own), else in a store launch after it."""
    tiles = dataclasses.replace(decode_tiles.TILES[64], fused_store_min_splits=2 if in_kernel else None)
    monkeypatch.setitem(decode_tiles.TILES, 64, tiles)
    assert decode_tiles.stores_in_attention(64, num_splits) == in_kernel
    monkeypatch.setattr(store_module, "CONTRACT_LAST", contract_last)
    seq_lens, q_lens = [40, 9, 23], [1, 4, 1]
    b = make_batch(device, seq_lens, q_lens, seed=27)
    slots = []
    for s, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens, strict=True)):
        slots.append(sequence_slots(b.block_table[s].cpu(), seq_len, 16)[seq_len - q_len :])
    slots = torch.cat(slots).to(device)
    slots[2] = -1
    g = torch.Generator().manual_seed(28)
    key_offset = KeyOffset.build(torch.randn(2, 64, generator=g), b.codec.rotation) if offset else None
    want = b.cache.clone()
    store_kv(b.codec, b.key, b.value, want, slots, key_offset)
    before = b.cache.clone()
    out = b.run(num_splits=num_splits, store_slots=slots, key_offset=key_offset)
    assert not torch.equal(before, want) and torch.equal(b.cache, want)
    assert_matches(out, b.expected(), TOL_FP32)  # context stored without the offset: every scale positive


def test_strided_views(device):
    """query/key/value as column slices of one fused qkv buffer, out as a slice of a wider buffer."""
    b = make_batch(device, [25, 18], [1, 4], num_heads=4, num_kv_heads=2, seed=9)
    n, d = b.query.shape[0], 64
    qkv = torch.randn(n, 9, d, device=device)
    qkv[:, 0:4], qkv[:, 5:7], qkv[:, 7:9] = b.query, b.key, b.value
    wide = torch.zeros(n, 6, d, device=device)
    q, k, v, out = qkv[:, 0:4], qkv[:, 5:7], qkv[:, 7:9], wide[:, 1:5]
    assert not q.is_contiguous() and not out.is_contiguous()
    paged_attention(b.codec, q, k, v, b.cache, b.block_table, b.seq_lens, b.query_start_loc, b.scale, out,
                    max_query_len=4, num_splits=2)  # fmt: skip
    assert_matches(out, b.expected(), TOL_FP32)
    assert not wide[:, 0].any() and not wide[:, 5].any()


@pytest.mark.parametrize(("dtype", "num_splits"), [(torch.bfloat16, 2), (torch.float16, 1)])
def test_half_inputs(device, dtype, num_splits):
    b = make_batch(device, [20, 29, 6], [1, 3, 6], head_dim=128, dtype=dtype, seed=10)
    out = b.run(num_splits=num_splits)
    assert out.dtype == dtype
    assert_matches(out, b.expected(), TOL_HALF)


def test_int64_block_table_and_seq_lens(device):
    b = make_batch(device, [33, 6], [1, 6], seed=11)
    b.block_table, b.seq_lens, b.query_start_loc = b.block_table.long(), b.seq_lens.long(), b.query_start_loc.long()
    assert_matches(b.run(num_splits=2), b.expected(), TOL_FP32)


def test_rejects_bad_inputs(device):
    b = make_batch(device, [5], [1])
    with pytest.raises(AssertionError, match="num_splits=4 > workspace 2"):
        b.run(num_splits=4, workspace=AttentionWorkspace.allocate(4, 4, 64, 2, device))
    with pytest.raises(AssertionError, match="cache must be uint8"):
        paged_attention(b.codec, b.query, b.key, b.value, b.cache.float(), b.block_table, b.seq_lens,
                        b.query_start_loc, b.scale, b.query.clone(), max_query_len=1, num_splits=1)  # fmt: skip
    with pytest.raises(AssertionError, match="key must be"):
        paged_attention(b.codec, b.query, b.key[:, :1], b.value, b.cache, b.block_table, b.seq_lens,
                        b.query_start_loc, b.scale, b.query.clone(), max_query_len=1, num_splits=1)  # fmt: skip


def test_wide_tiles_only_for_heavily_split_launches(device):
    codec = KVCodec(TQConfig(), 2, 128)
    tiles = decode_tiles.TILES[128]
    narrow = decode_tiles.attention_meta(codec, 8, torch.bfloat16, True, 1, 16, False, decode_tiles.WIDE_MIN_SPLITS - 1)
    wide = decode_tiles.attention_meta(codec, 8, torch.bfloat16, True, 1, 16, False, decode_tiles.WIDE_MIN_SPLITS)
    assert narrow["BLOCK_N"] == tiles.block_n and wide["BLOCK_N"] == tiles.wide_block_n > tiles.block_n
    b = make_batch(device, [300, 77], [1, 1], num_heads=8, num_kv_heads=2, head_dim=128, seed=21)
    assert_matches(b.run(num_splits=decode_tiles.WIDE_MIN_SPLITS), b.expected(), TOL_FP32)


@pytest.mark.parametrize(
    ("num_splits", "k_bits", "swap_ab", "prerotate"),
    [(1, 4, False, False), (3, 4, False, False), (2, 2, False, False), (1, 3, False, False), (1, 4, True, False),
     (3, 3, True, False), (3, 4, True, True)],
)  # fmt: skip
def test_key_offset_scores_match_reference(device, monkeypatch, num_splits, k_bits, swap_ab, prerotate):
    tiles = dataclasses.replace(
        decode_tiles.TILES[64], swap_ab=swap_ab, prerotate_q_min_splits=2 if prerotate else None
    )
    monkeypatch.setitem(decode_tiles.TILES, 64, tiles)
    g = torch.Generator().manual_seed(31)
    num_kv_heads, head_dim, block_size = 2, 64, 16
    offset = torch.randn(num_kv_heads, head_dim, generator=g) * 1.5
    b = make_batch(device, [70, 41], [1, 3], num_heads=4, num_kv_heads=num_kv_heads, head_dim=head_dim, seed=32,
                   k_bits=k_bits)  # fmt: skip
    # Rewrite the context pages with keys around the offset, stored relative to it where that shortens them.
    for s, (seq_len, q_len) in enumerate(((70, 1), (41, 3))):
        slots = sequence_slots(b.block_table[s].cpu(), seq_len - q_len, block_size)
        key = torch.randn(len(slots), num_kv_heads, head_dim, generator=g) + offset
        key[0] = -offset
        cache = b.cache.cpu()
        store_ref(b.ref_codec, key, torch.randn(key.shape, generator=g), cache, slots, offset)
        b.cache.copy_(cache)
    want = paged_attention_ref(b.ref_codec, b.query.cpu(), b.key.cpu(), b.value.cpu(), b.cache.cpu(),
                               b.block_table.cpu(), b.seq_lens.cpu(), b.query_start_loc.cpu(), b.scale,
                               offset)  # fmt: skip
    got = b.run(num_splits=num_splits, key_offset=KeyOffset.build(offset, b.codec.rotation))
    assert_matches(got, want, TOL_FP32)
    ignored = b.run(num_splits=num_splits)  # reading the same pages without the offset scores other keys
    assert (ignored.cpu() - want).abs().max() > 10 * TOL_FP32 * want.abs().max()


def test_choose_num_splits():
    """Tiles without resident_programs (d=64): about two 4-warp programs an SM."""
    assert choose_num_splits(1, 8, 32, 132, head_dim=64) == 32  # 8 programs: split up to the cap
    assert choose_num_splits(1, 8, 16, 132, head_dim=64) == 16
    assert choose_num_splits(4, 8, 32, 132, head_dim=64) == 9  # cdiv(264, 32)
    assert choose_num_splits(16, 8, 32, 132, head_dim=64) == 3
    assert choose_num_splits(17, 8, 32, 132, head_dim=64) == 1  # 136 programs already cover 132 SMs
    assert choose_num_splits(256, 8, 32, 132, head_dim=64) == 1
    assert choose_num_splits(1, 8, 1, 132, head_dim=64) == 1
    assert choose_num_splits(0, 8, 32, 132, head_dim=64) == 32
    for seqs in range(1, 70):
        n = choose_num_splits(seqs, 2, 16, 108, head_dim=64)
        assert 1 <= n <= 16 and (n == 1) == (seqs * 2 >= 108)
        assert n in (1, 16) or seqs * 2 * n >= 2 * 108


@pytest.mark.parametrize("num_sms", [132, 114, 78])
def test_split_choice_fills_one_wave_of_resident_programs(num_sms):
    """d=128: 2-16 sequences split until one more split would need a second wave of capped programs (3 an SM);
    one sequence until its wide programs (2 an SM) fill one, counting the store programs launches of
    >= fused_store_min_splits splits add (one per sequence and KV head)."""
    tiles = decode_tiles.TILES[128]
    assert (tiles.resident_programs, tiles.wide_resident_programs) == (3, 2) and tiles.wide_block_n
    assert choose_num_splits(1, 8, 32, 132) == 32  # 8 x 32 wide programs + 8 store programs = 264
    assert choose_num_splits(1, 8, 48, 132) == 32  # a wider workspace changes nothing: the wave is full
    assert choose_num_splits(2, 8, 32, 132) == 24  # 16 x 24 = 384 capped programs <= 396
    assert choose_num_splits(4, 8, 32, 132) == 12
    assert choose_num_splits(16, 8, 32, 132) == 3
    assert choose_num_splits(17, 8, 32, 132) == 1  # 136 programs already cover 132 SMs

    def programs(seqs: int, splits: int) -> int:
        return seqs * 8 * (splits + decode_tiles.at_least(tiles.fused_store_min_splits, splits))

    for seqs in range(1, num_sms // 8 + 1):
        n = choose_num_splits(seqs, 8, 64, num_sms)
        resident = 2 if n >= decode_tiles.WIDE_MIN_SPLITS else 3
        assert programs(seqs, n) <= resident * num_sms, (seqs, n)
        assert programs(seqs, n + 1) > resident * num_sms or n == decode_tiles.WIDE_MIN_SPLITS - 1, (seqs, n)


@pytest.mark.parametrize(("split_slots", "want_splits"), [(6, 3), (2, 1), (40, 4)])
def test_live_splits_of_a_padded_batch(device, split_slots, want_splits):
    """A graph's padding rows (no query, no context) do not count: the 2 live sequences of 4 share split_slots
    (head_dim 128: the tiles that count live sequences).

    The workspace starts as NaN, so a split the reduce read without its program having run would poison the
    output; the splits past the live count must stay unwritten, proving those programs left at once."""
    b = make_batch(device, [150, 0, 45, 0], [1, 0, 2, 0], num_heads=4, num_kv_heads=2, head_dim=128, seed=21)
    assert live_splits(2, 4, split_slots) == want_splits
    ws = AttentionWorkspace.allocate(8, 4, 128, 4, device, max_seqs=4)
    for t in (ws.acc, ws.row_max, ws.row_sum):
        t.fill_(float("nan"))
    assert_matches(b.run(num_splits=4, split_slots=split_slots, workspace=ws), b.expected(), TOL_FP32, rows=3)
    written = ~torch.isnan(ws.row_max[:3].cpu()).any(dim=1)  # [token, split]: -inf where a split saw no token
    assert written.tolist() == [[s < want_splits for s in range(4)]] * 3


def test_split_grid_serves_padded_batches(monkeypatch):
    """d=128 on 132 SMs: a full batch splits as choose_num_splits does; a batch just over half live splits finer in
    the same grid, and no live count needs more than one wave of capped programs (3 an SM)."""
    assert choose_split_grid(16, 8, 32, 132) == (5, 49)  # 9 live: 5 splits; 16 live: 3
    assert choose_split_grid(1, 8, 32, 132) == (32, 0)  # one sequence: the wide tiles, nothing to pad
    assert choose_split_grid(2, 8, 32, 132) == (24, 49)
    assert choose_split_grid(17, 8, 32, 132) == (1, 0)  # no split at all
    assert choose_split_grid(16, 8, 32, 132, head_dim=64) == (3, 0)  # tiles without resident_programs
    for seqs in range(2, 17):
        grid, slots = choose_split_grid(seqs, 8, 32, 132)
        assert live_splits(seqs, grid, slots) == choose_num_splits(seqs, 8, 32, 132)
        assert grid < decode_tiles.WIDE_MIN_SPLITS
        for live in range(seqs // 2 + 1, seqs + 1):
            splits = live_splits(live, grid, slots)
            assert live * 8 * splits <= 3 * 132 and splits >= live_splits(seqs, grid, slots), (seqs, live)
    monkeypatch.setitem(decode_tiles.TILES, 128, dataclasses.replace(decode_tiles.TILES[128], live_splits=False))
    assert choose_split_grid(16, 8, 32, 132) == (3, 0)  # Tiles.live_splits off: choose_num_splits, fixed


def test_narrower_programs_get_more_splits(monkeypatch):
    """2-warp programs: the same warps per SM take twice the programs before splitting stops."""
    tiles = dataclasses.replace(decode_tiles.TILES[128], num_warps=2, resident_programs=None)
    monkeypatch.setitem(decode_tiles.TILES, 128, tiles)
    assert choose_num_splits(16, 8, 32, 132) == 5  # cdiv(2 * 132 * 2, 128)
    assert choose_num_splits(17, 8, 32, 132) == 4  # 136 programs no longer fill the SMs
    assert choose_num_splits(33, 8, 32, 132) == 1
    assert choose_num_splits(16, 8, 32, 132, head_dim=64) == 3  # other head dims keep their own tiles


_HOPPER_COMPILE = """
import dataclasses, torch, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from turboquant_vllm.kernels import decode, decode_reduce, decode_tiles, sinks, store
from turboquant_vllm.kernels.pdl import pdl_option
from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec

def build(fn, ptrs, meta, options):
    sig = {n: ptrs.get(n, "constexpr" if n in meta else "i32") for n in fn.arg_names}
    assert compile(ASTSource(fn, sig, meta), target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]

codec = KVCodec(TQConfig(k_bits=4, v_bits=3), 8, 128)
ptrs = dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "out_ptr"), "*bf16")
ptrs |= dict.fromkeys(("rot_ptr", "k_cent_ptr", "v_cent_ptr", "koff_ptr"), "*fp32")
ptrs |= dict.fromkeys(("ws_acc_ptr", "ws_max_ptr", "ws_sum_ptr", "ws_q_ptr"), "*fp32")
ptrs |= dict.fromkeys(("k_bnd_ptr", "k_cent32_ptr", "v_bnd_ptr", "v_cent32_ptr", "koff_orig_ptr"), "*fp32")
ptrs |= {"slot_ptr": "*i64", "ws_ticket_ptr": "*i32"}
ptrs |= {"cache_ptr": "*u8", "lut_ptr": "*i32", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32"}
ptrs |= {"qk_scale": "fp32"}
decode_tiles.TILES[128] = dataclasses.replace(decode_tiles.TILES[128], tail_merge_min_splits=2)
ptrs |= {"sink_kv_ptr": "*bf16", "sink_tag_ptr": "*i32"}
for num_splits, pdl in ((1, False), (3, True)):  # fused; split with the tail merge, programmatic launch and sinks
    meta = decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, 1, 16, num_splits == 1, num_splits, True,
                                       store_new=True, pdl=pdl, sinks=4 * pdl)
    assert meta["K_LUT"] and not meta["V_LUT"]  # the byte-permute lookups (PTX) compile for 4-bit keys
    assert meta["TAIL_MERGE"] == (num_splits > 1) and meta["PDL"] == meta.get("launch_pdl", False) == pdl
    options = {k: meta.pop(k) for k in decode_tiles.LAUNCH_OPTIONS if k in meta}
    build(decode._attention_kernel, ptrs, meta, options)
ptrs = dict.fromkeys(("ws_acc_ptr", "ws_max_ptr", "ws_sum_ptr", "rot_ptr"), "*fp32") | {"out_ptr": "*bf16"}
for plain in (False, True):
    meta = decode_tiles.reduce_meta(32, 128, 128, plain, tl.float16, "tf32", pdl=plain)
    options = {k: meta.pop(k) for k in decode_tiles.LAUNCH_OPTIONS if k in meta}
    build(decode_reduce._reduce_splits_kernel, ptrs | {"qsl_ptr": "*i32"}, meta, options)
for pdl in (False, True):
    meta = dict(NUM_HEADS=32, HEAD_DIM=128, BLOCK_D=128, BLOCK_R=16, CHUNK=16, PREC="tf32", PDL=pdl)
    build(decode_reduce._rotate_queries_kernel, {"q_ptr": "*bf16", "out_ptr": "*fp32", "rot_ptr": "*fp32"}, meta,
          pdl_option(pdl))
meta = dict(HEAD_DIM_PAD=128, BLOCK_T=1, BLOCK_K=32, HEADS_PER_PROGRAM=1, **codec.layout.kernel_constants(16),
            NORM_CORRECTION=True, TINY=1e-30, DOT_PRECISION="ieee", HAS_KEY_OFFSET=False, CONTRACT_LAST=False,
            BUCKET_SEARCH=False, LAUNCH_DEPENDENTS=True, PDL_AFTER=True)  # the store after the attention, with PDL
ptrs = dict.fromkeys(("key_ptr", "value_ptr"), "*bf16") | {"cache_ptr": "*u8", "slot_ptr": "*i64"}
ptrs |= dict.fromkeys(("rot_ptr", "rot_lo_ptr", "k_bnd_ptr", "k_cent_ptr", "v_bnd_ptr", "v_cent_ptr"), "*fp32")
ptrs |= dict.fromkeys(("koff_ptr", "koff_rot_ptr"), "*fp32")
build(store._store_kv_kernel, ptrs, meta, pdl_option(True))
# a prefill-sized store: two tf32 dots on R's parts, binary-search indices, keys relative to an offset
meta |= dict(BLOCK_T=16, DOT_PRECISION="tf32_split", BUCKET_SEARCH=True, HAS_KEY_OFFSET=True, PDL_AFTER=False)
build(store._store_kv_kernel, ptrs, meta, pdl_option(False))
ptrs = dict.fromkeys(("k_ptr", "v_ptr", "kv_ptr"), "*bf16") | {"rot_ptr": "*fp32", "tag_ptr": "*i32"}
ptrs |= dict.fromkeys(("block_table_ptr", "seq_lens_ptr", "qsl_ptr"), "*i32")
meta = dict(SINKS=4, HEAD_DIM=128, BLOCK_D=128, ROT_CHUNK=sinks.WRITER_ROT_CHUNK, SCAN=sinks.SCAN, PDL=True)
build(sinks._write_sinks_kernel, ptrs, meta, pdl_option(True) | {"num_warps": 4})
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """bf16 decode (with a key offset and the fused store; fused, and split with the tail merge, programmatic
    dependent launch and exact sinks), the split reduce, the query rotation, the store launched after the attention
    and the sink writer lower to sm_90 cubins on the host, GPU or not.

    The interpreter never exercises GPU lowering (nor the bf16 new-token dots, which run on GPUs
    only), so compile in a fresh process without TRITON_INTERPRET.
    """
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ---- GPU only: sizes the interpreter cannot afford ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "k_bits", "v_bits", "dtype"),
    [
        (32, 8, 128, 4, 4, torch.bfloat16),
        (16, 1, 128, 3, 3, torch.float16),
        (8, 2, 256, 4, 2, torch.bfloat16),
        (12, 4, 96, 2, 2, torch.bfloat16),
        (32, 8, 128, 4, 4, torch.float32),
    ],
)
def test_gpu_long_decode(cuda, num_heads, num_kv_heads, head_dim, k_bits, v_bits, dtype):
    seq_lens = [32768 + 5, 1, 4097, 16, 12000, 33]
    b = make_batch(cuda, seq_lens, [1] * len(seq_lens), num_heads=num_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, k_bits=k_bits, v_bits=v_bits, dtype=dtype, seed=20)  # fmt: skip
    want = b.expected()
    tol = TOL_FP32 if dtype == torch.float32 else TOL_HALF
    for num_splits in (1, 7, 32):
        assert_matches(b.run(num_splits=num_splits), want, tol)


@pytest.mark.gpu
def test_gpu_many_seqs_mixed(cuda):
    g = torch.Generator().manual_seed(21)
    q_lens = [1] * 48 + [1, 130, 7, 300]
    seq_lens = [int(x) for x in torch.randint(1, 3000, (52,), generator=g)]
    seq_lens = [max(s, q) + (q > 1) * 500 for s, q in zip(seq_lens, q_lens, strict=True)]
    b = make_batch(cuda, seq_lens, q_lens, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                   block_size=16, seed=21)  # fmt: skip
    want = b.expected()
    for num_splits in (1, 4):
        assert_matches(b.run(num_splits=num_splits), want, TOL_HALF)


@pytest.mark.gpu
def test_gpu_int64_addressing(cuda):
    """A cache over 2^31 bytes whose used pages sit at the far end."""
    b = make_batch(cuda, [100, 37], [1, 1], num_heads=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, seed=22)
    want = b.expected()
    page = b.cache.shape[1] * b.cache.shape[2]
    shift = 2**31 // page + 7
    big = torch.full((shift + b.cache.shape[0], *b.cache.shape[1:]), POISON, dtype=torch.uint8, device=cuda)
    big[shift:] = b.cache
    b.cache, b.block_table = big, b.block_table + shift
    assert big.numel() > 2**31
    for num_splits in (1, 3):
        assert_matches(b.run(num_splits=num_splits), want, TOL_HALF)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("num_seqs", "num_splits", "fused_store"), [(16, 3, False), (16, 3, True), (1, 32, True), (40, 1, True)]
)
def test_gpu_programmatic_launch_agrees(cuda, monkeypatch, num_seqs, num_splits, fused_store):
    """With programmatic dependent launch (kernels/pdl.py) a step's store, query rotation, attention and reduce
    overlap; captured in a CUDA graph and replayed, they write the same pages and output (a race would be far off
    bf16 rounding) as plain launches. With
    fused_store paged_attention stores: in the attention launch (32 splits) or in a store launch after it."""
    g = torch.Generator().manual_seed(29)
    seq_lens = [int(x) for x in torch.randint(500, 5000, (num_seqs,), generator=g)]
    b = make_batch(cuda, seq_lens, [1] * num_seqs, num_heads=32, num_kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, seed=29)  # fmt: skip
    slots = torch.cat([sequence_slots(b.block_table[s].cpu(), n, 16)[n - 1 :] for s, n in enumerate(seq_lens)])
    slots = slots.to(cuda)  # this step's tokens, whose slots hold poison until the store

    def step(cache: torch.Tensor, out: torch.Tensor, ws: AttentionWorkspace) -> None:
        if not fused_store:
            store_kv(b.codec, b.key, b.value, cache, slots)
        paged_attention(b.codec, b.query, b.key, b.value, cache, b.block_table, b.seq_lens, b.query_start_loc,
                        b.scale, out, max_query_len=1, num_splits=num_splits, workspace=ws,
                        store_slots=slots if fused_store else None)  # fmt: skip

    results = []
    for enabled in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        assert pdl.pdl_launch(b.query.device) == enabled
        cache, out = b.cache.clone(), torch.empty_like(b.query)
        ws = AttentionWorkspace.allocate(num_seqs, 32, 128, 32, cuda)
        step(cache, out, ws)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(4):
                step(cache, out, ws)
        for _ in range(5):
            graph.replay()
        results.append((out.clone(), cache))
    assert_matches(results[0][0], b.expected(), TOL_HALF)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-2, atol=1e-2)  # same arithmetic, other code
    assert torch.equal(results[1][1], results[0][1])


@pytest.mark.gpu
@pytest.mark.parametrize("tail_merge", [False, True])
def test_gpu_cuda_graph_replay(cuda, monkeypatch, tail_merge):
    """Captured once with a workspace (no allocation, no host sync), replayed on new lengths; with the tail merge,
    each replay's tickets start from where the last one left them."""
    tiles = dataclasses.replace(decode_tiles.TILES[128], tail_merge_min_splits=2 if tail_merge else None)
    monkeypatch.setitem(decode_tiles.TILES, 128, tiles)
    b = make_batch(cuda, [700, 40, 2000, 9], [1, 1, 1, 1], num_heads=32, num_kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, seed=23)  # fmt: skip
    ws = AttentionWorkspace.allocate(8, 32, 128, 16, cuda)
    out = torch.empty_like(b.query)
    b.run(num_splits=16, out=out, workspace=ws, max_query_len=1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        b.run(num_splits=16, out=out, workspace=ws, max_query_len=1)
    graph.replay()
    assert_matches(out, b.expected(), TOL_HALF)
    b.seq_lens.copy_(torch.tensor([650, 3, 1999, 1], device=cuda))
    graph.replay()
    assert_matches(out, b.expected(), TOL_HALF)
    assert (ws.tickets == 0).all()


@pytest.mark.gpu
def test_gpu_padded_graph_replay_splits_live_sequences(cuda):
    """Captured for 16 sequences with choose_split_grid's grid, replayed with 10 live ones and 6 padding rows (no
    query, no context, as vLLM pads a batch to a captured size): the live ones take 4 splits instead of 3."""
    lens = [3000 + 97 * i for i in range(16)]
    b = make_batch(cuda, lens, [1] * 16, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, seed=29)
    num_splits, slots = choose_split_grid(16, 8, decode_tiles.MAX_SPLITS, 132)
    assert (num_splits, live_splits(16, num_splits, slots), live_splits(10, num_splits, slots)) == (5, 3, 4)
    ws = AttentionWorkspace.allocate(16, 32, 128, decode_tiles.MAX_SPLITS, cuda, max_seqs=16)
    out = torch.empty_like(b.query)
    kwargs = dict(num_splits=num_splits, split_slots=slots, out=out, workspace=ws, max_query_len=1)
    b.run(**kwargs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        b.run(**kwargs)
    graph.replay()
    assert_matches(out, b.expected(), TOL_HALF)
    b.seq_lens[10:] = 0
    b.query_start_loc[11:] = 10  # padding rows: no query
    ws.row_max.fill_(float("nan"))
    graph.replay()
    assert_matches(out, b.expected(), TOL_HALF, rows=10)
    written = ~torch.isnan(ws.row_max[:10]).any(dim=1)
    assert written.tolist() == [[s < 4 for s in range(decode_tiles.MAX_SPLITS)]] * 10


@pytest.mark.gpu
@pytest.mark.parametrize(("num_seqs", "num_splits"), [(16, 3), (1, 31), (2, 17)])
def test_gpu_tail_merge_under_contention(cuda, monkeypatch, num_seqs, num_splits):
    """Many launches back to back, the merging program racing the others for the tickets: every replay's output
    matches the separate reduce's within bf16 rounding (the same partials, merged in the same order)."""
    g = torch.Generator().manual_seed(28)
    seq_lens = [int(x) for x in torch.randint(1000, 9000, (num_seqs,), generator=g)]
    b = make_batch(cuda, seq_lens, [1] * num_seqs, num_heads=32, num_kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, seed=28)  # fmt: skip
    ws = AttentionWorkspace.allocate(num_seqs, 32, 128, 32, cuda)
    want = b.run(num_splits=num_splits, workspace=ws, max_query_len=1)
    assert_matches(want, b.expected(), TOL_HALF)
    tiles = dataclasses.replace(decode_tiles.TILES[128], tail_merge_min_splits=2)
    monkeypatch.setitem(decode_tiles.TILES, 128, tiles)
    outs = [b.run(num_splits=num_splits, workspace=ws, max_query_len=1) for _ in range(50)]
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
    assert (ws.tickets == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize(("num_seqs", "num_splits"), [(1, 48), (2, 33)])
def test_gpu_published_queries_under_contention(cuda, monkeypatch, num_seqs, num_splits):
    """Launches back to back whose store programs publish the rotated queries (Tiles.publish_q; here with capped
    64-token tiles, 48 splits for one sequence) while the split programs wait for them: every launch matches the
    rotation launch's output within bf16 rounding, and the tickets end at zero."""
    g = torch.Generator().manual_seed(32)
    seq_lens = [int(x) for x in torch.randint(1000, 9000, (num_seqs,), generator=g)]
    b = make_batch(cuda, seq_lens, [1] * num_seqs, num_heads=32, num_kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, seed=32)  # fmt: skip
    slots = torch.cat([sequence_slots(b.block_table[s].cpu(), n, 16)[n - 1 :] for s, n in enumerate(seq_lens)])
    slots = slots.to(cuda)
    ws = AttentionWorkspace.allocate(num_seqs, 32, 128, 48, cuda)
    capped = dataclasses.replace(decode_tiles.TILES[128], wide_block_n=None)
    runs = {}
    for publish in (False, True):
        monkeypatch.setitem(decode_tiles.TILES, 128, dataclasses.replace(capped, publish_q=publish))
        assert decode_tiles.stores_in_attention(128, num_splits)
        runs[publish] = [b.run(num_splits=num_splits, workspace=ws, max_query_len=1, store_slots=slots)
                         for _ in range(1 if not publish else 50)]  # fmt: skip
    assert_matches(runs[False][0], b.expected(), TOL_HALF)
    for out in runs[True]:
        torch.testing.assert_close(out, runs[False][0], rtol=1e-2, atol=1e-2)
    assert (ws.tickets == 0).all()
