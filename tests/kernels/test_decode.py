"""paged_attention against paged_attention_ref (and SDPA for fresh prefill): decode, prefill, mixed, splits,
and each launch option against the default."""

from __future__ import annotations

import dataclasses
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
import triton.language as tl
from decode_batch import TOL_FP32, TOL_HALF, assert_matches, make_batch, store_around_offset

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode_tiles
from turboquant_vllm.kernels import store as store_module
from turboquant_vllm.kernels.decode import paged_attention
from turboquant_vllm.kernels.reference import paged_attention_ref, sequence_slots
from turboquant_vllm.kernels.store import store_kv
from turboquant_vllm.kernels.workspace import AttentionWorkspace
from turboquant_vllm.key_offset import KeyOffset


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


@pytest.mark.parametrize(
    ("dtype", "fp8_keys"),
    [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)],
    ids=["fp32", "bf16", "bf16_fp16_keys"],
)
@pytest.mark.parametrize(
    ("k_fragment", "v_fragment", "block_size"),
    [(False, False, 16), (True, False, 16), (True, True, 16), (True, True, 32)],
)
def test_fragment_orders_agree(device, monkeypatch, dtype, fp8_keys, k_fragment, v_fragment, block_size):
    """Keys and values decoded in the wgmma fragments' orders (kernels/fragment.py) give the same decode attention at
    head_dim 128: 64-token tiles at 1 and 3 splits and 128-token wide tiles, contexts ending inside a page and inside
    a 16-token group, poisoned pages around (the value loads read past the context unmasked). On the GPU only the
    bf16 cases swap operands, so only they take these paths there; bf16 keys are scored in fp8 by default at d=128
    (fp32 queries never are), so both key formats' fragment orders are checked."""
    tiles = dataclasses.replace(decode_tiles.TILES[128], k_fragment=k_fragment, v_fragment=v_fragment,
                                fp8_keys=fp8_keys)  # fmt: skip
    monkeypatch.setitem(decode_tiles.TILES, 128, tiles)
    b = make_batch(device, [5, 300, 133, 700], [1, 1, 1, 1], num_heads=8, head_dim=128, block_size=block_size,
                   dtype=dtype, seed=37)  # fmt: skip
    want = b.expected()
    for num_splits in (1, 3, decode_tiles.WIDE_MIN_SPLITS):
        assert_matches(b.run(num_splits=num_splits), want, TOL_FP32 if dtype == torch.float32 else TOL_HALF)
    meta = decode_tiles.attention_meta(b.codec, 8, dtype, device.type == "cuda", 1, block_size, False, 3)
    assert (meta["K_FRAGMENT"], meta["V_FRAGMENT"]) == (k_fragment and meta["SWAP_AB"], v_fragment and meta["SWAP_AB"])
    assert meta["FP8_KEYS"] == (fp8_keys and (k_fragment or not meta["SWAP_AB"]))


# Tiles.fp8_query_halves and fp8_halves_in_rows_min_splits of each form the fp8 score MMA's queries take
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


@pytest.mark.parametrize(
    ("head_dim", "rows", "rot_ahead"), [(64, 1, False), (128, 4, False), (128, None, False), (64, 4, True),
                                        (128, None, True)])  # fmt: skip
def test_reduce_unrotates_few_rows_without_a_dot(device, monkeypatch, head_dim, rows, rot_ahead):
    """The rotated reduce in programs of fewer than 16 rows un-rotates by fp32 multiply-adds in column chunks, or
    with all of R loaded ahead of the partials (reduce_rot_ahead, where [rows, d, d] fits one step); it must agree
    with the reference, with NaN left in unused workspace. rows=None: d=128 as configured, where only a launch of
    WIDE_MIN_SPLITS or more takes the few-row reduce (wide_reduce_rows)."""
    tiles = dataclasses.replace(decode_tiles.TILES[head_dim], reduce_rot_ahead=rot_ahead)
    if rows is not None:
        tiles = dataclasses.replace(tiles, reduce_rows=rows, wide_reduce_rows=None, unrotated_min_splits=None)
    monkeypatch.setitem(decode_tiles.TILES, head_dim, tiles)
    wide = decode_tiles.WIDE_MIN_SPLITS
    for num_splits, expect_rows in ((3, rows or decode_tiles.REDUCE_BLOCK_R), (wide, rows or tiles.wide_reduce_rows)):
        meta = decode_tiles.reduce_meta(4, head_dim, head_dim, False, tl.float16, "tf32", num_splits)
        assert meta["ROTATED"] and meta["BLOCK_R"] == expect_rows
        assert meta["UNROTATE_BY_DOT"] == (expect_rows >= decode_tiles.REDUCE_BLOCK_R)
        assert meta["ROT_AHEAD"] == (rot_ahead and not meta["UNROTATE_BY_DOT"])
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
    offset = torch.randn(2, 64, generator=g) * 1.5
    b = make_batch(device, [70, 41], [1, 3], num_heads=4, num_kv_heads=2, head_dim=64, seed=32, k_bits=k_bits)
    store_around_offset(b, offset, g)
    want = paged_attention_ref(b.ref_codec, b.query.cpu(), b.key.cpu(), b.value.cpu(), b.cache.cpu(),
                               b.block_table.cpu(), b.seq_lens.cpu(), b.query_start_loc.cpu(), b.scale,
                               offset)  # fmt: skip
    got = b.run(num_splits=num_splits, key_offset=KeyOffset.build(offset, b.codec.rotation))
    assert_matches(got, want, TOL_FP32)
    ignored = b.run(num_splits=num_splits)  # reading the same pages without the offset scores other keys
    assert (ignored.cpu() - want).abs().max() > 10 * TOL_FP32 * want.abs().max()
