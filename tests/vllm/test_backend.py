"""TQ4 backend: selection-time refusals, builder routing, and layer outputs against references."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from layer_steps import cache_with_context, common_metadata, make_builder

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.config import TQConfig, TQConfigError
from turboquant_vllm.eval.vllm_batches import SCENARIOS, exact_attention, make_batch
from turboquant_vllm.kernels.recent import write_recent
from turboquant_vllm.kernels.reference import (
    decode_rows_ref,
    gather_rows_ref,
    paged_attention_ref,
    store_ref,
)
from turboquant_vllm.vllm import backend as tq_backend
from turboquant_vllm.vllm import prefill as prefill_module
from turboquant_vllm.vllm.backend import TQ4AttentionBackend, TQ4AttentionImpl
from turboquant_vllm.vllm.spec import TQ4FullAttentionSpec

VALID = dict(
    head_size=128,
    dtype=torch.bfloat16,
    kv_cache_dtype="auto",
    block_size=None,
    use_mla=False,
    has_sink=False,
    use_sparse=False,
    use_mm_prefix=False,
    use_per_head_quant_scales=False,
    device_capability=None,
    attn_type="decoder",
)


def reasons(**changes) -> list[str]:
    return TQ4AttentionBackend.validate_configuration(**{**VALID, **changes})


def test_valid_configuration_has_no_reasons():
    assert reasons() == []
    assert reasons(head_size=64) == [] and reasons(head_size=256) == []


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"head_size": 100}, "head_dim=100"),
        ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype fp8"),
        ({"use_mla": True}, "MLA"),
        ({"has_sink": True}, "sink"),
        ({"has_sliding_window": True}, "sliding window"),
        ({"attn_type": "encoder_decoder"}, "encoder_decoder"),
        ({"dtype": torch.float32}, "dtype"),
    ],
)
def test_bad_configurations_are_refused_at_selection(change, needle):
    found = reasons(**change)
    assert found and any(needle in r for r in found), found


def test_kv_cache_shape_follows_the_layout(monkeypatch):
    assert TQ4AttentionBackend.get_kv_cache_shape(10, 16, 8, 128) == (10, 16, 1088)
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: TQConfig(k_bits=3, v_bits=3))
    assert TQ4AttentionBackend.get_kv_cache_shape(10, 16, 8, 128) == (10, 16, 8 * (48 + 4) * 2)
    with pytest.raises(NotImplementedError):
        TQ4AttentionBackend.get_kv_cache_stride_order()
    try:
        from vllm.v1.kv_cache_layout import KVCacheLayout  # vLLM >= 0.29 asks the backend for its layouts
    except ImportError:
        return
    layouts = TQ4AttentionBackend.supported_kv_cache_layouts()
    assert KVCacheLayout.LBHNC in layouts and all(layout.value[0] == 0 for layout in layouts)  # layer outermost


def test_spec_describes_one_head_slot_holding_the_packed_row():
    """vLLM >= 0.28 sizes pages, and from 0.29 shapes each layer's cache view, from num_head_slots and
    state_content_bytes where its spec has them; on older vLLM the spec has neither and real_page_size_bytes rules."""
    spec = TQ4FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.uint8, bytes_per_token=1088)
    assert spec.page_size_bytes == 16 * 1088
    # vLLM >= 0.31 passes the spec when it picks a kernel block size
    assert [size.base for size in TQ4AttentionBackend.get_supported_kernel_block_sizes(spec)] == [16]
    if hasattr(spec, "state_content_bytes"):
        assert (spec.num_head_slots, spec.state_content_bytes) == (1, 1088)
        assert spec.copy_with_new_block_size(32).state_content_bytes == 1088


def test_layer_takes_the_four_dim_cache_view_of_newer_vllm(monkeypatch, device):
    """A [blocks, 1, block_size, bytes] view (vLLM >= 0.29) gets the same pages and output as get_kv_cache_shape's
    [blocks, block_size, bytes] cache; a view with more than one head slot is refused, not misread."""
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: TQConfig())
    head_dim = 64
    batch = make_batch(SCENARIOS["mixed"], 8, 2, head_dim, seed=3, device=device, dtype=torch.float32)
    codec = KVCodec(TQConfig(), 2, head_dim, device)
    md = make_builder(8, 2, head_dim, device).build(0, common_metadata(batch))
    impl = TQ4AttentionImpl(8, head_dim, head_dim**-0.5, 2)
    results = []
    for view in (lambda c: c, lambda c: c.unsqueeze(1)):
        cache = cache_with_context(codec, batch)
        out = torch.zeros(batch.query.shape, dtype=batch.query.dtype, device=device)
        impl.do_kv_cache_update(None, batch.key, batch.value, view(cache), batch.slot_mapping)
        impl.forward(None, batch.query, batch.key, batch.value, view(cache), md, out)
        results.append((cache, out))
    (cache3, out3), (cache4, out4) = results
    assert torch.equal(cache3, cache4) and torch.equal(out3, out4)
    assert out3.abs().sum() > 0
    two_slots = cache3.view(cache3.shape[0], 2, cache3.shape[1], -1)
    with pytest.raises(ValueError, match="blocks, 1, block_size, bytes"):
        impl.forward(None, batch.query, batch.key, batch.value, two_slots, md, out3)


def test_newer_vllm_cache_views_are_kernel_pages():
    """vLLM >= 0.29 allocates caches itself and views each layer by the spec and a layout the backend supports:
    every such view must become the contiguous [blocks, block_size, bytes_per_token] pages of its own layer."""
    pytest.importorskip("vllm.v1.kv_cache_layout", reason="vLLM < 0.29 shapes caches by get_kv_cache_shape")
    from vllm.v1.kv_cache_interface import KVCacheTensor, create_kv_cache_views

    spec = TQ4FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.uint8, bytes_per_token=144)
    num_blocks, layers, page = 5, ["l0", "l1"], spec.page_size_bytes
    raw = torch.zeros(page * num_blocks * len(layers), dtype=torch.int8)
    for layout in TQ4AttentionBackend.supported_kv_cache_layouts():
        placement = KVCacheTensor(size=raw.numel(), layers=layers, layer_stride=page * num_blocks, block_stride=page)
        for i, view in enumerate(create_kv_cache_views(raw, spec, num_blocks, layout, placement)):
            pages = tq_backend.packed_pages(view)
            assert pages.shape == (num_blocks, 16, 144) and pages.is_contiguous(), (layout, view.stride())
            assert pages.data_ptr() == raw.data_ptr() + i * page * num_blocks


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"logits_soft_cap": 30.0}, "soft-capping"),
        ({"sliding_window": 4096}, "sliding-window"),
        ({"alibi_slopes": [0.5] * 8}, "ALiBi"),
        ({"sinks": torch.zeros(8)}, "sinks"),
        ({"attn_type": "encoder"}, "encoder attention"),
        ({"kv_sharing_target_layer_name": "layers.0.attn"}, "KV sharing"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype=fp8"),
    ],
)
def test_impl_refuses_unsupported_features(kwargs, needle):
    with pytest.raises(TQConfigError, match=needle):
        TQ4AttentionImpl(8, 128, 0.088, 2, **kwargs)


def test_builder_routes_decodes_to_the_kernel_and_chunks_to_prefill():
    builder = make_builder(8, 2, 64)
    decode = builder.build(0, common_metadata(make_batch(SCENARIOS["decode"], 8, 2, 64)))
    assert decode.num_splits > 1 and decode.workspace is builder.workspace and decode.prefill is None
    assert decode.num_decodes == 4 and decode.num_decode_tokens == 4
    mixed = builder.build(0, common_metadata(make_batch(SCENARIOS["mixed"], 8, 2, 64)))
    assert (mixed.num_decodes, mixed.num_decode_tokens, mixed.max_query_len) == (2, 2, 1)
    # Requests (0, 40) and (31, 9): a run without context (its own 40 rows) and one reading 31 + 9 buffer rows.
    new_prompt, chunk = mixed.prefill.runs
    assert (new_prompt.q_lo, new_prompt.num_tokens, new_prompt.cu_k_host) == (2, 40, [0, 40])
    assert not new_prompt.has_context
    assert new_prompt.slots is None and new_prompt.new_rows is None
    assert (chunk.q_lo, chunk.num_tokens, chunk.cu_k_host, chunk.context_rows) == (42, 9, [0, 40], 31)
    assert (chunk.slots[:31] >= 0).all() and (chunk.slots[31:] == -1).all()
    assert chunk.new_rows.tolist() == list(range(31, 40)) and mixed.prefill.has_context
    prefill = builder.build(0, common_metadata(make_batch(SCENARIOS["prefill"], 8, 2, 64)))
    assert prefill.num_decodes == 0 and not prefill.prefill.has_context and len(prefill.prefill.runs) == 1
    big = make_batch([(3, 1)] * (tq_backend.MAX_SPLIT_TOKENS + 1), 8, 2, 64)
    assert builder.build(0, common_metadata(big)).num_splits == 1


def test_prefill_plan_groups_requests_into_runs_by_context():
    """New prompts and continuing chunks alternate: each maximal run is one FlashAttention call, and only runs
    with context get a buffer."""
    batch = make_batch([(3, 1), (0, 5), (0, 2), (20, 4), (7, 3), (0, 6)], 8, 2, 64)
    plan = make_builder(8, 2, 64).build(0, common_metadata(batch)).prefill
    assert [(r.q_lo, r.num_tokens, r.has_context) for r in plan.runs] == [(1, 7, False), (8, 7, True), (15, 6, False)]
    middle = plan.runs[1]
    assert middle.cu_q_host == [0, 4, 7] and middle.cu_k_host == [0, 24, 34] and middle.max_k == 24
    assert middle.new_rows.tolist() == [20, 21, 22, 23, 31, 32, 33]
    assert torch.equal(middle.slots[:20], batch.context_slots[3]) and torch.equal(middle.slots[24:31],
                                                                                  batch.context_slots[4])  # fmt: skip


@pytest.mark.parametrize(
    ("num_tokens", "context_rows", "rotated"),
    [(100, 32768, True), (16384, 16384, False), (1000, 4999, False), (1000, 5001, True)],
)
def test_chunks_far_shorter_than_their_context_attend_rotated(num_tokens, context_rows, rotated):
    """32 query and 8 KV heads: a chunk rotates 40 head rows a token, against 8 a context token un-rotated."""
    assert prefill_module.attends_rotated(num_tokens, context_rows, 32, 8) is rotated


def test_prefill_plan_reads_vllms_host_seq_lens_when_given():
    """vLLM's host copy of seq_lens is used, so a mixed step plans its prefills without a device sync."""
    builder = make_builder(8, 2, 64)
    cam = common_metadata(make_batch(SCENARIOS["mixed"], 8, 2, 64))
    expected = builder.build(0, cam).prefill
    host = cam.seq_lens.cpu().clone()
    poisoned = cam.replace(seq_lens=torch.full_like(cam.seq_lens, 10**6), seq_lens_cpu_upper_bound=host)
    plan = builder.build(0, poisoned).prefill
    assert [r.cu_k_host for r in plan.runs] == [r.cu_k_host for r in expected.runs]
    assert torch.equal(plan.runs[1].slots, expected.runs[1].slots)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def fail_if_called(*args, **kwargs):
    raise AssertionError("kernel must not run here")


def test_profiling_run_launches_no_kernel(monkeypatch):
    monkeypatch.setattr(tq_backend, "paged_attention", fail_if_called)
    impl = TQ4AttentionImpl(8, 64, 0.125, 2)
    out = torch.full((5, 8, 64), 7.0)
    impl.forward(None, torch.ones(5, 8, 64), torch.ones(5, 2, 64), torch.ones(5, 2, 64), torch.empty(0), None, out)
    assert torch.equal(out, torch.zeros_like(out))


def test_forward_sends_decodes_to_the_kernel_and_chunks_to_prefill(monkeypatch):
    attention, store, prefill = Recorder(), Recorder(), Recorder()
    monkeypatch.setattr(tq_backend, "paged_attention", attention)
    monkeypatch.setattr(tq_backend, "store_kv", store)
    monkeypatch.setattr(tq_backend, "prefill_attention", prefill)
    batch = make_batch(SCENARIOS["mixed"], 8, 2, 64)
    md = make_builder(8, 2, 64).build(0, common_metadata(batch))
    impl = TQ4AttentionImpl(8, 64, 0.125, 2)
    cache = torch.zeros(batch.num_blocks, 16, 64, dtype=torch.uint8)
    padded = torch.cat([batch.query, torch.zeros(3, 8, 64, dtype=batch.query.dtype)])
    out = torch.zeros(padded.shape, dtype=padded.dtype)
    impl.do_kv_cache_update(None, batch.key, batch.value, cache, batch.slot_mapping)
    impl.forward(None, padded, batch.key, batch.value, cache, md, out)
    assert len(store.calls) == 1 and store.calls[0][0][4] is batch.slot_mapping
    assert len(attention.calls) == 1 and len(prefill.calls) == 1
    args, kwargs = attention.calls[0]
    assert args[1].shape[0] == 2 and kwargs["query_start_loc"].shape[0] == 3  # the two decodes only
    assert kwargs["max_query_len"] == 1 and kwargs["out"].data_ptr() == out.data_ptr()
    args = prefill.calls[0][0]
    assert args[1] is md.prefill and args[7] is out and args[8] is None  # no key offset configured


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "bits"), [(4, 4, (4, 4)), (8, 2, (4, 3)), (5, 1, (2, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_output_matches_references(scenario, num_heads, num_kv_heads, bits, dtype, monkeypatch, device):
    """Through the real builder, store, paged kernel and prefill path (interpreted on CPU, compiled on a GPU).

    fp32 checks the arithmetic tightly against paged_attention_ref; bf16 is what vLLM runs, where
    the prefill path hands bf16 K/V to FlashAttention (the same rounding as vLLM's own bf16 cache,
    a few percent on these synthetic keys with 8x outlier channels).
    """
    cfg = TQConfig(k_bits=bits[0], v_bits=bits[1])
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: cfg)
    head_dim, scale = 64, 64**-0.5
    batch = make_batch(SCENARIOS[scenario], num_heads, num_kv_heads, head_dim, seed=len(scenario), device=device,
                       dtype=dtype)  # fmt: skip
    codec = KVCodec(cfg, num_kv_heads, head_dim, device)
    cache = cache_with_context(codec, batch)
    impl = TQ4AttentionImpl(num_heads, head_dim, scale, num_kv_heads)
    md = make_builder(num_heads, num_kv_heads, head_dim, device).build(0, common_metadata(batch))
    out = torch.zeros(batch.query.shape, dtype=batch.query.dtype, device=device)
    impl.do_kv_cache_update(None, batch.key, batch.value, cache, batch.slot_mapping)
    impl.forward(None, batch.query, batch.key, batch.value, cache, md, out)

    ref = paged_attention_ref(
        codec,
        batch.query,
        batch.key,
        batch.value,
        cache,
        batch.block_table,
        batch.seq_lens,
        batch.query_start_loc,
        scale,
    )
    exact = exact_attention(batch, scale)
    err_ref = (out.float() - ref.to(out.device)).abs().max().item()
    tol = {torch.float32: 2e-3, torch.bfloat16: 6e-2}[dtype]
    assert err_ref < tol * ref.abs().max().item(), err_ref
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(1), exact.to(out.device).flatten(1), dim=-1).cpu()
    # Loose: quantisation error against exact attention (keys here have 8x outlier channels).
    assert cos.mean().item() > {4: 0.98, 3: 0.96, 2: 0.75}[min(bits)], cos


@pytest.mark.parametrize(("scenario", "rotated"), [("decode", False), ("mixed", False), ("chunked", False),
                                                    ("mixed", True), ("chunked", True)])  # fmt: skip
def test_layer_with_calibrated_key_offsets_matches_reference(scenario, rotated, monkeypatch, tmp_path, device):
    """config.key_offsets reaches the store, decode and prefill paths: fp32 output against the torch twin.

    The prefill path attends in the basis `rotated` names; un-rotating, it does its context 7 rows at a time, so
    block edges fall inside sequences.
    """
    from turboquant_vllm.kernels import dequant
    from turboquant_vllm.key_offset import save_key_offsets

    monkeypatch.setattr(dequant, "UNROTATE_ROWS", 7)
    monkeypatch.setattr(prefill_module, "attends_rotated", lambda *sizes: rotated)

    num_heads, num_kv_heads, head_dim, scale = 8, 2, 64, 64**-0.5
    offsets = torch.randn(3, num_kv_heads, head_dim, generator=torch.Generator().manual_seed(40)) * 2
    save_key_offsets(tmp_path / "offsets.pt", offsets)
    offsets = offsets.to(device)
    cfg = TQConfig(k_bits=4, v_bits=3, key_offsets=str(tmp_path / "offsets.pt"))
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: cfg)
    layer = SimpleNamespace(layer_name="model.layers.2.self_attn.attn")
    batch = make_batch(SCENARIOS[scenario], num_heads, num_kv_heads, head_dim, seed=41, device=device,
                       dtype=torch.float32)  # fmt: skip
    codec = KVCodec(cfg, num_kv_heads, head_dim, device)
    cache = codec.new_cache(batch.num_blocks, batch.block_size)
    for k, v, slots in zip(batch.context_key, batch.context_value, batch.context_slots, strict=True):
        store_ref(codec, k + offsets[2], v, cache, slots, offsets[2])  # keys around the offset, as in a model
    impl = TQ4AttentionImpl(num_heads, head_dim, scale, num_kv_heads)
    md = make_builder(num_heads, num_kv_heads, head_dim, device).build(0, common_metadata(batch))
    out = torch.zeros(batch.query.shape, dtype=batch.query.dtype, device=device)
    impl.do_kv_cache_update(layer, batch.key, batch.value, cache, batch.slot_mapping)
    impl.forward(layer, batch.query, batch.key, batch.value, cache, md, out)
    args = (batch.query, batch.key, batch.value, cache, batch.block_table, batch.seq_lens, batch.query_start_loc)
    ref = paged_attention_ref(codec, *args, scale, offsets[2])
    assert (out.float().cpu() - ref).abs().max() < 2e-3 * ref.abs().max()
    stored_k, _ = decode_rows_ref(codec, gather_rows_ref(codec, cache, torch.arange(cache.shape[0] * cache.shape[1])))
    assert torch.signbit(stored_k.scales).any()


@pytest.mark.parametrize("exact", ["sinks", "recent"])
@pytest.mark.parametrize(("scenario", "rotated"), [("decode", False), ("chunked", False), ("chunked", True)])
def test_layer_with_exact_tables_matches_reference(exact, scenario, rotated, monkeypatch, device):
    """config.sink_tokens / recent_tokens: a first step prefills every context through the backend (pages + the
    table's writer), the scenario's step then reads each context's first 4 / last 8 tokens exact, in the paged
    kernel and the prefill path (attending in the basis `rotated` names)."""
    monkeypatch.setattr(prefill_module, "attends_rotated", lambda *sizes: rotated)
    num_heads, num_kv_heads, head_dim, scale = 8, 2, 64, 64**-0.5
    n = 4 if exact == "sinks" else 8
    cfg = TQConfig(k_bits=4, v_bits=3, **{"sink_tokens" if exact == "sinks" else "recent_tokens": n})
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: cfg)
    batch = make_batch(SCENARIOS[scenario], num_heads, num_kv_heads, head_dim, seed=43, device=device,
                       dtype=torch.float32)  # fmt: skip
    ctx_lens = [k.shape[0] for k in batch.context_key]
    prefill = dataclasses.replace(
        batch,
        query=torch.randn(sum(ctx_lens), num_heads, head_dim, device=device),
        key=torch.cat(batch.context_key),
        value=torch.cat(batch.context_value),
        slot_mapping=torch.cat(batch.context_slots),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, *torch.tensor(ctx_lens).cumsum(0).tolist()], dtype=torch.int32,
                                     device=device),
    )  # fmt: skip
    codec = KVCodec(cfg, num_kv_heads, head_dim, device)
    cache = codec.new_cache(batch.num_blocks, batch.block_size)
    impl = TQ4AttentionImpl(num_heads, head_dim, scale, num_kv_heads)
    builder = make_builder(num_heads, num_kv_heads, head_dim, device)
    writer_launches = []
    monkeypatch.setattr(tq_backend, "write_recent", lambda *a: (writer_launches.append(a), write_recent(*a)))
    for step in (prefill, batch):
        md = builder.build(0, common_metadata(step))
        out = torch.zeros(step.query.shape, dtype=step.query.dtype, device=device)
        impl.do_kv_cache_update(None, step.key, step.value, cache, step.slot_mapping)
        impl.forward(None, step.query, step.key, step.value, cache, md, out)
    sinks, recent = impl.exact_tables(out)
    if exact == "recent":  # a pure decode step's store, after the attention, writes the window (window_in_store)
        assert len(writer_launches) == (1 if scenario == "decode" else 2)
    written = [min(c + q, n) if exact == "sinks" else min(c, n) + min(q, n) for c, q in SCENARIOS[scenario]]
    assert (sinks or recent).tags.ge(0).sum() == sum(written) * (1 if exact == "sinks" else num_kv_heads)  # both steps

    args = (batch.query, batch.key, batch.value, cache, batch.block_table, batch.seq_lens, batch.query_start_loc)
    if exact == "sinks":
        k, v = (torch.stack([F.pad(x[:n], (0, 0, 0, 0, 0, n - min(n, len(x)))) for x in rows])
                for rows in (batch.context_key, batch.context_value))  # fmt: skip
    else:
        k, v = (torch.stack([F.pad(x[-n:], (0, 0, 0, 0, n - min(n, len(x)), 0)) for x in rows])
                for rows in (batch.context_key, batch.context_value))  # fmt: skip
    held = torch.ones(len(ctx_lens), n, dtype=torch.bool)
    table_rows = {"exact_first" if exact == "sinks" else "exact_last": (k, v, held)}
    ref = paged_attention_ref(codec, *args, scale, **table_rows)
    packed = paged_attention_ref(codec, *args, scale)
    assert (out.float().cpu() - ref).abs().max() < 2e-3 * ref.abs().max()
    assert (ref - packed).abs().max() > 2e-2 * ref.abs().max()  # the exact rows changed the answer
