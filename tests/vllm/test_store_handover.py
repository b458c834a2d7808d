"""Which launch stores a step's K/V: do_kv_cache_update's, or forward's paged_attention in or after its attention
launch (TQ4Metadata.fused_store_tokens), with the same pages and output either way."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from layer_steps import cache_with_context, common_metadata, make_builder

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.config import TQConfig
from turboquant_vllm.eval.vllm_batches import SCENARIOS, make_batch
from turboquant_vllm.kernels import decode_tiles
from turboquant_vllm.kernels.reference import decode_rows_ref, gather_rows_ref, scatter_rows_ref
from turboquant_vllm.kernels.store import store_kv
from turboquant_vllm.vllm import backend as tq_backend
from turboquant_vllm.vllm.backend import TQ4AttentionImpl


@pytest.mark.parametrize("attn_metadata", [None, {}, [{}]])
def test_kv_update_stores_every_token_without_metadata_for_its_layer(attn_metadata, monkeypatch, device):
    """vLLM's dummy and capture-warm-up runs call do_kv_cache_update in a forward context whose attn_metadata is
    None (or holds no entry for the layer): every token is then stored by the store launch, none left to forward."""
    head_dim, layer = 64, SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: TQConfig())
    monkeypatch.setattr("vllm.forward_context.is_forward_context_available", lambda: True)
    context = SimpleNamespace(attn_metadata=attn_metadata)
    monkeypatch.setattr("vllm.forward_context.get_forward_context", lambda: context)
    stored = []
    monkeypatch.setattr(tq_backend, "store_kv", lambda *a, **k: stored.append(a[4].shape[0]))
    batch = make_batch(SCENARIOS["decode"], 8, 2, head_dim, seed=6, device=device)
    cache = KVCodec(TQConfig(), 2, head_dim, device).new_cache(batch.num_blocks, batch.block_size)
    TQ4AttentionImpl(8, head_dim, head_dim**-0.5, 2).do_kv_cache_update(layer, batch.key, batch.value, cache,
                                                                        batch.slot_mapping)  # fmt: skip
    assert stored == [batch.slot_mapping.shape[0]]


@pytest.mark.parametrize("in_kernel", [True, False])
@pytest.mark.parametrize("scenario", ["decode", "mixed"])
def test_fused_store_writes_the_same_pages_and_output(scenario, in_kernel, monkeypatch, device):
    """fused_store_tokens: do_kv_cache_update leaves the decode tokens (found in vLLM's forward context) to
    forward's paged_attention, which stores them in its attention launch (in_kernel, Tiles.fused_store_min_splits)
    or in a store launch after it; the pages and the output equal those of the separate store (within rounding on
    a mixed step's decode rows, see below)."""
    cfg = TQConfig()
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: cfg)
    tiles = dataclasses.replace(decode_tiles.TILES[64], fused_store_min_splits=2 if in_kernel else None)
    monkeypatch.setitem(decode_tiles.TILES, 64, tiles)
    head_dim, layer = 64, SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    batch = make_batch(SCENARIOS[scenario], 8, 2, head_dim, seed=5, device=device)
    codec = KVCodec(cfg, 2, head_dim, device)
    built = make_builder(8, 2, head_dim, device).build(0, common_metadata(batch))
    context = SimpleNamespace()
    monkeypatch.setattr("vllm.forward_context.is_forward_context_available", lambda: True)
    monkeypatch.setattr("vllm.forward_context.get_forward_context", lambda: context)
    results, stored = [], []
    for fused in (False, True):
        md = dataclasses.replace(built, fused_store_tokens=built.num_decode_tokens if fused else 0)
        context.attn_metadata = {layer.layer_name: md}
        monkeypatch.setattr(tq_backend, "store_kv", lambda *a, **k: (stored.append(a[4].shape[0]), store_kv(*a, **k)))
        cache = cache_with_context(codec, batch)
        impl = TQ4AttentionImpl(8, head_dim, head_dim**-0.5, 2)
        out = torch.zeros(batch.query.shape, dtype=batch.query.dtype, device=device)
        impl.do_kv_cache_update(layer, batch.key, batch.value, cache, batch.slot_mapping)
        impl.forward(layer, batch.query, batch.key, batch.value, cache, md, out)
        results.append((cache, out))
    num_tokens, num_decode = batch.slot_mapping.shape[0], md.num_decode_tokens
    assert stored == [num_tokens, num_tokens - num_decode]
    assert md.num_splits > 1 and decode_tiles.stores_in_attention(64, md.num_splits) == in_kernel
    # The decode tokens came from two store paths: a one-token program (the attention launch) and, in the separate
    # store of this mixed step's 51 tokens, four-token programs. Their fp32 sums differ in order, so on
    # the GPU a coordinate within rounding of a codebook boundary may take the neighbouring index, and the norm
    # correction's scale moves with it. A token's bytes are spread over its page (layout.py): they are gathered
    # through the reference's view of the layout. Every other byte of the cache must be identical.
    (separate, _), (fused, _) = results
    decode_slots = batch.slot_mapping[:num_decode]
    rows = [gather_rows_ref(codec, cache, decode_slots) for cache in (separate, fused)]
    if scenario == "decode":
        assert torch.equal(*rows)
    for want, got in zip(*(decode_rows_ref(codec, r) for r in rows), strict=True):  # K, then V
        flipped = (want.indices != got.indices).float().mean().item()
        assert flipped <= 0.01, f"{flipped:.2%} of the decode tokens' indices differ"
        torch.testing.assert_close(got.scales, want.scales, rtol=1e-2, atol=0)
    scatter_rows_ref(codec, fused, decode_slots, rows[0])
    assert torch.equal(separate, fused)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("min_splits", "pdl"), [(None, False), (2, False), (None, True)])
def test_builder_fuses_the_store_where_the_tiles_say(min_splits, pdl, monkeypatch, device):
    """The builder hands the decode tokens' store to paged_attention exactly when its split count reaches
    Tiles.fused_store_min_splits or launches use programmatic dependent launch (kernels/pdl.py), and only in pure
    decode steps (a mixed step's store keeps one launch)."""
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: TQConfig())
    monkeypatch.setattr(tq_backend, "pdl_launch", lambda device: pdl)
    tiles = dataclasses.replace(decode_tiles.TILES[64], fused_store_min_splits=min_splits)
    monkeypatch.setitem(decode_tiles.TILES, 64, tiles)
    for scenario in ("decode", "mixed"):
        batch = make_batch(SCENARIOS[scenario], 8, 2, 64, seed=5, device=device)
        md = make_builder(8, 2, 64, device).build(0, common_metadata(batch))
        assert md.num_splits > 1 and md.num_decodes
        handed = (min_splits or pdl) and scenario == "decode"
        assert md.fused_store_tokens == (md.num_decode_tokens if handed else 0)
        assert (md.num_decode_tokens == batch.slot_mapping.shape[0]) == (scenario == "decode")


@pytest.mark.parametrize("in_store", [True, False])
def test_builder_hands_the_store_over_where_it_writes_the_window(in_store, monkeypatch, device):
    """Without PDL or a store in the attention launch, a pure decode step still hands its store to paged_attention
    when the layer keeps an exact window and Tiles.window_writer_in_store lets that store write it."""
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: TQConfig(recent_tokens=8))
    monkeypatch.setattr(tq_backend, "pdl_launch", lambda device: False)
    tiles = dataclasses.replace(decode_tiles.TILES[64], fused_store_min_splits=None, window_writer_in_store=in_store)
    monkeypatch.setitem(decode_tiles.TILES, 64, tiles)
    for scenario in ("decode", "mixed"):
        batch = make_batch(SCENARIOS[scenario], 8, 2, 64, seed=5, device=device)
        md = make_builder(8, 2, 64, device).build(0, common_metadata(batch))
        handed = in_store and scenario == "decode"
        assert md.fused_store_tokens == (md.num_decode_tokens if handed else 0)
