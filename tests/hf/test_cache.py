"""CompressedDynamicCache against the paged torch reference, plus memory accounting and model refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config
from transformers.cache_utils import Cache, CacheLayerMixin

from turboquant_vllm import kv_cache
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.config import TQConfig, TQConfigError
from turboquant_vllm.eval.calibration import key_offsets
from turboquant_vllm.kernels.reference import dequantize_ref, store_ref
from turboquant_vllm.key_offset import KEY_OFFSET_SKIP
from turboquant_vllm.kv_cache import CompressedDynamicCache, CompressedLayer, cache_kwargs, dynamic_cache_bytes
from turboquant_vllm.quantizer import MSEQuantizer

HEAD_DIM = 64
KV_HEADS = 2


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(
        vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=256, pad_token_id=0,
    )  # fmt: skip
    return LlamaConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


class PagedRefLayer(CacheLayerMixin):
    """Batch-1 reference: rows in a paged cache via store_ref, context read back via dequantize_ref."""

    def __init__(self, config: TQConfig, key_offset: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config, self.length, self.key_offset = config, 0, key_offset

    def lazy_initialization(self, key_states, value_states) -> None:
        self.codec = KVCodec(self.config, key_states.shape[1], key_states.shape[-1])
        self.pages = self.codec.new_cache(num_blocks=32, block_size=16)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past, new = self.length, key_states.shape[-2]
        k_new, v_new = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)  # [q, H, d]
        k_ctx, v_ctx = dequantize_ref(self.codec, self.pages, torch.arange(past), False, self.key_offset)
        store_ref(self.codec, k_new, v_new, self.pages, torch.arange(past, past + new), self.key_offset)
        self.length += new
        k = torch.cat([k_ctx.to(key_states.dtype), k_new]).transpose(0, 1).unsqueeze(0)
        v = torch.cat([v_ctx.to(value_states.dtype), v_new]).transpose(0, 1).unsqueeze(0)
        return k, v

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1


def ref_cache(config: TQConfig, num_layers: int, key_offsets: torch.Tensor | None = None) -> Cache:
    offsets = [None] * num_layers if key_offsets is None else list(key_offsets)
    return Cache(layers=[PagedRefLayer(config, offsets[i]) for i in range(num_layers)])


@torch.no_grad()
def ref_greedy(model, ids: torch.Tensor, steps: int, cache: Cache, prefill_chunk: int) -> tuple[list[int], list]:
    kwargs = cache_kwargs(model, cache)
    for start in range(0, ids.shape[1], prefill_chunk):
        logits = model(input_ids=ids[:, start : start + prefill_chunk], use_cache=True, **kwargs).logits[0, -1]
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits)
        tokens.append(int(logits.argmax()))
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **kwargs).logits[0, -1]
    return tokens, all_logits


@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (3, 2)])
def test_generate_matches_paged_reference_step_by_step(model, k_bits, v_bits):
    config = TQConfig(k_bits=k_bits, v_bits=v_bits)
    ids = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(k_bits))
    vllm_format = dict(residual_tokens=0, center_keys=False, sink_tokens=0)
    cache = CompressedDynamicCache(config, model.config, **vllm_format)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False,
        return_dict_in_generate=True, output_logits=True, **cache_kwargs(model, cache),
    )  # fmt: skip
    tokens, logits = ref_greedy(model, ids, 10, ref_cache(config, 2), prefill_chunk=24)
    assert out.sequences[0, 24:].tolist() == tokens
    for got, want in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(got[0], want, rtol=0, atol=2e-5)
    assert cache.get_seq_length() == 24 + 9  # the last generated token is never fed back


def test_chunked_prefill_matches_paged_reference(model):
    config = TQConfig(k_bits=3, v_bits=3)
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(7))
    cache = CompressedDynamicCache(config, model.config, residual_tokens=0, center_keys=False, sink_tokens=0)
    got_tokens, got = ref_greedy(model, ids, 4, cache, prefill_chunk=16)
    want_tokens, want = ref_greedy(model, ids, 4, ref_cache(config, 2), prefill_chunk=16)
    assert got_tokens == want_tokens
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=0, atol=2e-5)
    exact_tokens, exact = ref_greedy(model, ids, 4, DynamicCache(), prefill_chunk=16)
    assert not torch.allclose(torch.stack(got), torch.stack(exact), atol=1e-4)  # compression is really in the loop


def test_calibrated_key_offsets_match_the_paged_reference(model):
    """key_offsets gives the vLLM backend's semantics (fixed per-layer offsets), checked chunk by chunk."""
    config = TQConfig(k_bits=4, v_bits=3)
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(17))
    offsets = key_offsets(model, ids[0].tolist())  # calibrated on the same text: most keys take the shift
    cache = CompressedDynamicCache(config, model.config, residual_tokens=0, key_offsets=offsets, sink_tokens=0)
    got_tokens, got = ref_greedy(model, ids, 4, cache, prefill_chunk=16)
    want_tokens, want = ref_greedy(model, ids, 4, ref_cache(config, 2, offsets), prefill_chunk=16)
    assert got_tokens == want_tokens
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=0, atol=2e-5)
    assert torch.equal(cache.layers[1].k_offset[0, :, 0], offsets[1])
    assert torch.signbit(cache.layers[1].k_scales).float().mean() > 0.5
    with pytest.raises(TQConfigError, match="3 layers"):
        CompressedDynamicCache(config, model.config, key_offsets=torch.zeros(3, KV_HEADS, HEAD_DIM))


@pytest.mark.parametrize("k_bits,v_bits", [(2, 2), (2, 4), (3, 2), (4, 3), (3, 3), (4, 4)])
@pytest.mark.parametrize("norm_correction", [True, False])
def test_update_returns_dequantised_context_and_exact_new_tokens(k_bits, v_bits, norm_correction):
    config = TQConfig(k_bits=k_bits, v_bits=v_bits, norm_correction=norm_correction)
    gen = torch.Generator().manual_seed(k_bits * 10 + v_bits)
    k1, v1, k2, v2 = (torch.randn(2, KV_HEADS, n, HEAD_DIM, generator=gen) * 3 for n in (5, 5, 3, 3))
    layer = CompressedLayer(config, residual_tokens=0, center_keys=False, sink_tokens=0)
    k_out, v_out = layer.update(k1, v1)
    assert k_out is k1 and v_out is v1
    k_out, v_out = layer.update(k2, v2)
    for out, first, new, bits in ((k_out, k1, k2, k_bits), (v_out, v1, v2, v_bits)):
        quant = MSEQuantizer(HEAD_DIM, bits, config)
        torch.testing.assert_close(out[:, :, :5], quant.dequantize(quant.quantize(first)), rtol=0, atol=1e-6)
        assert torch.equal(out[:, :, 5:], new)
    assert layer.get_seq_length() == 8
    stored = {name: t for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}
    assert set(stored) == {"k_packed", "k_scales", "v_packed", "v_scales"}  # no full-precision copy kept
    assert stored["k_packed"].dtype == torch.uint8 and stored["k_scales"].dtype == torch.float32
    assert stored["k_packed"].shape == (2, KV_HEADS, 8, HEAD_DIM * k_bits // 8)


def test_blockwise_expand_equals_one_block(monkeypatch):
    layer = CompressedLayer(TQConfig(k_bits=3, v_bits=4))
    x = torch.randn(2, KV_HEADS, 37, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    layer.update(x, x)
    whole_k, whole_v = layer.dequantize()
    monkeypatch.setattr(kv_cache, "BLOCK_VECTORS", 2 * KV_HEADS * 5)  # blocks of 5 tokens, ragged tail
    k, v = layer.dequantize()
    assert torch.equal(k, whole_k) and torch.equal(v, whole_v)


def test_residual_window_returns_newest_context_exact():
    config = TQConfig(k_bits=2, v_bits=2)
    gen = torch.Generator().manual_seed(8)
    k1, k2, k3 = (torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen) for n in (5, 3, 2))
    layer, plain = (CompressedLayer(config, residual_tokens=r, sink_tokens=0) for r in (4, 0))
    for x in (k1, k2):
        layer.update(x, -x)
        plain.update(x, -x)
    keys, values = layer.update(k3, -k3)
    deq, _ = plain.update(k3, -k3)
    exact = torch.cat([k1, k2, k3], dim=-2)
    torch.testing.assert_close(keys[:, :, :4], deq[:, :, :4], rtol=0, atol=0)  # older context: dequantised
    assert torch.equal(keys[:, :, 4:], exact[:, :, 4:]) and torch.equal(values[:, :, 4:], -exact[:, :, 4:])
    assert torch.equal(layer.recent_k, exact[:, :, -4:])
    extra = 2 * 4 * KV_HEADS * HEAD_DIM * 4  # fp32 recent K and V
    assert layer.memory_bytes() == plain.memory_bytes() + extra
    layer.crop(-3)  # drops k3 and the last token of k2: one exact recent token survives
    assert layer.get_seq_length() == 7 and torch.equal(layer.recent_k, exact[:, :, 6:7])
    keys, _ = layer.update(k3, -k3)
    assert torch.equal(keys[:, :, 6:], torch.cat([exact[:, :, 6:7], k3], dim=-2))
    with pytest.raises(TQConfigError):
        CompressedDynamicCache(config, residual_tokens=-1)


def test_sink_tokens_are_returned_exact_from_any_step_pattern():
    """The first sink_tokens tokens come back exact however they arrived (a prompt shorter than the sinks, then
    one token a step); every later token is what the cache without sinks returns."""
    config = TQConfig(k_bits=2, v_bits=3)
    gen = torch.Generator().manual_seed(13)
    steps = [torch.randn(2, KV_HEADS, n, HEAD_DIM, generator=gen) for n in (2, 1, 1, 5, 3)]
    layer, plain = (CompressedLayer(config, residual_tokens=2, sink_tokens=s) for s in (4, 0))
    for x in steps:
        keys, values = layer.update(x, -x)
        plain_keys, plain_values = plain.update(x, -x)
    exact = torch.cat(steps, dim=-2)
    assert torch.equal(keys[:, :, :4], exact[:, :, :4]) and torch.equal(values[:, :, :4], -exact[:, :, :4])
    assert torch.equal(keys[:, :, 4:], plain_keys[:, :, 4:]) and torch.equal(values[:, :, 4:], plain_values[:, :, 4:])
    assert not torch.equal(plain_keys[:, :, :4], exact[:, :, :4])  # 2 bits: the sinks would not be exact otherwise
    k, v = layer.dequantize()
    assert torch.equal(k[:, :, :4], exact[:, :, :4]) and torch.equal(k[:, :, 4:], plain.dequantize()[0][:, :, 4:])
    assert layer.memory_bytes() == plain.memory_bytes() + 2 * 2 * KV_HEADS * 4 * HEAD_DIM * 4  # fp32 sink K and V
    layer.crop(3)  # the older API: keep 3 tokens, so 3 sinks
    assert layer.sink_k.shape[-2] == 3
    keys, _ = layer.update(exact[:, :, 3:6], -exact[:, :, 3:6])  # refills the fourth sink
    assert torch.equal(keys[:, :, :3], exact[:, :, :3]) and torch.equal(layer.sink_k, exact[:, :, :4])
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.sink_k, exact[[1, 0], :, :4])
    with pytest.raises(TQConfigError, match="sink_tokens"):
        CompressedDynamicCache(config, sink_tokens=-1)


def shifted_keys(gen: torch.Generator, tokens: int, shift: float = 4.0) -> torch.Tensor:
    """Keys sharing one large component, plus an attention-sink-like first token pointing the other way."""
    common = torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=gen) * shift / HEAD_DIM**0.5
    k = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=gen) / HEAD_DIM**0.5 + common
    k[:, :, 0] = -3 * common[:, :, 0]
    return k


def test_key_offset_matches_torch_math():
    config = TQConfig(k_bits=3, v_bits=3)
    gen = torch.Generator().manual_seed(11)
    k1, k2 = shifted_keys(gen, 12), shifted_keys(gen, 3)
    layer = CompressedLayer(config, residual_tokens=0, sink_tokens=0)
    layer.update(k1, k1)
    keys, _ = layer.update(k2, k2)
    mu = k1[:, :, KEY_OFFSET_SKIP:].mean(dim=-2, keepdim=True)
    quant = MSEQuantizer(HEAD_DIM, 3, config)
    use = ((k1 - mu).norm(dim=-1) < k1.norm(dim=-1)).unsqueeze(-1)
    want = torch.where(use, quant.dequantize(quant.quantize(k1 - mu)) + mu, quant.dequantize(quant.quantize(k1)))
    torch.testing.assert_close(keys[:, :, :12], want, rtol=0, atol=1e-5)
    assert torch.equal(keys[:, :, 12:], k2)
    stored_centered = torch.signbit(layer.k_scales)
    assert not stored_centered[:, :, 0].any() and stored_centered[:, :, 1:12].all()  # the sink is stored as is


def test_key_offset_shrinks_the_error_of_keys_with_a_common_component():
    gen = torch.Generator().manual_seed(12)
    k = shifted_keys(gen, 64)
    errors = {}
    for center in (False, True):
        layer = CompressedLayer(TQConfig(), residual_tokens=0, center_keys=center, sink_tokens=0)
        layer.update(k, k)
        errors[center] = ((layer.dequantize()[0] - k).norm() / k.norm()).item()
    assert errors[True] < 0.5 * errors[False], errors


def test_update_keeps_dtype_and_device_of_inputs():
    layer = CompressedLayer(TQConfig())
    x = torch.randn(1, KV_HEADS, 4, HEAD_DIM, dtype=torch.bfloat16)
    layer.update(x, x)
    k, v = layer.update(x[:, :, :1], x[:, :, :1])
    assert k.dtype == torch.bfloat16 and k.shape == (1, KV_HEADS, 5, HEAD_DIM)


@pytest.mark.parametrize("bits,bytes_per_head", [(4, 32 + 4), (3, 24 + 4), (2, 16 + 4)])
def test_memory_at_8k_tokens_vs_dynamic_cache(bits, bytes_per_head):
    tokens, layers = 8192, 2
    gen = torch.Generator().manual_seed(bits)
    config = TQConfig(k_bits=bits, v_bits=bits)
    packed_only, default, exact = (
        CompressedDynamicCache(config, residual_tokens=0, center_keys=False, sink_tokens=0),
        CompressedDynamicCache(config),
        DynamicCache(),
    )
    for layer_idx in range(layers):
        k, v = (torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=gen).to(torch.bfloat16) for _ in range(2))
        for cache in (packed_only, default, exact):
            cache.update(k, v, layer_idx)
    assert packed_only.memory_bytes() == layers * 2 * KV_HEADS * tokens * bytes_per_head
    window = layers * 2 * KV_HEADS * kv_cache.DEFAULT_RESIDUAL_TOKENS * HEAD_DIM * 2  # bf16 recent K and V
    sinks = layers * 2 * KV_HEADS * kv_cache.DEFAULT_SINK_TOKENS * HEAD_DIM * 2  # bf16 first K and V
    offsets = layers * KV_HEADS * HEAD_DIM * 4  # one fp32 key offset per layer and head
    assert default.memory_bytes() == packed_only.memory_bytes() + window + sinks + offsets
    assert dynamic_cache_bytes(exact) == layers * 2 * KV_HEADS * tokens * HEAD_DIM * 2
    ratio = dynamic_cache_bytes(exact) / packed_only.memory_bytes()
    assert ratio == pytest.approx(2 * HEAD_DIM / bytes_per_head)
    assert ratio >= 3.5 and dynamic_cache_bytes(exact) / default.memory_bytes() >= 3.4


def test_crop_reorder_and_batch_ops_are_exact():
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(3, KV_HEADS, 6, HEAD_DIM, generator=gen) for _ in range(2))
    layer = CompressedLayer(TQConfig(k_bits=3, v_bits=2))
    layer.update(k, v)
    full_k, full_v = layer.dequantize()
    beam = torch.tensor([2, 0, 0])
    layer.reorder_cache(beam)
    assert torch.equal(layer.dequantize()[0], full_k[beam])
    layer.batch_select_indices(torch.tensor([0, 2]))
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.dequantize()[1], full_v[beam][[0, 0, 2, 2]])
    layer.crop(-2)
    assert layer.get_seq_length() == 4 and torch.equal(layer.dequantize()[0], full_k[beam][[0, 0, 2, 2], :, :4])
    layer.crop(0)
    assert layer.get_seq_length() == 4
    layer.crop(3)  # the older API: keep 3 tokens
    assert layer.get_seq_length() == 3
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.memory_bytes() == 0


def test_beam_search_runs_and_reorders_exactly(model):
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(9))
    cache = CompressedDynamicCache(TQConfig(), model.config)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False,
        **cache_kwargs(model, cache),
    )  # fmt: skip
    assert out.shape == (1, 17)


def test_lazy_layers_without_model_config(model):
    cache = CompressedDynamicCache(TQConfig(k_bits=2, v_bits=2))
    ids = torch.randint(1, 96, (2, 9))
    model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    assert len(cache.layers) == 2 and cache.get_seq_length() == 9 and cache.memory_bytes() > 0


@pytest.mark.parametrize("head_dim", [36, 24, 1024])
def test_bad_head_dim_is_refused(head_dim):
    config = tiny_config(head_dim=head_dim)
    with pytest.raises(TQConfigError, match="head_dim"):
        CompressedDynamicCache(TQConfig(), config)
    x = torch.zeros(1, KV_HEADS, 3, head_dim)
    with pytest.raises(TQConfigError, match="head_dim"):
        CompressedDynamicCache(TQConfig()).update(x, x, 0)


def test_hadamard_needs_power_of_two_head_dim():
    with pytest.raises(TQConfigError, match="power-of-two"):
        CompressedDynamicCache(TQConfig(rotation="hadamard"), tiny_config(head_dim=96))
    CompressedDynamicCache(TQConfig(rotation="hadamard"), tiny_config(head_dim=128))


def test_sliding_window_models_are_refused():
    small = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    with pytest.raises(TQConfigError, match="sliding"):
        CompressedDynamicCache(TQConfig(), MistralConfig(sliding_window=128, **small))
    with pytest.raises(TQConfigError, match="sliding_attention"):
        qwen = Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=1, **small)
        CompressedDynamicCache(TQConfig(), qwen)
    CompressedDynamicCache(TQConfig(), MistralConfig(sliding_window=None, **small))
    CompressedDynamicCache(TQConfig(), Qwen2Config(**small))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_matches_cpu(model):
    config = TQConfig(k_bits=4, v_bits=3)
    gen = torch.Generator().manual_seed(11)
    k1, v1, k2, v2 = (torch.randn(2, KV_HEADS, n, HEAD_DIM, generator=gen) for n in (50, 50, 4, 4))
    cpu, gpu = CompressedLayer(config), CompressedLayer(config)
    cpu.update(k1, v1)
    gpu.update(k1.cuda(), v1.cuda())
    want, got = cpu.update(k2, v2), gpu.update(k2.cuda(), v2.cuda())
    for w, g in zip(want, got, strict=True):
        assert g.is_cuda
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=1e-4)
    assert (gpu.k_packed.cpu() == cpu.k_packed).float().mean() > 0.999  # fp32 ties at cell edges may differ
    cuda_model = LlamaForCausalLM(tiny_config()).eval().cuda()
    cuda_model.load_state_dict(model.state_dict())
    ids = torch.randint(1, 96, (1, 20), generator=gen)
    cache = CompressedDynamicCache(config, model.config)
    out = cuda_model.generate(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=6,
                              min_new_tokens=6, do_sample=False, **cache_kwargs(cuda_model, cache))  # fmt: skip
    assert out.shape == (1, 26) and cache.layers[0].k_packed.is_cuda
