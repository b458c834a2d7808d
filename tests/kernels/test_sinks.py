"""Exact sinks (kernels/sinks.py): the writer's rows and tags, and the attention and prefill paths that read them,
against paged_attention_ref with the held positions' exact K/V."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from decode_batch import TOL_FP32, assert_matches, make_batch

from turboquant_vllm.kernels import decode_tiles
from turboquant_vllm.kernels import sinks as sinks_module
from turboquant_vllm.kernels.reference import paged_attention_ref
from turboquant_vllm.kernels.sinks import SinkTable, table_entries, write_sinks
from turboquant_vllm.rotation import haar_rotation
from turboquant_vllm.vllm import prefill
from turboquant_vllm.vllm.prefill import plan_prefill, prefill_attention

S = 4  # sink tokens in these tests


@dataclasses.dataclass
class Step:
    """A writer launch: sequences with (context, new tokens), their first blocks, and the new tokens' K/V."""

    key: torch.Tensor
    value: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor


def make_step(device, lengths: list[tuple[int, int]], first_blocks: list[int], kv_heads=2, head_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(q for _, q in lengths)
    key = torch.randn(tokens, kv_heads, head_dim, generator=g)
    value = torch.randn(tokens, kv_heads, head_dim, generator=g)
    block_table = torch.tensor(first_blocks, dtype=torch.int32)[:, None].repeat(1, 3)
    block_table[:, 1:] = 10_000  # later blocks: never read by the writer
    seq_lens = torch.tensor([c + q for c, q in lengths], dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor([q for _, q in lengths]).cumsum(0).tolist()], dtype=torch.int32)
    return Step(*(t.to(device) for t in (key, value, block_table, seq_lens, qsl)))


def write(table: SinkTable, rotation: torch.Tensor, step: Step) -> None:
    write_sinks(table, rotation, step.key, step.value, step.block_table, step.seq_lens, step.query_start_loc)


def new_table(device, entries=64, kv_heads=2, head_dim=64) -> SinkTable:
    return SinkTable.allocate(entries, S, kv_heads, head_dim, torch.float32, device)


def rotation(device, head_dim=64) -> torch.Tensor:
    return haar_rotation(5, head_dim).float().to(device)


def test_writer_stores_rotated_rows_of_sink_positions_only(device):
    """Prompts longer and shorter than S, a token arriving at position 2 and 3 by decode, a sequence past its sinks
    and a padding sequence (no query rows): only positions below S are written, as x @ R.T, tagged with the
    sequence's first block."""
    rot = rotation(device)
    lengths = [(0, 6), (2, 1), (0, 1), (5, 1), (1, 3), (0, 0)]
    firsts = [7, 8, 9, 10, 11, 12]
    step = make_step(device, lengths, firsts)
    table = new_table(device)
    write(table, rot, step)
    want_rows = torch.zeros_like(table.kv)
    want_tags = torch.full_like(table.tags, -1)
    starts = step.query_start_loc.tolist()
    for s, ((ctx, q_len), block) in enumerate(zip(lengths, firsts, strict=True)):
        for pos in range(ctx, min(ctx + q_len, S)):
            tok = starts[s] + pos - ctx
            want_rows[block, pos, 0] = step.key[tok] @ rot.T
            want_rows[block, pos, 1] = step.value[tok] @ rot.T
            want_tags[block, pos] = block
    assert torch.equal(table.tags, want_tags)
    torch.testing.assert_close(table.kv, want_rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [64, 2])
def test_last_sequence_of_a_launch_writes_a_shared_entry(device, monkeypatch, scan):
    """First blocks 3, 67 and 131 share entry 3 of 64: each (entry, position) holds the row and tag of the last
    sequence that writes it in the launch, never a mix (scan=2: the writer checks later sequences in steps)."""
    monkeypatch.setattr(sinks_module, "SCAN", scan)
    rot = rotation(device)
    lengths = [(0, 5), (1, 1), (0, 9), (2, 1), (3, 1)]
    firsts = [3, 67, 20, 131, 40]
    step = make_step(device, lengths, firsts, seed=1)
    table = new_table(device)
    write(table, rot, step)
    owner = {0: 0, 1: 1, 2: 3, 3: 0}  # entry 3's positions: seq 0 wrote all four, seq 1 then pos 1, seq 3 pos 2
    for pos, s in owner.items():
        tok = step.query_start_loc[s].item() + pos - lengths[s][0]
        assert table.tags[3, pos].item() == firsts[s]
        torch.testing.assert_close(table.kv[3, pos, 0], step.key[tok] @ rot.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(table.kv[3, pos, 1], step.value[tok] @ rot.T, rtol=1e-5, atol=1e-5)
    assert table.tags[20].tolist() == [20] * S and table.tags[40].tolist() == [-1, -1, -1, 40]


def test_table_entries_and_bad_sizes():
    assert table_entries(1) == sinks_module.MIN_ENTRIES and table_entries(256) == 1024
    with pytest.raises(AssertionError, match="power of two"):
        SinkTable.allocate(48, S, 2, 64, torch.float32, "cpu")
    with pytest.raises(AssertionError, match="sink_tokens"):
        SinkTable.allocate(64, 17, 2, 64, torch.float32, "cpu")


def sinks_for(batch, device, seed=3):
    """A table filled by a writer step that put random exact K/V at positions 0..S-1 of every sequence, then a step
    in which block first + entries (another sequence) took position 1 of sequence 0's entry.

    Returns the table and paged_attention_ref's exact_first (the rows, and which of them the table holds)."""
    num_seqs = batch.seq_lens.shape[0]
    kv_heads, head_dim = batch.key.shape[1:]
    g = torch.Generator().manual_seed(seed)
    exact_k = torch.randn(num_seqs, S, kv_heads, head_dim, generator=g) * 1.5
    exact_v = torch.randn(num_seqs, S, kv_heads, head_dim, generator=g)
    table = SinkTable.allocate(16, S, kv_heads, head_dim, torch.float32, device)
    qsl = torch.arange(0, (num_seqs + 1) * S, S, dtype=torch.int32, device=device)
    full = torch.full((num_seqs,), S, dtype=torch.int32, device=device)
    write_sinks(table, batch.codec.rotation, exact_k.flatten(0, 1).to(device), exact_v.flatten(0, 1).to(device),
                batch.block_table, full, qsl)  # fmt: skip
    first = batch.block_table[:, 0].long().cpu()
    thief = torch.tensor([[first[0] + table.entries]], dtype=torch.int32, device=device)
    write_sinks(table, batch.codec.rotation, exact_k[0, :1].to(device), exact_v[0, :1].to(device), thief,
                torch.tensor([2], dtype=torch.int32, device=device),
                torch.tensor([0, 1], dtype=torch.int32, device=device))  # fmt: skip
    held = torch.ones(num_seqs, S, dtype=torch.bool)
    entry = first % table.entries
    for s in range(num_seqs):  # a later sequence of the first step with the same entry took its rows
        if (entry[s + 1 :] == entry[s]).any():
            held[s] = False
        if entry[s] == entry[0]:
            held[s, 1] = False
    return table, (exact_k, exact_v, held)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_attention_reads_held_sinks_in_place_of_their_pages(device, monkeypatch, num_splits, swap_ab):
    """Contexts of 0, 1, 3, 5 and 150 tokens (positions at or past a context's end are never read from the table,
    though the writer step filled them), a query of two tokens, a lost position: fp32 against the reference."""
    monkeypatch.setitem(decode_tiles.TILES, 64, dataclasses.replace(decode_tiles.TILES[64], swap_ab=swap_ab))
    b = make_batch(device, [1, 2, 4, 6, 152, 100], [1, 1, 1, 1, 2, 1], seed=12)
    table, exact_first = sinks_for(b, device)
    assert not exact_first[2].all() and exact_first[2][4].all()
    want = paged_attention_ref(b.ref_codec, b.query.cpu(), b.key.cpu(), b.value.cpu(), b.cache.cpu(),
                               b.block_table.cpu(), b.seq_lens.cpu(), b.query_start_loc.cpu(), b.scale,
                               exact_first=exact_first)  # fmt: skip
    without = b.expected()
    assert (want - without).abs().max() > 0.05 * want.abs().max()  # the sinks change the answer
    assert_matches(b.run(num_splits=num_splits, sinks=table), want, TOL_FP32)


def test_attention_without_prefetch_reads_the_same_sinks(device, monkeypatch):
    monkeypatch.setitem(decode_tiles.TILES, 64, dataclasses.replace(decode_tiles.TILES[64], prefetch=False))
    b = make_batch(device, [5, 90], [1, 1], seed=13)
    table, exact_first = sinks_for(b, device, seed=4)
    want = paged_attention_ref(b.ref_codec, b.query.cpu(), b.key.cpu(), b.value.cpu(), b.cache.cpu(),
                               b.block_table.cpu(), b.seq_lens.cpu(), b.query_start_loc.cpu(), b.scale,
                               exact_first=exact_first)  # fmt: skip
    assert_matches(b.run(num_splits=2, sinks=table), want, TOL_FP32)


@pytest.mark.parametrize("rotated", [False, True])
def test_prefill_puts_held_sinks_over_the_dequantised_context(device, rotated, monkeypatch):
    """Chunks over contexts of 2, 0 and 40 tokens (the dense path: dequantise, substitute, attend), attending in
    the original basis or the rotated one."""
    monkeypatch.setattr(prefill, "attends_rotated", lambda *sizes: rotated)
    b = make_batch(device, [2 + 9, 7, 40 + 20], [9, 7, 20], seed=14)
    table, exact_first = sinks_for(b, device, seed=5)
    plan = plan_prefill(b.query_start_loc.cpu(), b.seq_lens.cpu(), b.block_table, 16, 0, 3, sink_tokens=S)
    assert [r.sink_pos.tolist() if r.has_context else None for r in plan.runs] == [[0, 1], None, [0, 1, 2, 3]]
    out = torch.full_like(b.query, float("nan"))
    prefill_attention(b.codec, plan, b.query, b.key, b.value, b.cache, b.scale, out, sinks=table)
    want = paged_attention_ref(b.ref_codec, b.query.cpu(), b.key.cpu(), b.value.cpu(), b.cache.cpu(),
                               b.block_table.cpu(), b.seq_lens.cpu(), b.query_start_loc.cpu(), b.scale,
                               exact_first=exact_first)  # fmt: skip
    assert_matches(out, want, TOL_FP32)


@pytest.mark.gpu
def test_gpu_one_writer_per_shared_entry(cuda):
    """512 sequences whose first blocks all share entry 5 write positions 0..3 in one launch: every row and tag
    is the last sequence's (the interpreter runs programs in order, so only a GPU can show a race)."""
    num_seqs, entries = 512, 64
    rot = rotation(cuda, 128)
    step = make_step(cuda, [(0, 4)] * num_seqs, [5 + entries * i for i in range(num_seqs)], kv_heads=8,
                     head_dim=128, seed=2)  # fmt: skip
    table = SinkTable.allocate(entries, S, 8, 128, torch.bfloat16, cuda)
    for _ in range(3):
        write(table, rot, step)
        torch.cuda.synchronize()
        assert table.tags[5].tolist() == [5 + entries * (num_seqs - 1)] * S
        last = step.key[-S:].float() @ rot.T
        torch.testing.assert_close(table.kv[5, :, 0].float(), last, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(table.kv[5, :, 1].float(), step.value[-S:].float() @ rot.T, rtol=1e-2, atol=1e-2)
