"""Exact recent tokens (kernels/recent.py): the writer's rows and tags, and the attention and prefill paths that
read them, against paged_attention_ref with the held positions' exact K/V."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from decode_batch import TOL_FP32, assert_matches, make_batch
from test_sinks import S, Step, make_step, rotation, sinks_for

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode_tiles
from turboquant_vllm.kernels.decode import paged_attention
from turboquant_vllm.kernels.recent import RecentTable, recent_entries, write_recent
from turboquant_vllm.kernels.store import store_kv
from turboquant_vllm.key_offset import KeyOffset
from turboquant_vllm.vllm import prefill
from turboquant_vllm.vllm.prefill import plan_prefill, prefill_attention

W = 24  # recent tokens in these tests: a window over two or three 16-token segments


def write(table: RecentTable, rot: torch.Tensor, step: Step, block_size: int = 16) -> None:
    write_recent(table, rot, step.key, step.value, step.block_table, step.seq_lens, step.query_start_loc, block_size)


def test_writer_stores_the_last_recent_tokens_of_each_sequence(device):
    """A prompt longer than W, a short one, a decode token, a padding sequence, pages of 32 tokens: the last W of
    each sequence's new tokens land at (segment % entries, slot % 16) as x @ R.T, tagged with their segment per
    KV head; nothing else is written."""
    block_size, entries = 32, 64
    lengths = [(0, 40), (0, 5), (37, 1), (9, 0)]
    step = make_step(device, lengths, [3, 7, 11, 13])
    step.block_table[:, 1] = torch.tensor([70, 71, 72, 73], device=device)
    table = RecentTable.allocate(entries, W, 2, 64, torch.float32, device)
    rot = rotation(device)
    write(table, rot, step, block_size)
    tags, kv = table.tags.cpu(), table.kv.cpu()
    want_tags = torch.full_like(tags, -1)
    tok0 = 0
    for s, (ctx, q) in enumerate(lengths):
        for pos in range(max(ctx, ctx + q - W), ctx + q):
            tok = tok0 + pos - ctx
            slot = int(step.block_table[s, pos // block_size]) * block_size + pos % block_size
            entry, off = slot // 16 % entries, slot % 16
            want_tags[entry, off] = slot // 16
            torch.testing.assert_close(kv[entry, off, 0], step.key[tok].cpu() @ rot.cpu().T, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(kv[entry, off, 1], step.value[tok].cpu() @ rot.cpu().T, rtol=1e-5, atol=1e-5)
        tok0 += q
    assert torch.equal(tags, want_tags)
    assert (want_tags >= 0).sum() == 2 * (W + 5 + 1)


def test_entries_and_bad_sizes():
    assert recent_entries(1, 32) == 64 and recent_entries(256, 32) == 2048 and recent_entries(256, 16) == 1024
    with pytest.raises(AssertionError, match="power of two"):
        RecentTable.allocate(48, W, 2, 64, torch.float32, "cpu")
    with pytest.raises(AssertionError, match="recent_tokens"):
        RecentTable.allocate(64, 65, 2, 64, torch.float32, "cpu")


def recent_for(batch, device, sinks: int = 0, seed=3):
    """A table filled by a writer step that stored random exact K/V as the last W context tokens of every sequence,
    then a step in which another block took the row of position ctx - 9 of the longest context (a hole in its
    window).

    Returns the table and paged_attention_ref's exact_last for the decode kernel's rule: the held positions from
    max(ctx - W, sinks) on that run unbroken to the context's end."""
    num_seqs = batch.seq_lens.shape[0]
    kv_heads, head_dim = batch.key.shape[1:]
    q_lens = batch.query_start_loc.diff().cpu()
    ctx = batch.seq_lens.cpu() - q_lens
    g = torch.Generator().manual_seed(seed)
    exact_k = torch.randn(num_seqs, W, kv_heads, head_dim, generator=g) * 1.5
    exact_v = torch.randn(num_seqs, W, kv_heads, head_dim, generator=g)
    table = RecentTable.allocate(16, W, kv_heads, head_dim, torch.float32, device)
    n = torch.clamp(ctx, max=W)  # the previous step's new tokens: the last n context positions
    key = torch.cat([exact_k[s, W - n[s] :] for s in range(num_seqs)]).to(device)
    value = torch.cat([exact_v[s, W - n[s] :] for s in range(num_seqs)]).to(device)
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)]).int().to(device)
    write_recent(table, batch.codec.rotation, key, value, batch.block_table, ctx.int().to(device), qsl, 16)
    victim = int(ctx.argmax())
    pos = int(ctx[victim]) - 9
    thief_block = int(batch.block_table[victim, pos // 16]) + table.entries
    write_recent(table, batch.codec.rotation, key[:1], value[:1],
                 torch.tensor([[thief_block]], dtype=torch.int32, device=device),
                 torch.tensor([pos % 16 + 1], dtype=torch.int32, device=device),
                 torch.tensor([0, 1], dtype=torch.int32, device=device), 16)  # fmt: skip
    tags = table.tags.cpu()
    held = torch.zeros(num_seqs, W, dtype=torch.bool)
    for s in range(num_seqs):
        for i in reversed(range(W)):  # the unbroken run back from the context's end
            p = int(ctx[s]) - W + i
            if p < max(0, sinks):
                break
            slot = int(batch.block_table[s, p // 16]) * 16 + p % 16
            row_tags = tags[slot // 16 % table.entries, slot % 16]
            assert (row_tags == row_tags[0]).all(), "every KV head's tag comes from the same writer"
            if row_tags[0] != slot // 16:
                break
            held[s, i] = True
    return table, (exact_k, exact_v, held)


def decode_batch(device, seed):
    """Contexts of 0, 1, 5, 24, 30 and 150 tokens, one query of two tokens."""
    return make_batch(device, [1, 2, 6, 25, 32, 151], [1, 1, 1, 1, 2, 1], seed=seed)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_attention_reads_the_held_run_in_place_of_its_pages(device, monkeypatch, num_splits, swap_ab):
    monkeypatch.setitem(decode_tiles.TILES, 64, dataclasses.replace(decode_tiles.TILES[64], swap_ab=swap_ab))
    b = decode_batch(device, seed=12)
    table, exact_last = recent_for(b, device)
    held = exact_last[2]
    assert held[5, W - 8 :].all() and not held[5, W - 9] and held[3].all()  # the hole ends sequence 5's run
    want = b.expected(exact_last=exact_last)
    assert (want - b.expected()).abs().max() > 0.05 * want.abs().max()  # the window changes the answer
    assert_matches(b.run(num_splits=num_splits, recent=table), want, TOL_FP32)


def test_attention_without_prefetch_reads_the_same_window(device, monkeypatch):
    monkeypatch.setitem(decode_tiles.TILES, 64, dataclasses.replace(decode_tiles.TILES[64], prefetch=False))
    b = decode_batch(device, seed=13)
    table, exact_last = recent_for(b, device, seed=4)
    assert_matches(b.run(num_splits=2, recent=table), b.expected(exact_last=exact_last), TOL_FP32)


def test_attention_with_sinks_scores_no_position_twice(device):
    """Sinks and window together: the window starts past the sinks, so short contexts are split between them."""
    b = make_batch(device, [7, 12, 30, 100], [1, 2, 1, 1], seed=14)
    sinks, exact_first = sinks_for(b, device, seed=6)
    table, exact_last = recent_for(b, device, sinks=S, seed=7)
    want = b.expected(exact_first=exact_first, exact_last=exact_last)
    assert_matches(b.run(num_splits=3, sinks=sinks, recent=table), want, TOL_FP32)


@pytest.mark.parametrize("rotated", [False, True])
def test_prefill_puts_held_tokens_over_the_dequantised_context(device, rotated, monkeypatch):
    """Chunks over contexts of 30, 0 and 60 tokens (the dense path: dequantise, substitute, attend), in the
    original basis or the rotated one: every held position of the window is exact, hole or not."""
    monkeypatch.setattr(prefill, "attends_rotated", lambda *sizes: rotated)
    b = make_batch(device, [30 + 9, 7, 60 + 20], [9, 7, 20], seed=15)
    table, exact_last = recent_for(b, device, seed=5)
    plan = plan_prefill(b.query_start_loc.cpu(), b.seq_lens.cpu(), b.block_table, 16, 0, 3, recent_tokens=W)
    assert [r.recent_rows.numel() if r.has_context else None for r in plan.runs] == [W, None, W]
    k, v, _ = exact_last
    ctx = (b.seq_lens - b.query_start_loc.diff()).cpu()
    held = torch.zeros_like(exact_last[2])
    for s in (0, 2):  # every position the table holds, hole or not
        for i in range(W):
            p = int(ctx[s]) - W + i
            slot = int(b.block_table[s, p // 16]) * 16 + p % 16
            held[s, i] = bool(table.tags[slot // 16 % table.entries, slot % 16, 0] == slot // 16)
    assert not held[2].all() and held[2, W - 8 :].all() and not exact_last[2][2, : W - 8].any()  # the hole
    out = torch.full_like(b.query, float("nan"))
    prefill_attention(b.codec, plan, b.query, b.key, b.value, b.cache, b.scale, out, recent=table)
    assert_matches(out, b.expected(exact_last=(k, v, held)), TOL_FP32)


@pytest.mark.gpu
def test_gpu_one_writer_per_row(cuda):
    """512 sequences whose new tokens all map to row (5, 3) write in one launch: the row holds one of them whole,
    and its tag names that one (the interpreter runs programs in order, so only a GPU can show a race)."""
    num_seqs, entries, heads = 512, 64, 8
    rot = rotation(cuda, 128)
    step = make_step(cuda, [(3, 1)] * num_seqs, [5 + entries * i for i in range(num_seqs)], kv_heads=heads,
                     head_dim=128, seed=2)  # fmt: skip
    table = RecentTable.allocate(entries, W, heads, 128, torch.bfloat16, cuda)
    for _ in range(3):
        write(table, rot, step)
        torch.cuda.synchronize()
        for h in range(heads):
            writer = (int(table.tags[5, 3, h]) - 5) // entries
            assert 0 <= writer < num_seqs and int(table.tags[5, 3, h]) == 5 + entries * writer
            for i, x in enumerate((step.key, step.value)):
                torch.testing.assert_close(table.kv[5, 3, i, h].float(), x[writer, h].float() @ rot.T, rtol=1e-2,
                                           atol=1e-2)  # fmt: skip


@pytest.mark.parametrize("in_reduce", [True, False], ids=["writer_in_reduce", "writer_launch"])
def test_reduce_launch_writes_the_window_as_write_recent_does(device, monkeypatch, in_reduce):
    """Tiles.window_writer_in_reduce: a split-K decode step told it is the window's last reader writes the same rows
    and tags from its reduce launch as write_recent would after it, after reading the old ones (the output is the
    reference's with the table as it was), and says so; unsplit, unflagged or not the last reader, it writes nothing."""
    tiles = dataclasses.replace(decode_tiles.TILES[64], window_writer_in_reduce=in_reduce)
    monkeypatch.setitem(decode_tiles.TILES, 64, tiles)
    b = decode_batch(device, seed=15)
    table, exact_last = recent_for(b, device, seed=8)
    want_table = RecentTable(table.kv.clone(), table.tags.clone(), table.recent_tokens)
    write_recent(want_table, b.codec.rotation, b.key, b.value, b.block_table, b.seq_lens, b.query_start_loc, 16)
    assert not torch.equal(want_table.tags, table.tags)  # the step's tokens change the table
    before = RecentTable(table.kv.clone(), table.tags.clone(), table.recent_tokens)
    out = torch.full_like(b.query, float("nan"))
    args = (b.codec, b.query, b.key, b.value, b.cache, b.block_table, b.seq_lens, b.query_start_loc, b.scale, out)
    for num_splits, last in ((1, True), (3, False)):  # no reduce launch; a prefill still to read
        assert not paged_attention(*args, max_query_len=2, num_splits=num_splits, recent=table, write_recent=last)
        assert torch.equal(table.tags, before.tags) and torch.equal(table.kv, before.kv)
    wrote = paged_attention(*args, max_query_len=2, num_splits=3, recent=table, write_recent=True)
    assert wrote == in_reduce
    assert_matches(out, b.expected(exact_last=exact_last), TOL_FP32)
    if in_reduce:
        assert torch.equal(table.tags, want_table.tags)
        # both launches rotate by the same helper, compiled into different kernels: on the H200 1.8% of the rows'
        # values differed in their last fp32 bit (4.8e-7, kernel_gpu_tests_h200_2026-12-03d.log); bit-equal on CPU
        exact = device.type == "cpu"
        torch.testing.assert_close(table.kv, want_table.kv, rtol=0 if exact else 1e-5, atol=0 if exact else 2e-6)
    else:
        assert torch.equal(table.tags, before.tags)


def decode_step(device, num_seqs: int, dtype=torch.float32, seed=9):
    """num_seqs sequences decoding one token each, at positions 3-40 of blocks of their own, and a padding row
    (slot -1) after them: the step (its K/V with the padding row) and the store's slots."""
    positions = torch.tensor([3 + 37 * s // max(num_seqs - 1, 1) for s in range(num_seqs)])
    first = 100 + 3 * torch.arange(num_seqs)
    step = make_step(device, [(int(p), 1) for p in positions], first.tolist(), seed=seed)
    step.block_table[:, 1:] = step.block_table[:, :1] + torch.arange(1, 3, dtype=torch.int32, device=device)
    slots = torch.cat([(first + positions // 16) * 16 + positions % 16, torch.tensor([-1])]).to(device)
    pad = torch.randn(1, *step.key.shape[1:], generator=torch.Generator().manual_seed(seed)).to(device)
    key, value = (torch.cat([x, pad]).to(dtype) for x in (step.key, step.value))
    return dataclasses.replace(step, key=key, value=value), slots


@pytest.mark.parametrize(("num_seqs", "dtype"), [(5, torch.float32), (40, torch.float32), (256, torch.bfloat16)],
                         ids=["one_token_programs", "four_token_programs", "prefill_sized_programs"])  # fmt: skip
@pytest.mark.parametrize("key_offset", [False, True])
def test_store_writes_the_window_as_write_recent_does(device, num_seqs, dtype, key_offset):
    """store_kv with recent (Tiles.window_writer_in_store) writes each token's R k and R v where write_recent would,
    with the same tags, from each of its launch shapes (the 256-token one rotates by tf32 parts), also for keys
    stored relative to an offset (the window keeps R k itself); the padding row writes nothing; the pages get the
    bytes of a store without the window."""
    step, slots = decode_step(device, num_seqs, dtype)
    codec = KVCodec(TQConfig(), 2, 64, device)
    offset = None
    if key_offset:  # an offset that part of the keys are shorter relative to
        offset = KeyOffset.build(step.key[0].float() / 2, codec.rotation)  # the first token's keys are shorter
        k = step.key[:num_seqs].float()
        shifted = (k - offset.original).norm(dim=-1) < k.norm(dim=-1)
        assert 0 < int(shifted.sum()) < shifted.numel()
    table = RecentTable.allocate(1024, W, 2, 64, dtype, device)  # no two of the step's tokens share a row
    want = RecentTable(table.kv.clone(), table.tags.clone(), W)
    write_recent(want, codec.rotation, step.key, step.value, step.block_table, step.seq_lens, step.query_start_loc, 16)
    cache, plain = (codec.new_cache(1000, 16) for _ in range(2))
    store_kv(codec, step.key, step.value, cache, slots, offset, after_attention=True, recent=table)
    store_kv(codec, step.key, step.value, plain, slots, offset)
    assert torch.equal(cache, plain)
    assert torch.equal(table.tags, want.tags) and int(table.tags.ge(0).sum()) == 2 * num_seqs
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(table.kv, want.kv, rtol=tol, atol=tol)


def test_store_ahead_of_the_attention_refuses_the_window(device):
    step, slots = decode_step(device, 2)
    codec = KVCodec(TQConfig(), 2, 64, device)
    table = RecentTable.allocate(64, W, 2, 64, torch.float32, device)
    with pytest.raises(AssertionError, match="after the step's attention"):
        store_kv(codec, step.key, step.value, codec.new_cache(200, 16), slots, recent=table)


@pytest.mark.parametrize(("num_splits", "store_in_launch"), [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("in_store", [True, False])
def test_decode_step_store_writes_the_window_after_the_attention(device, monkeypatch, num_splits, store_in_launch,
                                                                 in_store):  # fmt: skip
    """paged_attention with store_slots, told it is the window's last reader: its store after the attention writes
    the new tokens' rows (Tiles.window_writer_in_store; a store the attention launch would make moves after it), so
    the output is the reference's over the table as it was, the table becomes write_recent's and the pages
    store_kv's, and it says so; switched off, or with more query rows a sequence than the window holds, it stores
    the pages and leaves the window to the caller."""
    tiles = dataclasses.replace(decode_tiles.TILES[64], window_writer_in_store=in_store,
                                fused_store_min_splits=2 if store_in_launch else None)  # fmt: skip
    monkeypatch.setitem(decode_tiles.TILES, 64, tiles)
    b = make_batch(device, [1, 6, 25, 32, 151], [1, 1, 1, 1, 1], seed=16)
    table, exact_last = recent_for(b, device, seed=9)
    want_table = RecentTable(table.kv.clone(), table.tags.clone(), table.recent_tokens)
    write_recent(want_table, b.codec.rotation, b.key, b.value, b.block_table, b.seq_lens, b.query_start_loc, 16)
    assert not torch.equal(want_table.tags, table.tags)  # the step's tokens change the table
    before = RecentTable(table.kv.clone(), table.tags.clone(), table.recent_tokens)
    pos = (b.seq_lens - 1).long()
    slots = b.block_table.gather(1, (pos // 16)[:, None])[:, 0].long() * 16 + pos % 16
    poisoned = b.cache.clone()
    want_cache = b.cache.clone()
    store_kv(b.codec, b.key, b.value, want_cache, slots)
    out = torch.full_like(b.query, float("nan"))
    args = (b.codec, b.query, b.key, b.value, b.cache, b.block_table, b.seq_lens, b.query_start_loc, b.scale, out)
    wrote = paged_attention(*args, max_query_len=1, num_splits=num_splits, store_slots=slots, recent=table,
                            write_recent=True)  # fmt: skip
    assert wrote == in_store
    assert_matches(out, b.expected(exact_last=exact_last), TOL_FP32)
    assert torch.equal(b.cache, want_cache)
    if in_store:
        assert torch.equal(table.tags, want_table.tags)
        torch.testing.assert_close(table.kv, want_table.kv, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(table.tags, before.tags) and torch.equal(table.kv, before.kv)
    table.kv.copy_(before.kv)
    table.tags.copy_(before.tags)
    b.cache.copy_(poisoned)
    assert not paged_attention(*args, max_query_len=W + 1, num_splits=num_splits, store_slots=slots, recent=table,
                               write_recent=True)  # fmt: skip
    assert torch.equal(table.tags, before.tags) and torch.equal(b.cache, want_cache)


@pytest.mark.parametrize("num_tokens", [40, 300], ids=["four_token_programs", "prefill_sized_programs"])
def test_store_one_writer_per_row(device, num_tokens):
    """A store launch whose tokens all map to row (5, 3), across programs and within one (4 and 32 tokens a program):
    the row holds one of them whole, and its tag names that one. Only a GPU can race (the interpreter runs programs
    in order, and a vector's lanes one by one); there the shapes are the Llama-3.1-8B layer's."""
    entries = 64
    heads, head_dim = (8, 128) if device.type == "cuda" else (2, 64)
    codec = KVCodec(TQConfig(), heads, head_dim, device)
    g = torch.Generator().manual_seed(4)
    key, value = (torch.randn(num_tokens, heads, head_dim, generator=g).to(device, torch.bfloat16) for _ in range(2))
    slots = (5 + entries * torch.arange(num_tokens)) * 16 + 3
    cache = codec.new_cache(int(slots.max()) // 16 + 1, 16)
    table = RecentTable.allocate(entries, W, heads, head_dim, torch.bfloat16, device)
    for _ in range(3):
        store_kv(codec, key, value, cache, slots.to(device), after_attention=True, recent=table)
        assert int(table.tags.ge(0).sum()) == heads
        for h in range(heads):
            writer = (int(table.tags[5, 3, h]) - 5) // entries
            assert 0 <= writer < num_tokens and int(table.tags[5, 3, h]) == 5 + entries * writer
            for i, x in enumerate((key, value)):
                torch.testing.assert_close(table.kv[5, 3, i, h].float(), x[writer, h].float() @ codec.rotation.T,
                                           rtol=1e-2, atol=1e-2)  # fmt: skip
