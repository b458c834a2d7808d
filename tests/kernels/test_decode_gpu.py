"""The decode kernel on a GPU at sizes the interpreter cannot afford: long contexts, many sequences, int64
addressing, programmatic launch, CUDA-graph replays and the tail merge under contention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from decode_batch import POISON, TOL_FP32, TOL_HALF, assert_matches, make_batch

from turboquant_vllm.kernels import decode_tiles, pdl
from turboquant_vllm.kernels.decode import paged_attention
from turboquant_vllm.kernels.decode_tiles import choose_split_grid, live_splits
from turboquant_vllm.kernels.reference import sequence_slots
from turboquant_vllm.kernels.store import store_kv
from turboquant_vllm.kernels.workspace import AttentionWorkspace


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
