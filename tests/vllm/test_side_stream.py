"""A mixed step's decode launch beside the prefill path (vllm/side_stream.py): when it forks, and that it changes
nothing but the stream."""

import contextlib

import pytest
import torch
from test_backend import cache_with_context, common_metadata, make_builder

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.config import TQConfig
from turboquant_vllm.eval.vllm_batches import SCENARIOS, make_batch
from turboquant_vllm.vllm import backend as tq_backend
from turboquant_vllm.vllm import side_stream
from turboquant_vllm.vllm.backend import TQ4AttentionImpl

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("enabled", "num_decodes", "has_prefill", "device", "expected"),
    [
        (True, 2, True, CUDA, True),
        (False, 2, True, CUDA, False),  # off by default
        (True, 0, True, CUDA, False),  # a prefill-only step has nothing to put beside it
        (True, 2, False, CUDA, False),  # a pure decode step has nothing to overlap
        (True, 2, True, torch.device("cpu"), False),  # the Triton interpreter has no streams
    ],
)
def test_only_mixed_cuda_steps_overlap_when_switched_on(enabled, num_decodes, has_prefill, device, expected,
                                                        monkeypatch):  # fmt: skip
    monkeypatch.setattr(side_stream, "ENABLED", enabled)
    assert side_stream.overlaps(num_decodes, has_prefill, device) is expected


def test_builder_marks_only_mixed_steps(monkeypatch, device):
    monkeypatch.setattr(side_stream, "ENABLED", True)
    builder = make_builder(8, 2, 64, device)
    for scenario in ("decode", "prefill", "mixed"):
        md = builder.build(0, common_metadata(make_batch(SCENARIOS[scenario], 8, 2, 64, device=device)))
        assert md.decodes_beside_prefill is (scenario == "mixed" and device.type == "cuda")


def test_forward_joins_after_the_prefill_path_and_before_the_writers(monkeypatch):
    """The decode launch runs inside the fork; the main stream waits for it after queuing its prefill work and
    before the exact-table writers, which must follow every read of the step."""
    events = []

    @contextlib.contextmanager
    def fork(use, device):
        events.append(("fork", use))
        yield "side"
        events.append("unfork")

    monkeypatch.setattr(side_stream, "beside_main", fork)
    monkeypatch.setattr(side_stream, "join", lambda side: events.append(("join", side)))
    monkeypatch.setattr(tq_backend, "paged_attention", lambda *a, **k: events.append("decode") or False)
    monkeypatch.setattr(tq_backend, "prefill_attention", lambda *a, **k: events.append("prefill"))
    monkeypatch.setattr(tq_backend, "write_recent", lambda *a, **k: events.append("write_recent"))
    cfg = TQConfig(recent_tokens=8)
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: cfg)
    batch = make_batch(SCENARIOS["mixed"], 8, 2, 64)
    md = make_builder(8, 2, 64).build(0, common_metadata(batch))
    md.decodes_beside_prefill = True  # as the builder marks it on a GPU
    impl = TQ4AttentionImpl(8, 64, 0.125, 2)
    cache = torch.zeros(batch.num_blocks, 16, KVCodec(cfg, 2, 64, "cpu").layout.bytes_per_token, dtype=torch.uint8)
    impl.forward(None, batch.query, batch.key, batch.value, cache, md, torch.zeros_like(batch.query))
    assert events == [("fork", True), "decode", "unfork", "prefill", ("join", "side"), "write_recent"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recent_tokens", [0, 8])
def test_side_stream_gives_the_same_output_and_tables(recent_tokens, monkeypatch):
    """Forked and in order, the same kernels on the same inputs: the output and the recent table match bit for bit,
    and the decode launch really ran on the side stream."""
    cfg = TQConfig(k_bits=4, v_bits=4, recent_tokens=recent_tokens)
    monkeypatch.setattr(tq_backend, "current_tq_config", lambda: cfg)
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    lengths = [(4000, 1), (2500, 1), (3100, 1), (0, 700), (1800, 300)]  # decodes first, as vLLM orders them
    batch = make_batch(lengths, num_heads, num_kv_heads, head_dim, seed=3, device=CUDA, dtype=torch.bfloat16)
    codec = KVCodec(cfg, num_kv_heads, head_dim, CUDA)
    builder = make_builder(num_heads, num_kv_heads, head_dim, CUDA)
    streams = []
    decode = tq_backend.paged_attention

    def recording_decode(*args, **kwargs):
        streams.append(torch.cuda.current_stream())
        return decode(*args, **kwargs)

    monkeypatch.setattr(tq_backend, "paged_attention", recording_decode)
    results = []
    for enabled in (False, True):
        monkeypatch.setattr(side_stream, "ENABLED", enabled)
        md = builder.build(0, common_metadata(batch))
        assert md.decodes_beside_prefill is enabled
        impl = TQ4AttentionImpl(num_heads, head_dim, head_dim**-0.5, num_kv_heads)
        cache = cache_with_context(codec, batch)
        out = torch.full(batch.query.shape, float("nan"), dtype=batch.query.dtype, device=CUDA)
        impl.do_kv_cache_update(None, batch.key, batch.value, cache, batch.slot_mapping)
        impl.forward(None, batch.query, batch.key, batch.value, cache, md, out)
        _, recent = impl.exact_tables(out)
        results.append((out, None if recent is None else recent.kv.clone()))
    torch.cuda.synchronize()
    assert streams[0] == torch.cuda.current_stream() and streams[1] != torch.cuda.current_stream()
    (out_seq, recent_seq), (out_side, recent_side) = results
    assert not out_side.isnan().any()
    assert torch.equal(out_side, out_seq)
    if recent_tokens:
        assert torch.equal(recent_side, recent_seq)
